"""data.Tokenizer in both formats (sentencepiece tokenizer.model, Hugging Face tokenizer.json), BOS as the checkpoint
says, and the tokenizer files of an export: transformers' AutoTokenizer gives exactly our ids."""
import glob
import gzip
import json
import os
import shutil

import pytest
import sentencepiece as spm
import torch

from lib import cli
import data
from lib import tokenizer
from data import DataError, Tokenizer
from model import LLaMA, ModelConfig

transformers = pytest.importorskip("transformers")

EDGE = ["ROMEO", "  two leading spaces,   three inside ", "tab\tand\nnewline\n", "\u00dcn\u00efcode \U0001F600",
        "<s> and </s> and <|endoftext|> as text", "12345", ""]


def held_out_lines(per_play=50):
    """The first non-empty lines of each held-out play (6 x 50 = 300), as they are (indentation included)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(cli.BUNDLED_EVAL, "*.txt.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [line for line in f.read().split("\n") if line.strip()][:per_play]
    return lines


def auto_tokenizer(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # the tokenizers-backed class, which reads tokenizer.json alone: no sentencepiece, protobuf or tiktoken involved
    assert type(tok).__name__ == "TokenizersBackend" and tok.is_fast
    return tok


def export(source_dir, out, vocab_size):
    """save_pretrained of a tiny random model whose tokenizer files come from `source_dir` (as train.py exports)."""
    model = LLaMA(ModelConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=32))
    model.save_pretrained(out, tokenizer_dir=source_dir)
    return str(out)


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    LLaMA.from_pretrained(cli.BUNDLED_MODEL, dtype=torch.bfloat16).save_pretrained(out)
    return str(out)


def test_bundled_export_reads_in_transformers_to_our_ids(bundled_export):
    assert sorted(os.listdir(bundled_export)) == ["config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer.model", "tokenizer_config.json"]
    config = json.load(open(os.path.join(bundled_export, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is True
    theirs, ours = auto_tokenizer(bundled_export), Tokenizer(cli.BUNDLED_MODEL)
    texts = held_out_lines() + EDGE
    assert len(texts) > 300
    got = theirs(texts)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == ours.encode(text) and ids[0] == ours.bos_id == 1, text
    assert ours.encode("ROMEO")[:3] == [1] + ours.sp.encode("ROMEO")[:2]  # <s>, then the pieces of "ROMEO"
    for ids in got[:20] + got[-len(EDGE):]:
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    # our own reader of the exported tokenizer.json agrees too
    exported = Tokenizer(os.path.join(bundled_export, "tokenizer.json"))
    assert exported.bos_id == 1 and exported.eos_id == 2
    assert [exported.encode(t) for t in texts] == got


def test_source_tokenizer_config_is_kept_and_bos_follows_it(spm_tokenizer, tmp_path):
    """A LLaMA-2-style directory (tokenizer.model + tokenizer_config.json naming the slow class): the export keeps its
    other settings (chat template, model_max_length) under the fast class; add_bos_token false means no BOS."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(spm_tokenizer, src / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False, "model_max_length": 64,
              "chat_template": "{{ messages[0]['content'] }}", "bos_token": "<s>", "eos_token": "</s>"}
    json.dump(config, open(src / "tokenizer_config.json", "w"))
    texts = ["The king and the queen of night.", " Love, light and shadow!", "sword  crown"] + EDGE
    n = Tokenizer(src).vocab_size
    out = export(str(src), tmp_path / "out", n)
    written = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert written["chat_template"] == config["chat_template"] and written["model_max_length"] == 64
    theirs = auto_tokenizer(out)
    assert [theirs(t)["input_ids"] for t in texts] == [Tokenizer(src).encode(t) for t in texts]

    json.dump(dict(config, add_bos_token=False), open(src / "tokenizer_config.json", "w"))
    ours = Tokenizer(src)
    assert ours.bos_id is None and ours.start_id == ours.eos_id == 2
    assert ours.encode("Day.", bos=True)[0] == 2  # no BOS: documents and prompts start with the EOS
    out = export(str(src), tmp_path / "out_no_bos", n)
    theirs = auto_tokenizer(out)
    assert [theirs(t)["input_ids"] for t in texts] == [ours.encode(t, bos=False) for t in texts]


