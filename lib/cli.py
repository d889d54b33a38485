"""What every command line of the project shares: one error form, Ctrl-C, output paths, --threads, progress, device
and dtype defaults.

Every script reports bad input as one line, `error: ...`, on stderr with exit status 1, never a traceback; Ctrl-C
prints one line and exits 130 (128 + SIGINT, the shell's convention). Only the standard library is imported at the
top (torch and tqdm inside the functions that need them), so that numpy-only scripts (coverage.py) stay light.
"""
import argparse
import os
import sys

# the bundled files, the defaults of every script (one name each, used everywhere)
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED_MODEL = os.path.join(ASSETS, "tiny")  # the bundled tiny base model (vocab 4096, 256-token window)
BUNDLED_TRAIN = os.path.join(ASSETS, "books", "train")  # the bundled public-domain books, train.py's default data
BUNDLED_EVAL = os.path.join(ASSETS, "books", "eval")  # held-out public-domain plays, the evaluations' default data


class UsageError(ValueError):
    """Bad command-line input or settings, reported as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, exit 1, like every other error of these scripts."""

    def error(self, message):
        fail(message)


def fail(message, code=1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def run(main, interrupted="interrupted"):
    """Call main(); expected errors (ValueError, which the project's errors derive from, and OSError) become one
    line and exit 1, Ctrl-C the line `interrupted` and exit 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        fail(str(e) or type(e).__name__)


def check_out_path(flag, path):
    """A file the script will write at the end: fail now, not after the run, if it cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a folder")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag}: {path} is not writable")


def check_plot_path(flag, path):
    """check_out_path, and matplotlib can write the file's format."""
    check_out_path(flag, path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"{flag} needs matplotlib (pip install matplotlib)") from None
    ext = os.path.splitext(path)[1][1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        raise UsageError(f"{flag}: unsupported file extension '.{ext}', use one of {', '.join(sorted(formats))}")


def check_outputs(args):
    """check_out_path for --json and check_plot_path for --plot, where given."""
    if getattr(args, "json", None):
        check_out_path("--json", args.json)
    if getattr(args, "plot", None):
        check_plot_path("--plot", args.plot)


def add_threads(parser):
    """--threads N: CPU threads of torch and of the tokenizer; apply it with set_threads(args.threads)."""
    def count(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
        return n
    parser.add_argument("--threads", type=count, default=None, metavar="N",
                        help="CPU threads (default: one per core); 1 when the machine is busy or runs another "
                             "job beside this one: two processes that each use every core run 5-10x slower")


def add_model_options(parser, checkpoint, rows=True):
    """--rope, --original-len, --device, --dtype of the evaluation commands (evaluate.py, passkey.py, recall.py).
    checkpoint: the spec that keeps the checkpoint's own scaling (rope.CHECKPOINT), the default; rows: --rope takes
    one spec per row of the table (a list), else a single spec."""
    many = dict(nargs="+", default=[checkpoint]) if rows else dict(default=checkpoint)
    parser.add_argument("--rope", metavar="SPEC", **many,
                        help=f"rotary scaling{' per row' if rows else ''}: {checkpoint} (default), none, linear:8, "
                             "ntk:8, yarn:8, ...")
    parser.add_argument("--original-len", type=int, default=None,
                        help="the model's original window (default: from its config.json, see rope.original_window)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")


def add_memory_options(parser):
    """--dry-run and --gpu-memory of the evaluation commands; memory.evaluation_path reads them."""
    parser.add_argument("--dry-run", action="store_true", help="print the memory plan and the path it chooses, then "
                        "exit; reads config.json alone, loads nothing")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="with --dry-run: plan for a GPU of this memory (default: the free memory of this "
                             "machine's GPU)")


def check_memory_options(args):
    """UsageError unless --gpu-memory, where given, is positive and plans a dry run on a CUDA device."""
    if args.gpu_memory is None:
        return
    if args.gpu_memory <= 0:
        raise UsageError(f"--gpu-memory must be > 0 GB, got {args.gpu_memory:g}")
    if not args.dry_run:
        raise UsageError("--gpu-memory plans a --dry-run; a run measures the GPU's free memory")
    if not str(args.device or default_device()).startswith("cuda"):
        raise UsageError("--gpu-memory states a GPU's memory: plan for it with --device cuda")


def set_threads(n, torch_threads=True):
    """Apply --threads: torch's intra-op threads (torch_threads) and the `tokenizers` library's pool, which reads
    RAYON_NUM_THREADS when it starts (sentencepiece takes its count per call: data.prepare's `threads`). None: leave
    the defaults."""
    if n is None:
        return
    os.environ["RAYON_NUM_THREADS"] = str(n)
    if torch_threads:
        import torch
        torch.set_num_threads(n)


class _Lines:
    """A file for tqdm that writes each display as a line of its own (no carriage returns), for log files."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(total, desc=None, unit="it", enabled=True, interval=30, initial=0):
    """A progress bar on stderr. On a terminal, tqdm's bar, erased at the end; elsewhere (stderr redirected to a log
    file, where tqdm would disable itself) one plain line at the start, one every `interval` seconds and one at the
    end, so that a long run says how far it is. enabled=False: a bar that shows nothing. initial: the count done."""
    from tqdm import tqdm
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, initial=initial)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(sys.stderr), mininterval=interval,
                maxinterval=interval, ascii=True, initial=initial)


LONG_FORWARD = 4096  # tokens from which a forward pass reports its progress by layer


def layer_progress(model, min_tokens=LONG_FORWARD):
    """Make every forward pass of `model` over at least min_tokens tokens say its size before it starts and report
    its progress by layer (a bar on a terminal, a line every 30 s in a log file): one pass over 100k tokens takes
    minutes on a CPU. Hooks on the first and every block; nothing changes for shorter passes."""
    state = {}

    def start(block, args):
        tokens = args[0].shape[0] * args[0].shape[1]
        if tokens >= min_tokens:
            state["bar"] = progress(len(model.layers), f"one forward pass over {tokens:,} tokens", "layer")

    def step(block, args, output):
        bar = state.get("bar")
        if bar is not None:
            bar.update(1)
            if bar.n == bar.total:
                bar.close()
                state.pop("bar")

    model.layers[0].register_forward_pre_hook(start)
    for block in model.layers:
        block.register_forward_hook(step)


def plural(n, word):
    """'1 document', '2 documents', '1,000 documents'."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def positive(name, value, minimum=1):
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


def default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name, device):
    """--dtype: bf16 on CUDA and fp32 elsewhere unless given."""
    import torch
    name = name or ("bf16" if str(device).startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def write_atomically(path, write):
    """Call write(tmp) on a temporary name in path's folder, with path's extension, then rename it to path: a reader
    or a killed process never sees a half-written file. The one atomic write of the project."""
    folder, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{root}.{os.getpid()}.tmp{ext}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a plain file's permissions (safetensors writes 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)


def check_evaluation_args(parser, args, specs):
    """The checks evaluate.py, passkey.py and recall.py share, after their own: --original-len, the syntax of each
    --rope spec, the output files, --dry-run and --gpu-memory; then the default device. A bad value ends in one line
    (parser.error)."""
    from rope import scaling_from_spec
    try:
        if args.original_len is not None:
            positive("--original-len", args.original_len)
        for spec in specs:
            scaling_from_spec(spec, 2048)  # syntax only: the original window is the model's, known once loaded
        check_outputs(args)
        check_memory_options(args)
    except ValueError as e:
        parser.error(str(e))
    args.device = args.device or default_device()
    return args
