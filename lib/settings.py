"""The settings of a training run: train.py's command line, the recipes, and every default and check, resolved once
into a frozen `Settings` before anything is written.

    s = settings.from_command_line(["--target", "2048"])       # what `python train.py --target 2048` runs
    s.micro_batch_size, s.rope_scaling, s.seq_len                # 16, {"rope_type": "yarn", "factor": 8.0, ...}, 256

`resolve` reads config.json, the tokenizer and the --replay pool, nothing else, and raises a one-line error
(cli.UsageError, hf.CheckpointError, data.DataError) for any bad setting. The loop, checkpoints and export take what
they need from the result; nothing changes it afterwards (the run's own state, as the step of its last checkpoint,
lives in train.py's loop).
"""
import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from lib import cli
import data
from lib import hf
import pose
from lib.cli import UsageError
from rope import describe_rope, original_window, rope_kind, rope_name, scaling_from_spec, supported_window

GB = 1e9  # decimal gigabytes, as lib/memory.py prints them
BUNDLED_REPLAY = os.path.join(cli.ASSETS, "replay", "passkey-256.npz")  # synthetic passkey episodes

RECIPES = {
    # section 4.1, LLaMA-7B
    "paper": dict(steps=1000, batch_size=64, lr=2e-5, rope="linear", micro_batch_size=1, replay="none",
                  replay_batch=0),  # micro-batch 1 on the CPU; on CUDA the memory plan chooses it (plan_defaults)
    # the toy reproduction's (results/toy/DESIGN.md): 4M parameters need a larger step size; YaRN with the fast bound
    # at LLaMA's 64-token wavelength; the base learned retrieval from synthetic episodes, which it replays
    "tiny": dict(steps=100, batch_size=16, lr=2e-4, rope="yarn,beta_fast=4,beta_slow=1", micro_batch_size=None,
                 replay=BUNDLED_REPLAY, replay_batch=4),  # micro-batch None: batch / world
}
# What --resume may change (anything else would change the examples, the model or the schedule of the run)
RESUMABLE = ("save_every", "keep", "steps", "micro_batch_size", "grad_checkpointing", "cpu_offload", "compile",
             "delete_checkpoints", "export_dtype", "resume")
MARGIN = 0.15  # the share of a GPU's memory the plan-chosen defaults leave free: CUDA context, NCCL, fragmentation


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, resolved. The fields up to rope_scaling are the run's record (args.json, compared on
    --resume); the others say how this command runs it: where (world, device), with how many threads, or only as a
    dry run."""
    model: str  # the base checkpoint's directory
    data: str  # training documents: raw text or a data.py-prepared dataset
    out: str  # the run directory
    target: int  # the extended context window
    train_len: int  # tokens per example (full-length fine-tuning: target, see seq_len)
    recipe: str  # the RECIPES entry the defaults came from
    method: str  # pose, full, randpos or pi
    chunks: int
    content: str
    split: str
    rope: str  # the interpolation asked for (a spec of rope.scaling_from_spec); rope_scaling is what it resolved to
    steps: int
    batch_size: int  # global, in examples
    micro_batch_size: int  # per process and forward/backward
    lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    seed: int
    replay: str | None  # an absolute .npz path, or None: no replay
    replay_batch: int
    replay_weight: float
    save_every: int
    keep: int
    delete_checkpoints: bool
    export_dtype: str
    resume: bool
    precision: str  # bf16 or fp32
    grad_checkpointing: bool
    cpu_offload: bool
    compile: bool  # torch.compile each block
    rope_scaling: dict | None  # the extended model's rope_scaling (config.json convention)
    world: int = 1  # processes
    device: str = "cpu"  # cpu or cuda
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    dry_run: bool = False  # print the settings, the first examples and the memory plan; load and write nothing
    gpu_memory: float | None = None  # GB of one GPU, stated for a dry run on a machine without one
    dist_timeout: float = 60.0  # minutes a collective may wait for the slowest rank
    why: tuple = ()  # why the recipe and the plan-chosen defaults are what they are, one line each

    @property
    def seq_len(self):
        """Tokens per example: the target for full-length fine-tuning, the training window for the others."""
        return pose.example_length(self.method, self.train_len, self.target)

    @property
    def bundled(self):
        return os.path.realpath(self.model) == os.path.realpath(cli.BUNDLED_MODEL)

    @property
    def bundled_replay_on_own_data(self):
        """The bundled passkey replay mixed into documents of the user's (the tiny recipe's replay with --data)."""
        return bool(self.replay) and os.path.realpath(self.replay) == os.path.realpath(BUNDLED_REPLAY) and \
            os.path.realpath(self.data) != os.path.realpath(cli.BUNDLED_TRAIN)

    def record(self):
        """The run's settings as args.json holds them (paths absolute, so that a resume from elsewhere compares)."""
        fields = [f.name for f in dataclasses.fields(self)]
        out = {k: getattr(self, k) for k in fields[:fields.index("rope_scaling") + 1]}
        for k in ("model", "data", "out"):
            out[k] = os.path.abspath(out[k])
        return json.loads(json.dumps(out))  # tuples -> lists, as read back


