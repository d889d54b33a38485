"""Write a fresh, randomly initialized LLaMA in Hugging Face format: the start of pretraining from scratch.

    python scripts/init_model.py --config scripts/tiny_config.json --tokenizer out/tiny-pretrain/tokenizer.model \
        --out out/tiny-pretrain/init --seed 0
    python train.py --model out/tiny-pretrain/init --target 256 --method pi --rope none ...   # then pretrain it

Weights are normal(0, 0.02) for every matrix and embedding, ones for the RMSNorm gains (model.init_weights), in fp32.
The tokenizer file is copied beside the weights, so the directory is a complete checkpoint that train.py, evaluate.py
and transformers load.
"""
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli  # noqa: E402
from lib import hf  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import LLaMA, ModelConfig  # noqa: E402


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a Hugging Face config.json for the new model")
    p.add_argument("--tokenizer", required=True, help="its tokenizer.model (copied into --out)")
    p.add_argument("--out", required=True, help="new directory for the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (default 0.02)")
    args = p.parse_args()
    with open(args.config) as f:
        try:
            fields = hf.config_from_hf(json.load(f), where=args.config)
        except json.JSONDecodeError as e:
            raise cli.UsageError(f"{args.config}: not valid JSON ({e})") from None
    tokenizer = Tokenizer(args.tokenizer)
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise cli.UsageError(f"tokenizer has {tokenizer.vocab_size} tokens, the config only {fields['vocab_size']}")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise cli.UsageError(f"--out {args.out} exists and is not empty")
    torch.manual_seed(args.seed)
    model = LLaMA(ModelConfig(**fields))
    model.init_weights(args.std)
    os.makedirs(args.out, exist_ok=True)
    shutil.copyfile(tokenizer.path, os.path.join(args.out, "tokenizer.model"))
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    cli.run(main)
