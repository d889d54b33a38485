"""The tokenizer of a checkpoint, read as transformers reads it (sentencepiece `tokenizer.model` or Hugging Face
`tokenizer.json`, BOS and EOS from the checkpoint's files), and the export's converter of a sentencepiece model to
the tokenizer.json that transformers reads with the `tokenizers` library alone.

    tok = Tokenizer("assets/tiny")                  # a checkpoint directory, or its tokenizer.model / tokenizer.json
    tok.encode("The king", bos=True), tok.start_id, tok.decode(ids)
    files = sentencepiece_to_hf("assets/tiny")      # {"tokenizer.json": ..., "tokenizer_config.json": ...}, as text

data.py re-exports Tokenizer, load_tokenizer and DataError (`from data import Tokenizer`); hf.write_tokenizer calls
sentencepiece_to_hf for an export.
"""
import json
import os
import struct

import sentencepiece as spm


class DataError(ValueError):
    """Bad input or a bad prepared dataset. The message is one line, written for the user. (Defined here, where the
    tokenizer raises it first; data.py re-exports it as data.DataError.)"""


class ConversionError(DataError):
    """A sentencepiece model that sentencepiece_to_hf cannot convert to tokenizer.json (the export then ships the
    tokenizer.model alone, with a warning)."""


class Tokenizer:
    """The tokenizer of a checkpoint: sentencepiece `tokenizer.model` or Hugging Face `tokenizer.json`.

    Tokenizer(path): a tokenizer.model or tokenizer.json file, or a checkpoint directory. A directory that ships both
    is read through tokenizer.model: that is the original of which LLaMA 1/2's and Mistral's tokenizer.json are
    conversions (so are our exports', hf.write_tokenizer), the same ids, and data prepared from a directory before
    its export stays valid for the export (load_corpus keys its cache on the file). LLaMA 3, Qwen2 and SmolLM2 ship
    only tokenizer.json, read with the `tokenizers` library, the format's own implementation.

    BOS is what the checkpoint puts before a text, read as transformers (5) reads it:
      - tokenizer.json: what its post-processor puts there (LLaMA 3: <|begin_of_text|>; Qwen2: nothing);
        transformers ignores tokenizer_config.json's add_bos_token when there is a tokenizer.json, and so do we;
      - tokenizer.model: the model's <s>, unless tokenizer_config.json says `add_bos_token: false`.
    The EOS is tokenizer_config.json's (or special_tokens_map.json's) `eos_token`, or the sentencepiece model's </s>.
    `bos_id` is None when the checkpoint adds no BOS. `start_id` is the token every document, perplexity window and
    passkey prompt starts with (data.prepare, evaluate.py, passkey.py): the BOS, or else the EOS, which such models
    read between documents in pretraining (lm-evaluation-harness starts its rolling windows with it too).
    `encode(text, bos=True)` puts `start_id` first; transformers' `tokenizer(text)` equals `encode(text, bos=True)`
    when there is a BOS and `encode(text, bos=False)` when there is none.

    Special-token strings inside a text ("<s>", "<|endoftext|>") are plain text for sentencepiece (it never parses
    them), and for tokenizer.json what the checkpoint's `split_special_tokens` says (default false: parsed into the
    special token, as transformers and `tokenizers` do).
    """

    def __init__(self, path):
        self.path = tokenizer_file(os.fspath(path))
        folder = os.path.dirname(self.path)
        config = {**_read_json(os.path.join(folder, "special_tokens_map.json")),
                  **_read_json(os.path.join(folder, "tokenizer_config.json"))}
        if self.path.endswith(".json"):
            self._open_tokenizers(config)
            self.bos_id = self._post_processor_bos()
        else:
            self._open_sentencepiece()
            add_bos = config.get("add_bos_token") is not False and self.sp.bos_id() >= 0
            self.bos_id = self.sp.bos_id() if add_bos else None
        self.start_id = self.bos_id if self.bos_id is not None else self.eos_id
        if self.start_id is None:
            raise DataError(f"{self.path}: the tokenizer has neither a BOS nor an EOS token, and documents, perplexity "
                            "windows and passkey prompts start with one of them")

    def _open_sentencepiece(self):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise _not_loaded(self.path, e) from None
        self.tk = None
        self.vocab_size = self.sp.vocab_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def _open_tokenizers(self, config):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tk = HFTokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises its own Exception type for malformed files
            raise _not_loaded(self.path, e) from None
        self.sp = None
        self.tk.no_truncation()  # some files ship a truncation or padding setting; documents are never cut here
        self.tk.no_padding()
        self.tk.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        token = config.get("eos_token")  # a string, or an AddedToken as a dict
        token = token.get("content") if isinstance(token, dict) else token
        self.eos_id = self.tk.token_to_id(token) if isinstance(token, str) else None

    def _post_processor_bos(self):
        """The one token the tokenizer.json post-processor puts before a text, or None (Qwen2: none)."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        before = next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
        if len(before) > 1:
            raise DataError(f"{self.path}: the post-processor puts {len(before)} tokens before a text; one BOS "
                            "at most is supported")
        return before[0] if before else None

    def encode(self, text, bos=True, eos=False):
        """Token ids of `text`; bos: `start_id` first (the BOS, or the EOS where there is none); eos: EOS last."""
        ids = self.sp.encode(text) if self.sp is not None else self.tk.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts, bos=True, eos=False, threads=-1):
        """encode() of many texts at once. threads: sentencepiece's (-1: all cores); `tokenizers` uses its own pool
        (RAYON_NUM_THREADS)."""
        if self.sp is not None:
            out = self.sp.encode(texts, num_threads=threads)
        else:
            out = [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        return [self._wrap(ids, bos, eos) for ids in out]

    def _wrap(self, ids, bos, eos):
        if eos and self.eos_id is None:
            raise DataError(f"{self.path}: the tokenizer has no EOS token")
        return ([self.start_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """The text of `ids`, special tokens (BOS, EOS) left out, as sentencepiece does."""
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp is not None else self.tk.decode(ids, skip_special_tokens=True)


def _not_loaded(path, e):
    """The error for a tokenizer file that does not load: a file named as a checkpoint's tokenizer is a broken one
    (the library's reason follows); any other file (config.json, the weights) is not a tokenizer at all."""
    if os.path.basename(path) in ("tokenizer.model", "tokenizer.json"):
        return DataError(f"cannot load tokenizer {path}: {str(e).strip().splitlines()[0]}")
    return DataError(f"{path} is not a tokenizer: expected a sentencepiece tokenizer.model, a Hugging Face "
                     "tokenizer.json, or a checkpoint directory holding one")


def tokenizer_file(path):
    """The tokenizer file of `path`: the file itself, or a checkpoint directory's tokenizer.model, else its
    tokenizer.json (see Tokenizer). A tokenizer.model that is not sentencepiece (LLaMA 3's original/ folder holds a
    tiktoken one) is passed over when a tokenizer.json is there."""
    if os.path.isdir(path):
        model, hf_json = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
        if os.path.isfile(model) and not (os.path.isfile(hf_json) and not _is_sentencepiece(model)):
            return model
        if os.path.isfile(hf_json):
            return hf_json
        raise DataError(f"no tokenizer in {path}: expected tokenizer.model (sentencepiece) or tokenizer.json "
                        "(Hugging Face)")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer not found: {path}")
    return path


def _is_sentencepiece(path):
    try:
        spm.SentencePieceProcessor(model_file=path)
        return True
    except (OSError, RuntimeError):
        return False


def _read_json(path):
    """A JSON object from `path`, or {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object")
    return obj


def load_tokenizer(tokenizer):
    """A Tokenizer from a path (a tokenizer file or its directory); a tokenizer object passes through."""
    return Tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


# ----------------------------------------------------------------------------------------------------------------
# sentencepiece tokenizer.model -> Hugging Face tokenizer.json, for the export (hf.write_tokenizer)

def sentencepiece_to_hf(source):
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} (text) for the sentencepiece BPE tokenizer of the
    directory `source`, encoding every text as Tokenizer(source) does.

    sentencepiece's BPE encodes a whole text (spaces escaped as "\u2581", one prepended with add_dummy_prefix)
    by merging, again and again, the adjacent pair whose concatenation is the best-scored piece of the vocabulary,
    characters outside it falling back to byte pieces <0xNN>. A `tokenizers` BPE with the same vocabulary does the
    same when its merge list ranks each pair (a, b) by the score of the piece a + b: the merges are every split of
    every piece into two pieces of the vocabulary, ordered by the merged piece's score (then id). No
    pre-tokenizer: sentencepiece does not split the text into words to encode it either."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(os.path.join(source, "tokenizer.model"))
    with open(tok.path, "rb") as f:
        proto = _protobuf(f.read())  # sentencepiece_model.proto's ModelProto, field by number:
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece.type (5: unused, 6: byte)
    pieces = [(_one(p, 1, b"").decode(), _one(p, 2, 0.0), _one(p, 3, NORMAL))  # SentencePiece: piece, score, type
              for p in map(_protobuf, proto.get(1, []))]
    trainer, normalizer = _protobuf(_one(proto, 2, b"")), _protobuf(_one(proto, 3, b""))  # TrainerSpec, NormalizerSpec
    # the settings of LLaMA-family tokenizers only: anything else is reported, not approximated
    problems = [what for what, bad in (
        ("not a BPE model", _one(trainer, 3, 1) != 2),  # model_type, UNIGRAM = 1 by default
        ("a normalization rule other than identity", _one(normalizer, 2, b"") != b""),  # precompiled_charsmap
        ("remove_extra_whitespaces", _one(normalizer, 4, 1)),
        ("no whitespace escaping", not _one(normalizer, 5, 1)),  # escape_whitespaces
        ("treat_whitespace_as_suffix", _one(trainer, 24, 0)),
        ("user-defined symbols", any(kind == USER_DEFINED for _, _, kind in pieces))) if bad]
    if problems:
        raise ConversionError(f"{tok.path} cannot be converted to tokenizer.json ({', '.join(problems)})")

    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []  # (-score of the merged piece, its id, left id, right id): sorted, the merge ranks
    for i, (piece, score, kind) in enumerate(pieces):
        if kind == NORMAL:
            merges += [(-score, i, vocab[piece[:k]], vocab[piece[k:]]) for k in range(1, len(piece))
                       if piece[:k] in vocab and piece[k:] in vocab]
    merges = [(pieces[left][0], pieces[right][0]) for _, _, left, right in sorted(merges)]
    unk = next((piece for piece, _, kind in pieces if kind == UNKNOWN), None)
    hf_tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                    byte_fallback=bool(_one(trainer, 35, 0))))
    space = "\u2581"  # sentencepiece's escaped space, "▁"
    prefix = [normalizers.Prepend(space)] if _one(normalizer, 3, 1) else []  # add_dummy_prefix
    hf_tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", space)])
    hf_tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
                                       + ([decoders.Strip(" ", 1, 0)] if prefix else []))  # the prefix back off
    specials = [piece for piece, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
    hf_tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    bos, eos = (None if i is None else pieces[i][0] for i in (tok.bos_id, tok.eos_id))
    if bos is not None:  # the BOS before every text (tokenizers' "post-processor"), as transformers expects it
        hf_tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                              special_tokens=[(bos, tok.bos_id)])
    # the source's tokenizer_config.json (chat template, model_max_length, ...) less what named its class and files
    config = {}
    if os.path.isfile(os.path.join(source, "tokenizer_config.json")):  # valid JSON: Tokenizer read it
        with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    config = {k: v for k, v in config.items() if k not in (
        "tokenizer_class", "auto_map", "added_tokens_decoder", "vocab_file", "tokenizer_file", "legacy",
        "add_prefix_space", "sp_model_kwargs")}
    config.update(tokenizer_class="PreTrainedTokenizerFast",  # tokenizer.json as it is, in transformers 4 and 5
                  bos_token=bos, eos_token=eos, unk_token=unk, add_bos_token=bos is not None, add_eos_token=False,
                  split_special_tokens=True,  # "<s>" in a text is text, as sentencepiece reads it
                  clean_up_tokenization_spaces=False)
    return {"tokenizer.json": hf_tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2)}


def _protobuf(buf):
    """The fields of a serialized protobuf message (enough of the wire format for sentencepiece's model file, read
    without the protobuf package): {field number: [values]}, varints as int, fixed32 as float, the rest as bytes."""
    fields, i = {}, 0

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        else:
            raise ConversionError(f"not a sentencepiece model file (protobuf wire type {wire})")
        fields.setdefault(number, []).append(value)
    return fields


def _one(message, number, default):
    """The value of a non-repeated protobuf field (the last one given, as protobuf reads it), or its default."""
    return message.get(number, [default])[-1]