def parser(doc=None):
    """train.py's command line; doc: train.py's docstring (its first paragraph describes, paragraphs 3-5 follow the
    options)."""
    paragraphs = (doc or "").split("\n\n")
    p = cli.ArgumentParser(description=paragraphs[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(paragraphs[2:5]))
    p.add_argument("--model", default=None, help=f"Hugging Face LLaMA directory (default: the bundled tiny base, "
                                                 f"{os.path.relpath(cli.BUNDLED_MODEL)})")
    p.add_argument("--data", default=None, help="jsonl/txt file or directory, or a data.py-prepared dataset "
                                                f"(default: the bundled books, {os.path.relpath(cli.BUNDLED_TRAIN)})")
    p.add_argument("--out", default=None, help="output directory (default: out/METHOD-TARGET)")
    p.add_argument("--target", type=int, required=True, help="target context window, in tokens")
    p.add_argument("--train-len", type=int, default=None,
                   help="training window (default: the checkpoint's max_position_embeddings)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="default values of --steps, --batch-size, --lr, --rope, --micro-batch-size (see Recipes "
                        "below; "
                        "default: tiny for the bundled model, paper otherwise)")
    p.add_argument("--method", choices=pose.METHODS, default="pose",
                   help="pose (default), full, randpos or pi: see Methods below")
    p.add_argument("--chunks", type=int, default=2, help="PoSE chunks per example (default 2, as the paper)")
    p.add_argument("--content", choices=pose.CONTENTS, default="uniform",
                   help="PoSE chunk content (paper appendix A): uniform (default, the paper's), contiguous, aligned")
    p.add_argument("--split", choices=pose.SPLITS, default="uniform",
                   help="PoSE chunk lengths: uniform (default, a uniform random split as the paper's appendix code) "
                        "or official (the official code's: first chunk at most half the window; chunks <= 2)")
    p.add_argument("--rope", default=None, help="interpolation, factor target / original window: linear (paper "
                   "recipe), ntk, yarn (tiny recipe), yarn-revised, dynamic, llama3, none; an extended checkpoint "
                   "keeps its own type")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (recipe: paper 1000, tiny 100); may grow "
                                                           "on --resume, which stretches the decay to the new end")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in examples (recipe: paper 64, tiny 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="examples per process per forward/backward "
                   "(recipe: paper 1, tiny the whole per-process batch)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (recipe: paper 2e-5, tiny 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0, HF Trainer's, "
                                                                "which the official code used; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the replay draw (default 0)")
    p.add_argument("--replay", default=None, metavar="POOL", help="a pool of windows (.npz: input_ids, targets) read "
                   "beside the method's examples at positions 0..train_len-1, the same for every method (recipe: "
                   "tiny the bundled passkey episodes, also beside your own --data; paper none); none: no replay")
    p.add_argument("--replay-batch", type=int, default=None, help="replay windows per step (recipe: tiny 4)")
    p.add_argument("--replay-weight", type=float, default=None, help="weight w of the replay loss: the step "
                   "minimizes (1 - w) method loss + w replay loss (default: replay / (batch + replay))")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps and after the last one "
                                                               "(default 100; 0: after the last one only)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk, the newest (default 2)")
    p.add_argument("--delete-checkpoints", action="store_true",
                   help="remove the checkpoints after a successful export (default: keep them, for --resume, "
                        "which also continues a finished run to a larger --steps)")
    p.add_argument("--export-dtype", choices=("auto",) + cli.DTYPES, default="auto",
                   help="dtype of the exported weights (default auto: the base checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint; "
                   f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE[:-1])} may differ")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU); master weights and reductions are fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: on CUDA, the memory plan decides; off on the CPU)")
    p.add_argument("--cpu-offload", action="store_true", help="keep sharded parameters, gradients and optimizer "
                                                               "state in CPU memory (FSDP2 CPUOffloadPolicy)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block before sharding (opt-in; "
                   "positions are data, so PoSE's new positions every step do not recompile)")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="MINUTES", help="how long a collective waits "
                   "for the slowest rank, e.g. while rank 0 reads the checkpoint (default 60)")
    cli.add_threads(p)  # per process
    p.add_argument("--dry-run", action="store_true", help="print every resolved setting, the first examples' "
                   "positions and the memory plan per process, then exit; reads config.json, the tokenizer and the "
                   "data (raw text is prepared into the cache, as the run would), loads no weights, writes no --out; "
                   "on CUDA, says whether the plan fits the free memory")
    p.add_argument("--world", type=int, default=None, help="with --dry-run: plan for this many processes "
                   "(default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="with --dry-run: plan for this device "
                   "type, its defaults of --precision and --grad-checkpointing included (default: this machine's)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="with --dry-run: plan for GPUs of "
                   "this memory (default: measured on this machine's GPU)")
    return p