def test_unconvertible_sentencepiece_is_copied_with_a_warning(tmp_path, capsys):
    """A unigram sentencepiece model (not LLaMA's BPE) is not approximated: tokenizer.model alone, and a warning."""
    src = tmp_path / "src"
    src.mkdir()
    lines = [f"line {i} of the king and the queen" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(src / "tokenizer"),
                                   model_type="unigram", vocab_size=40, minloglevel=2, num_threads=1)
    out = export(str(src), tmp_path / "out", 40)
    assert "tokenizer.json" not in os.listdir(out) and "tokenizer.model" in os.listdir(out)
    err = capsys.readouterr().err
    assert "warning:" in err and "not a BPE model" in err and "remove_extra_whitespaces" in err


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_tokenizer_json_checkpoints(hf_tokenizer_dirs, kind, tmp_path):
    """tokenizer.json only: ids are the `tokenizers` library's own, BOS as the checkpoint says (LLaMA 3: from the
    post-processor; Qwen2: none, documents start with the EOS), and AutoTokenizer agrees; an export copies the
    files."""
    from tokenizers import Tokenizer as HFTokenizer

    path = hf_tokenizer_dirs[kind]
    ours, reference = Tokenizer(path), HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert ours.path == os.path.join(path, "tokenizer.json") and ours.vocab_size == 400
    if kind == "llama3":
        assert ours.bos_id == ours.start_id == reference.token_to_id("<|begin_of_text|>")
        assert ours.eos_id == reference.token_to_id("<|end_of_text|>")
    else:
        assert ours.bos_id is None and ours.start_id == ours.eos_id == reference.token_to_id("<|endoftext|>")
    texts = held_out_lines(10) + EDGE
    for text in texts:
        ids = ours.encode(text, bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == [ours.start_id] + ids
        assert ours.decode(ids) == text.replace("<|endoftext|>", "")  # a special token in a text is parsed, as
    assert reference.token_to_id("<|endoftext|>") in ours.encode(EDGE[4])  # transformers does by default
    assert ours.encode_batch(texts, bos=False) == [ours.encode(t, bos=False) for t in texts]
    theirs = auto_tokenizer(path)
    assert theirs(texts)["input_ids"] == [ours.encode(t, bos=ours.bos_id is not None) for t in texts]

    out = export(path, tmp_path / "out", 400)  # copied through, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(path, name), "rb").read()


def test_tokenizer_json_bos_is_the_post_processors(hf_tokenizer_dirs, tmp_path):
    """With a tokenizer.json, transformers (5) takes BOS from its post-processor and ignores add_bos_token: so do we."""
    src = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dirs["qwen2"], src)
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "bos_token": "<|begin_of_text|>",
               "eos_token": "<|endoftext|>"}, open(src / "tokenizer_config.json", "w"))
    ours = Tokenizer(src)
    assert ours.bos_id is None
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    assert theirs("The king")["input_ids"] == ours.encode("The king", bos=False)


def test_which_file_a_directory_reads(spm_tokenizer, hf_tokenizer_dirs, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(hf_tokenizer_dirs["llama3"], both)
    shutil.copy(spm_tokenizer, both / "tokenizer.model")
    assert Tokenizer(both).path.endswith("tokenizer.model")  # the sentencepiece original, when there is one
    (both / "tokenizer.model").write_bytes(b"not sentencepiece: a tiktoken file, as LLaMA 3's original/ holds")
    assert Tokenizer(both).path.endswith("tokenizer.json")
    with pytest.raises(DataError, match="expected tokenizer.model .* or tokenizer.json"):
        Tokenizer(tmp_path)


def test_a_file_that_is_no_tokenizer(tmp_path):
    """Another file of a checkpoint given as the tokenizer (config.json, the weights) is "not a tokenizer", in one
    line; a broken file named as a tokenizer says why it does not load."""
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 256}')
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    for path in (tmp_path / "config.json", tmp_path / "weights.bin"):
        with pytest.raises(DataError) as e:
            Tokenizer(path)
        assert str(e.value) == (f"{path} is not a tokenizer: expected a sentencepiece tokenizer.model, a Hugging Face "
                                "tokenizer.json, or a checkpoint directory holding one")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(DataError, match="^cannot load tokenizer .*tokenizer.json: ") as e:
        Tokenizer(tmp_path / "broken")
    assert "\n" not in str(e.value)


def test_prepare_and_cache_with_tokenizer_json(hf_tokenizer_dirs, tmp_path):
    """data.prepare stores each document from the start token; the cache is keyed on the tokenizer.json file and the
    start token, so a changed start token prepares again, and a prepared dataset is checked against both."""
    src = tmp_path / "tok"
    shutil.copytree(hf_tokenizer_dirs["qwen2"], src)
    texts = ["The king is dead; long live the king!", "Love, light and shadow."]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tok = Tokenizer(src)
    corpus = data.load_corpus(str(tmp_path / "docs.jsonl"), tok, cache_dir=str(tmp_path / "cache"))
    assert [corpus[i].tolist() for i in range(2)] == [[tok.eos_id] + tok.encode(t, bos=False) for t in texts]
    assert corpus.meta["bos_id"] is None and corpus.meta["start_id"] == tok.eos_id
    assert corpus.meta["tokenizer_sha256"] == data.file_sha256(os.path.join(src, "tokenizer.json"))
    prepared = glob.glob(str(tmp_path / "cache" / "*.json"))[0]
    config = json.load(open(src / "tokenizer_config.json"))  # another EOS: the same file, another start token
    json.dump(dict(config, eos_token="<|end_of_text|>"), open(src / "tokenizer_config.json", "w"))
    other = Tokenizer(src)
    corpus = data.load_corpus(str(tmp_path / "docs.jsonl"), other, cache_dir=str(tmp_path / "cache"))
    assert corpus[0][0] == other.start_id != tok.start_id and len(os.listdir(tmp_path / "cache")) == 6
    with pytest.raises(DataError, match="start with token"):
        data.load_corpus(prepared, other)


def test_sentencepiece_conversion_reads_the_model_file(spm_tokenizer):
    """The hand-read protobuf fields (no protobuf package) agree with what sentencepiece itself reports."""
    sp = spm.SentencePieceProcessor(model_file=spm_tokenizer)
    with open(spm_tokenizer, "rb") as f:
        proto = tokenizer._protobuf(f.read())
    pieces = [tokenizer._protobuf(p) for p in proto[1]]
    assert len(pieces) == sp.vocab_size()
    for i in range(sp.vocab_size()):
        assert tokenizer._one(pieces[i], 1, b"").decode() == sp.id_to_piece(i)
        assert tokenizer._one(pieces[i], 2, 0.0) == pytest.approx(sp.get_score(i))
        assert (tokenizer._one(pieces[i], 3, 1) == 6) == sp.is_byte(i) and (tokenizer._one(pieces[i], 3, 1) == 3) == sp.is_control(i)
