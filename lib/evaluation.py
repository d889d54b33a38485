"""A model loaded for evaluation: the one function evaluate.py, passkey.py, recall.py and the experiment scripts
load through.

    for m in evaluation.load(paths, ropes, dtype, device):   # one model in memory at a time
        m.model, m.name, m.rope, m.original, m.supported      # the weights under rotary scaling m.rope_scaling
        m.warn_beyond(lengths, "ctx")                         # one warning for lengths past the supported window

Each --rope spec gives the same weights another rotary scaling (rope.scaling_from_spec). The original window that
YaRN, dynamic and llama3 scale from is --original-len if given, else the checkpoint's (rope.original_window). The
supported window is original x factor (the original window without scaling). Forward passes over long inputs
report their progress by layer (cli.layer_progress).
"""
import os
from dataclasses import dataclass

from lib import cli
from model import LLaMA
from rope import CHECKPOINT, describe_rope, original_window, scaling_from_spec, supported_window


@dataclass
class Loaded:
    model: LLaMA
    path: str
    spec: str  # the --rope spec
    original: int  # the original window
    supported: int  # the window the scaling supports

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def rope_scaling(self):
        return self.model.cfg.rope_scaling

    @property
    def rope(self):
        return describe_rope(self.rope_scaling)

    def warn_beyond(self, lengths, what):
        """A warning naming the lengths past the supported window (`what`: "ctx", "length", ...)."""
        over = [n for n in lengths if n > self.supported]
        if over:
            cli.warn(f"{self.name} with rope {self.rope} supports {self.supported} positions, fewer than {what} "
                     f"{', '.join(map(str, over))}")


def load(paths, specs=(CHECKPOINT,), dtype=None, device="cpu", original_len=None):
    """Yield a Loaded for every model path and --rope spec, in that order: each checkpoint read once, its rotary
    scaling switched per spec; the previous model is released before the next is read."""
    for path in paths:
        model = LLaMA.from_pretrained(path, dtype=dtype or cli.torch_dtype(None, device), device=device)
        cli.layer_progress(model)
        own = model.cfg.rope_scaling
        original = original_len or original_window(own, model.cfg.max_position_embeddings)
        for spec in specs:
            model.set_rope_scaling(scaling_from_spec(spec, original, checkpoint=own))
            yield Loaded(model, path, spec, original, supported_window(model.cfg.rope_scaling, original))
        del model
