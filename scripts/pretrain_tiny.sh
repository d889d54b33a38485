#!/usr/bin/env bash
# Pretrain the bundled tiny base model (assets/tiny) from scratch with the project's own code:
# a 4096-token BPE on the training books, then a 4-layer, 256-dim LLaMA with a 256-token window trained on the
# books plus synthetic passkey episodes (scripts/make_passkey_corpus.py says why), then exported in bf16.
# Resumable: run it again after an interruption. About 50 minutes on a 2-core CPU.
#
#   bash scripts/pretrain_tiny.sh [STEPS] [STEPS2]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1500}
steps2=${2:-600}
work=out/tiny-pretrain
mkdir -p "$work/data"
[ -f "$work/tokenizer.model" ] || python scripts/make_tokenizer.py --out "$work"
[ -f "$work/data/passkey.jsonl" ] || python scripts/make_passkey_corpus.py --out "$work/data/passkey.jsonl"
for f in assets/books/train/*.txt.gz; do ln -sf "$(realpath "$f")" "$work/data/$(basename "$f")"; done
[ -f "$work/init/config.json" ] || python scripts/init_model.py --config scripts/tiny_config.json \
    --tokenizer "$work/tokenizer.model" --out "$work/init" --seed 0
resume=$([ -d "$work/run/checkpoints" ] && echo --resume || true)
[ -f "$work/run/config.json" ] || python train.py --model "$work/init" --data "$work/data" \
    --out "$work/run" --target 256 --train-len 256 --method pi --rope none --steps "$steps" --batch-size 32 \
    --micro-batch-size 16 --lr 1e-3 --warmup 100 --weight-decay 0.1 --save-every 100 $resume
# Stage 2: the same recipe with four times more passkey episodes (40% of the tokens instead of 14%): after stage 1
# the model copies the key's digits but scrambles their order (30% correct at 128 tokens, 5% at 256).
mkdir -p "$work/data2"
for f in "$work"/data/*; do ln -sf "$(realpath "$f")" "$work/data2/$(basename "$f")"; done
[ -f "$work/data2/passkey2.jsonl" ] || python scripts/make_passkey_corpus.py --out "$work/data2/passkey2.jsonl" \
    --docs 180 --seed 1
resume=$([ -d "$work/run2/checkpoints" ] && echo --resume || true)
[ -f "$work/run2/config.json" ] || python train.py --model "$work/run" --data "$work/data2" --out "$work/run2" --target 256 --train-len 256 \
    --method pi --rope none --steps "$steps2" --batch-size 32 --micro-batch-size 16 --lr 5e-4 --warmup 20 \
    --weight-decay 0.1 --save-every 100 --seed 1 $resume
python - "$work/run2" assets/tiny <<'PY'
import sys, torch
from model import LLaMA
model = LLaMA.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
print(f"wrote {sys.argv[2]}")
PY