def from_command_line(argv=None, doc=None, world=None, device=None):
    """Settings from train.py's arguments: parse, then resolve (see resolve for world and device)."""
    return resolve(parser(doc).parse_args(argv), world, device)


# ----------------------------------------------------------------------------------------------------------------------
# every default and every check, in one place, before anything is written

def resolve(args, world=None, device=None):
    """The Settings of parsed arguments: recipe defaults filled in, every setting checked; raises UsageError (or
    CheckpointError/DataError) with one line. world: the number of processes (default: torchrun's WORLD_SIZE, else
    1); device: "cuda" or "cpu" (default: cuda when this machine has it). `args` is read, never changed."""
    import torch
    v = dict(vars(args))  # the given values; None where a recipe or a rule decides
    planned_world, planned_device, gpu_memory = v.pop("world"), v.pop("device"), v.pop("gpu_memory")
    if (planned_world or planned_device or gpu_memory) and not v["dry_run"]:
        raise UsageError("--world, --device and --gpu-memory plan a --dry-run; a run's processes and devices are "
                         "torchrun's")
    world = world or planned_world or int(os.environ.get("WORLD_SIZE", 1))
    device = device or planned_device or ("cuda" if torch.cuda.is_available() else "cpu")
    cli.positive("--world", world)
    if gpu_memory is not None and not gpu_memory > 0:
        raise UsageError(f"--gpu-memory must be > 0 GB, got {gpu_memory}")
    if not v["dist_timeout"] > 0:
        raise UsageError(f"--dist-timeout must be > 0 minutes, got {v['dist_timeout']}")
    v["model"] = v["model"] or cli.BUNDLED_MODEL
    v["data"] = v["data"] or cli.BUNDLED_TRAIN
    fields = hf.read_config(v["model"])  # CheckpointError on a bad directory
    if not (v["dry_run"] and config_only(v["model"])):  # a dry run plans from a config.json alone
        tokenizer = data.Tokenizer(v["model"])
        if tokenizer.vocab_size > fields["vocab_size"]:
            raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {fields['vocab_size']}")
    v["recipe"], why = choose_recipe(v["recipe"], v["model"])
    recipe = RECIPES[v["recipe"]]
    if v["replay"] == "none" and v["replay_batch"] is None:
        v["replay_batch"] = 0  # --replay none alone: no replay, whatever the recipe's batch
    elif v["replay_batch"] == 0 and v["replay"] is None:
        v["replay"] = "none"  # and --replay-batch 0 alone, whatever the recipe's pool
    given = {k: v[k] is not None for k in ("micro_batch_size", "grad_checkpointing")}  # on the command line
    planned = device == "cuda" and not all(given.values())  # on CUDA the memory plan chooses the others, below
    for key, value in recipe.items():
        if v[key] is None and key != "rope":  # rope: extended_scaling, below
            v[key] = value
    if v["micro_batch_size"] is None:
        v["micro_batch_size"] = max(1, v["batch_size"] // world)
    v["precision"] = v["precision"] or ("bf16" if device == "cuda" else "fp32")
    if v["grad_checkpointing"] is None:
        v["grad_checkpointing"] = device == "cuda"
    # the training window: the checkpoint's window; the tiny recipe's is the base's original one (its replay windows
    # have that length), also when it extends a model that a tiny run extended
    v["train_len"] = v["train_len"] or (original_window(fields["rope_scaling"], fields["max_position_embeddings"])
                                        if v["recipe"] == "tiny" else fields["max_position_embeddings"])
    v["out"] = v["out"] or os.path.join("out", f"{v['method']}-{v['target']}")

    for flag, minimum in (("target", 1), ("train_len", 1), ("steps", 1), ("batch_size", 1), ("micro_batch_size", 1),
                          ("chunks", 1), ("keep", 1), ("save_every", 0), ("warmup", 0), ("seed", 0)):
        cli.positive(f"--{flag.replace('_', '-')}", v[flag], minimum)
    for flag in ("lr", "grad_clip", "weight_decay"):
        if not math.isfinite(v[flag]) or v[flag] < 0 or (flag == "lr" and v[flag] == 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be {'> 0' if flag == 'lr' else '>= 0'}, got {v[flag]}")
    if v["target"] < v["train_len"]:
        raise UsageError(f"--target {v['target']} is below the training length {v['train_len']}: nothing to extend")
    if v["method"] == "pose" and v["chunks"] > v["train_len"]:
        raise UsageError(f"--chunks {v['chunks']} is more than --train-len {v['train_len']}: every chunk holds at "
                         "least one token")
    if v["method"] == "pose" and v["split"] == "official" and v["chunks"] > 2:
        raise UsageError(f"--split official is defined for --chunks 1 or 2 (the official code's), got {v['chunks']}")
    if v["batch_size"] % (world * v["micro_batch_size"]):
        raise UsageError(f"--batch-size {v['batch_size']} is not divisible by world size {world} x "
                         f"--micro-batch-size {v['micro_batch_size']}")
    v["replay"], v["replay_batch"], v["replay_weight"] = replay_settings(
        v["replay"], v["replay_batch"], v["replay_weight"], v["batch_size"], v["train_len"], world)
    v["rope_scaling"] = extended_scaling(fields, v["rope"], recipe["rope"], v["target"])
    window = supported_window(fields["rope_scaling"], original_window(fields["rope_scaling"],
                                                                      fields["max_position_embeddings"]))
    if v["rope_scaling"] is not None and v["target"] <= window:
        raise UsageError(f"--target {v['target']} is not beyond the model's {window}-token window: nothing to extend "
                         "(--rope none fine-tunes without interpolation)")
    v["rope"] = v["rope"] or (rope_name(v["rope_scaling"]) if fields["rope_scaling"] else recipe["rope"])
    if planned and not gpu_memory and not torch.cuda.is_available():  # a dry run for CUDA on a machine without one
        planned = False
        why.append("no GPU here: --gpu-memory GB lets the memory plan choose the micro-batch and checkpointing")
    if planned:
        capacity = gpu_memory * GB if gpu_memory else torch.cuda.get_device_properties(
            int(os.environ.get("LOCAL_RANK", 0))).total_memory
        micro, checkpointing, lines = plan_defaults(Settings(**v, world=world, device=device), capacity,
                                                    micro_given=given["micro_batch_size"],
                                                    checkpointing_given=given["grad_checkpointing"])
        v.update(micro_batch_size=micro, grad_checkpointing=checkpointing)
        why += lines
    return Settings(**v, world=world, device=device, gpu_memory=gpu_memory, why=tuple(why))


def config_only(model):
    """A model directory without tokenizer files: a config.json for dry runs (assets/configs)."""
    return not any(os.path.isfile(os.path.join(model, f)) for f in ("tokenizer.model", "tokenizer.json"))


def choose_recipe(given, model):
    """(recipe, [why]): --recipe if given; else the recipe of the train.py run that made --model (its args.json), so
    that extending an extended toy model keeps the toy's recipe; else tiny for the bundled model, paper otherwise."""
    if given:
        return given, [f"recipe {given} (--recipe)"]
    if os.path.realpath(model) == os.path.realpath(cli.BUNDLED_MODEL):
        return "tiny", ["recipe tiny: the default for the bundled model (--recipe paper for the paper's)"]
    made_by = os.path.join(model, "args.json")
    try:
        with open(made_by) as f:
            recipe = json.load(f).get("recipe")
    except (OSError, ValueError, AttributeError):
        recipe = None
    if recipe in RECIPES:
        return recipe, [f"recipe {recipe}: the recipe of the run that made --model ({made_by}); --recipe changes it"]
    return "paper", ["recipe paper: the default for a checkpoint not made by the bundled model's runs (--recipe tiny "
                     "for the toy's)"]


def plan_defaults(s, capacity, micro_given=False, checkpointing_given=False):
    """(micro-batch, activation checkpointing, [why]) for a CUDA run of Settings s on GPUs of `capacity` bytes, from
    the memory plan: checkpointing only where no micro-batch fits without it, and the micro-batch as large as fits
    up to batch / world. A plan fits when its peak is at most (1 - MARGIN) of the capacity. A value the command line
    gave is kept."""
    from lib import memory
    usable = (1 - MARGIN) * capacity
    per_rank = s.batch_size // s.world
    micros = [s.micro_batch_size] if micro_given else [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    options = [s.grad_checkpointing] if checkpointing_given else [False, True]
    for checkpointing in options:
        for micro in micros:
            peak = memory.plan_of(dataclasses.replace(s, micro_batch_size=micro, grad_checkpointing=checkpointing)).peak
            if peak <= usable:
                what = f"{peak / GB:.1f} GB <= {usable / GB:.1f} GB ({1 - MARGIN:.0%} of {capacity / GB:.0f} GB)"
                return micro, checkpointing, [
                    f"activation checkpointing {'on' if checkpointing else 'off'}"
                    + (" (--grad-checkpointing)" if checkpointing_given else
                       ": the plan without it fits" if not checkpointing else
                       ": no micro-batch fits without it"),
                    f"micro-batch {micro}" + (" (--micro-batch-size)" if micro_given else
                                              f": the largest divisor of batch / world = {per_rank} that fits")
                    + f": plan peak {what}"]
    return micros[-1], options[-1], [f"no micro-batch and checkpointing setting fits {usable / GB:.1f} GB "
                                     f"({1 - MARGIN:.0%} of {capacity / GB:.0f} GB): the smallest is planned"]


def warnings(s):
    """Settings that are valid but probably not what was meant: one line each."""
    lines = []
    if s.steps < s.warmup:
        lines.append(f"--steps {s.steps} ends inside the --warmup of {s.warmup} steps: the learning rate rises to "
                     f"{s.lr * s.steps / s.warmup:.3g} and never reaches --lr {s.lr:g}")
    return lines


def replay_settings(replay, batch, weight, batch_size, train_len, world):
    """(pool, replay batch, weight): (None, 0, 0.0) for --replay none, else a pool whose windows are train_len long,
    with 1 <= --replay-batch <= its size, and the weight of its loss (default: its share of the step's windows)."""
    if replay in (None, "none") or batch == 0:
        if replay not in (None, "none") or batch:
            raise UsageError("--replay and --replay-batch go together (--replay none: no replay)")
        return None, 0, 0.0
    pool = data.ReplayPool(replay)
    if pool.window != train_len:
        raise UsageError(f"--replay {replay} holds windows of {pool.window} tokens, not --train-len {train_len}")
    if not 1 <= batch <= len(pool) or batch % world:
        raise UsageError(f"--replay-batch must be in 1..{len(pool)} and a multiple of the world size {world}, got "
                         f"{batch}")
    if weight is None:
        weight = batch / (batch_size + batch)
    if not 0 <= weight < 1:
        raise UsageError(f"--replay-weight must be in [0, 1), got {weight}")
    return os.path.abspath(replay), batch, weight


def extended_scaling(fields, spec, recipe_spec, target):
    """The rope_scaling of the extended model.

    A plain checkpoint gets `spec` (default: the recipe's) with factor target / w over its window w
    (max_position_embeddings), whatever the training length: the interpolation maps the target onto the positions
    the base was pretrained on, and PoSE's training window may be shorter than that (SmolLM2: 8192-token window,
    --train-len 1024, --target 16384 is yarn x2 over 8192, not x16 over 1024). A checkpoint that is already extended
    (scaling of factor f over an original window o) keeps its type and every setting, and its factor grows to
    target / o: yarn x8 over 256, extended to 4096, becomes yarn x16 over 256, so positions keep the angles the
    checkpoint was trained with. Another type cannot compose with it: refused."""
    own = fields["rope_scaling"]
    if own is None:
        window = fields["max_position_embeddings"]
        try:
            scaling = scaling_from_spec(spec or recipe_spec, window, factor=target / window)
        except ValueError as e:
            raise UsageError(f"--rope: {e}") from None
        if scaling and scaling["factor"] != target / window:  # a factor in the spec, e.g. linear:8
            raise UsageError(f"--rope {spec}: factor {scaling['factor']:g} is not --target {target} / the model's "
                             f"{window}-token window = {target / window:g}; leave the factor out (--rope "
                             f"{rope_kind(spec)}) and it follows the target")
        return scaling
    original = original_window(own, fields["max_position_embeddings"])
    composed = dict(own, factor=target / original)
    wanted = scaling_from_spec(spec, original, factor=target / original) if spec else composed
    if wanted is None or any(composed.get(k) != v for k, v in wanted.items()):
        raise UsageError(f"the checkpoint is already extended with {describe_rope(own)} over {original} tokens: "
                         f"--rope {spec} cannot compose with it; leave --rope out to continue with {rope_name(own)}")
    if target < original * float(own["factor"]):
        raise UsageError(f"--target {target} is below the {int(original * float(own['factor']))} tokens the "
                         f"checkpoint already supports ({describe_rope(own)} over {original})")
    return composed
