"""Shared test fixtures."""
import random

import pytest
import sentencepiece as spm

WORDS = ("the of and to in a is that for it as with was his he be on by at have are not this but from or "
         "king queen lord love death night day sword crown heaven earth river stone light shadow time").split()


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """Path of a tiny LLaMA-style sentencepiece BPE (vocab 320, byte fallback) trained on generated text (< 1 s)."""
    rnd = random.Random(0)
    lines = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14))).capitalize() + rnd.choice(".,;!?")
             for _ in range(600)]
    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=320,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_model_dir(spm_tokenizer, tmp_path_factory):
    """Path of a random tiny LLaMA in HF format with the `spm_tokenizer` vocabulary and tokenizer.model beside it
    (dim 32, 2 layers, 4 query / 2 key-value heads, max_position_embeddings 64, no rope scaling)."""
    import shutil

    import sentencepiece
    import torch

    from model import LLaMA, ModelConfig

    vocab = sentencepiece.SentencePieceProcessor(model_file=spm_tokenizer).vocab_size()
    model = LLaMA(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                              max_position_embeddings=64))
    with torch.random.fork_rng():  # the same weights every run, and the global generator left as it was
        torch.manual_seed(0)
        model.init_weights()
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(out))
    shutil.copyfile(spm_tokenizer, out / "tokenizer.model")
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and a shared 2-core machine makes a second thread wait for a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """Real text: the sources of three Python standard library modules, one document each (a .jsonl file)."""
    import argparse
    import difflib
    import json
    import textwrap

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for module in (argparse, difflib, textwrap):
            f.write(json.dumps({"text": open(module.__file__).read()}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def hf_tokenizer_dirs(tmp_path_factory):
    """Two tokenizer.json-only tokenizers: byte-level BPE (vocab 400) trained by the `tokenizers` library on a bundled
    book (< 0.1 s), each a directory holding tokenizer.json and tokenizer_config.json, as LLaMA 3 and Qwen2 ship them:
      "llama3": the tokenizer.json post-processor puts <|begin_of_text|> first, no add_bos_token; EOS <|end_of_text|>
      "qwen2":  no BOS (bos_token null, no post-processor); EOS <|endoftext|>"""
    import gzip
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with gzip.open(os.path.join(root, "assets", "books", "train", "milton_areopagitica.txt.gz"), "rt") as f:
        lines = f.read().split("\n")
    specials = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    dirs = {}
    for name, config in (("llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
                         ("qwen2", {"bos_token": None, "eos_token": "<|endoftext|>"})):
        if name == "llama3":
            tok.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)  # Qwen2's: adds no token
        out = tmp_path_factory.mktemp(f"tokenizer_{name}")
        tok.save(str(out / "tokenizer.json"))
        json.dump(dict(config, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False),
                  open(out / "tokenizer_config.json", "w"))
        dirs[name] = str(out)
    return dirs


@pytest.fixture(scope="module")
def mesh():
    """train.py's code needs a process group: a one-process gloo group, removed afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()
