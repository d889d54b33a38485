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
