"""Tokenizers: exact round trips, BPE training determinism and caching, token files."""

import inspect
import json
import os

import numpy as np
import pytest
import torch

import titans.data.tokenizer as tokenizer_module
from titans.data.tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    encode_to_file,
    get_tokenizer,
    load_tokenizer,
    open_tokens,
    parse_spec,
    token_dtype,
    train_bpe,
)

UNSEEN = [
    "Grüße aus Zürich: naïve café, résumé, e\u0301 (combining accent)",
    "漢字かな交じり文と한국어, Ελληνικά, русский текст",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "  leading and trailing spaces  ",
    "\t\ttabs\r\nCRLF line\n\n\nblank lines\x0bvertical tab\u00a0nbsp\u2028line sep",
    "zero\u200bwidth and a NUL \x00 inside",
    "x" * 500,
    "",
    "\n",
]
TEXT_CASES = ["hello, world", "é", "漢字", "🙂 emoji", "", "line one\nline two\r\n", " ", *UNSEEN]


def _docstrings(modules) -> list[str]:
    """Natural English (with code) from the docstrings of stdlib modules and their members."""
    docs = []
    for module in modules:
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) > 40:
                docs.append(doc)
    return list(dict.fromkeys(docs))  # drop repeats, keep order


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    import argparse
    import collections
    import functools
    import json as json_module
    import pathlib
    import re
    import shutil
    import string
    import subprocess
    import textwrap
    import unittest

    modules = [argparse, collections, functools, json_module, pathlib, re, shutil, string, subprocess,
               textwrap, unittest]
    return _docstrings(modules)


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return train_bpe(corpus, 800, log=lambda _: None)


# --- byte tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXT_CASES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_decode_invalid_utf8_uses_replacement_char():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0xFE]) == "\ufffd\ufffd"
    assert tok.decode([ord("a"), 0xE6, 0xBC]) == "a\ufffd"  # truncated 3-byte sequence
    assert tok.decode(list("é".encode())[:1] + [ord("b")]) == "\ufffdb"


def test_decode_accepts_arrays_and_tensors():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "héllo"
    assert tok.decode(torch.tensor(ids)) == "héllo"
    assert tok.decode(iter(ids)) == "héllo"


@pytest.mark.parametrize("bad", [[256], [-1], [65, 1000]])
def test_decode_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=rf"{max(bad, key=lambda i: i < 0 or i >= 256)}.*256"):
        ByteTokenizer().decode(bad)


def test_decode_rejects_non_integer_ids():
    with pytest.raises(ValueError, match="integer ids"):
        ByteTokenizer().decode([1.5, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        ByteTokenizer().decode([[1, 2]])


def test_encode_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer().encode(b"bytes")
    with pytest.raises(TypeError, match="list of texts"):
        ByteTokenizer().encode_batch("one string")


# --- BPE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXT_CASES)
def test_bpe_round_trip_exact(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_compresses_training_text(bpe, corpus):
    text = "\n\n".join(corpus)
    assert len(bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_bpe_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(UNSEEN) == [bpe.encode(text) for text in UNSEEN]


def test_bpe_eos_is_the_special_token_and_never_encoded(bpe, corpus):
    assert bpe.hf.id_to_token(bpe.eos_id) == EOS_TOKEN
    texts = [*corpus[:50], *UNSEEN, f"a literal {EOS_TOKEN} in text", EOS_TOKEN]
    assert all(bpe.eos_id not in ids for ids in bpe.encode_batch(texts))
    assert bpe.decode(bpe.encode(EOS_TOKEN)) == EOS_TOKEN


def test_bpe_decode_invalid_utf8_and_range(bpe):
    lone_byte = bpe.hf.token_to_id("Ã")  # byte-level symbol for 0xC3, a UTF-8 lead byte on its own
    assert bpe.decode([lone_byte]) == "\ufffd"
    with pytest.raises(ValueError, match=rf"{bpe.vocab_size}.*vocab size {bpe.vocab_size}"):
        bpe.decode([bpe.vocab_size])


def test_bpe_training_is_deterministic_and_text_dependent(bpe, corpus):
    again = train_bpe(corpus, 800, log=lambda _: None)
    assert again.fingerprint == bpe.fingerprint
    assert again.encode_batch(UNSEEN) == bpe.encode_batch(UNSEEN)
    other = train_bpe(corpus[: len(corpus) // 2], 800, log=lambda _: None)
    assert other.fingerprint != bpe.fingerprint
    assert ByteTokenizer().fingerprint not in (bpe.fingerprint, other.fingerprint)


def test_train_bpe_validates(corpus):
    with pytest.raises(ValueError, match="512"):
        train_bpe(corpus, 300)
    with pytest.raises(TypeError, match="str"):
        train_bpe([b"bytes"] * 3, 600, log=lambda _: None)


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["type"] == "bpe" and meta["fingerprint"] == bpe.fingerprint
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == (bpe.name, bpe.vocab_size, bpe.eos_id)
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode_batch(UNSEEN) == bpe.encode_batch(UNSEEN)
    assert loaded.encode(EOS_TOKEN) == bpe.encode(EOS_TOKEN)  # literal eos text still not special


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint == ByteTokenizer().fingerprint


def test_load_tokenizer_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    meta = tmp_path / "tokenizer.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    meta.write_text(json.dumps({"type": "wordpiece", "vocab_size": 5, "eos_id": 0, "fingerprint": "x"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path)
    meta.write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="missing vocab_size"):
        load_tokenizer(tmp_path)

    bpe.save(tmp_path / "bpe")
    meta = tmp_path / "bpe" / "tokenizer.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="fingerprint"):
        load_tokenizer(tmp_path / "bpe")
    (tmp_path / "bpe" / "bpe.json").write_text("{}")
    with pytest.raises(ValueError, match="bpe.json"):
        load_tokenizer(tmp_path / "bpe")
    (tmp_path / "bpe" / "bpe.json").unlink()
    with pytest.raises(FileNotFoundError, match="bpe.json"):
        load_tokenizer(tmp_path / "bpe")


# --- get_tokenizer -----------------------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("byte") is None
    assert (parse_spec("bpe8k"), parse_spec("bpe32k"), parse_spec("bpe4096")) == (8192, 32000, 4096)
    for bad in ["bpe", "bpe100", "BPE8k", "bpe16k", "wordpiece", "bpe-600", "", None]:
        with pytest.raises(ValueError, match="expected 'byte', 'bpe8k'.*'bpe<N>'"):
            parse_spec(bad)


def test_get_tokenizer_trains_once_then_loads(corpus, tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return iter(corpus)

    first = get_tokenizer("bpe600", texts, tmp_path, log=lambda _: None)
    assert calls == [1] and (tmp_path / "bpe600" / "tokenizer.json").is_file()
    second = get_tokenizer("bpe600", texts, tmp_path, log=lambda _: None)
    assert calls == [1], "second call must load the cached tokenizer, not retrain"
    assert second.fingerprint == first.fingerprint and second.name == first.name == "bpe600"
    assert get_tokenizer("bpe600", None, tmp_path, log=lambda _: None).fingerprint == first.fingerprint


def test_get_tokenizer_byte_and_errors(tmp_path):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="train_texts"):
        get_tokenizer("bpe600", None, tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        get_tokenizer("gpt2")


# --- token files -----------------------------------------------------------------------------------


def _reference_stream(tok, docs) -> list[int]:
    return [i for doc in docs for i in [*tok.encode(doc), tok.eos_id]]


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_encode_to_file_stream_and_meta(which, bpe, corpus, tmp_path, monkeypatch):
    tok = ByteTokenizer() if which == "byte" else bpe
    docs = [*corpus[:40], *[text for text in UNSEEN if "\x00" not in text]]
    monkeypatch.setattr(tokenizer_module, "_BATCH_CHARS", 5000)  # several batches
    meta = encode_to_file(iter(docs), tok, tmp_path / "sub" / "train.bin", log=lambda _: None)
    tokens, read_meta = open_tokens(tmp_path / "sub" / "train.bin", tok)

    assert tokens.tolist() == _reference_stream(tok, docs)
    assert read_meta == meta
    assert meta == {"tokens": len(tokens), "bytes": sum(len(d.encode("utf-8")) for d in docs),
                    "documents": len(docs), "dtype": "uint16", "tokenizer": tok.name,
                    "fingerprint": tok.fingerprint}
    assert tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert sorted(os.listdir(tmp_path / "sub")) == ["train.bin", "train.bin.json"]  # no temp files left


def test_encode_to_file_uint32_for_large_vocab(tmp_path):
    class WideBytes(ByteTokenizer):
        name, vocab_size = "wide", 70000

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    meta = encode_to_file(["ab", "c"], WideBytes(), tmp_path / "t.bin", log=lambda _: None)
    tokens, _ = open_tokens(tmp_path / "t.bin")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert tokens.tolist() == [97, 98, 0, 99, 0]


def test_encode_to_file_empty(tmp_path):
    meta = encode_to_file([], ByteTokenizer(), tmp_path / "t.bin", log=lambda _: None)
    tokens, _ = open_tokens(tmp_path / "t.bin")
    assert meta["tokens"] == meta["documents"] == 0 and len(tokens) == 0


def test_encode_to_file_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "t.bin"
    encode_to_file(["old"], ByteTokenizer(), path, log=lambda _: None)
    with pytest.raises(ValueError, match="NUL"):
        encode_to_file(["fine", "bad\x00doc"], ByteTokenizer(), path, log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["t.bin", "t.bin.json"]
    assert open_tokens(path)[0].tolist() == [*b"old", 0]


def test_open_tokens_errors(bpe, tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(FileNotFoundError, match="no token file"):
        open_tokens(path)
    encode_to_file(["some text", "more"], ByteTokenizer(), path, log=lambda _: None)
    with pytest.raises(ValueError, match="fingerprint"):
        open_tokens(path, bpe)
    with open(path, "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(ValueError, match="truncated or stale"):
        open_tokens(path)
    meta_path = tmp_path / "t.bin.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "tokens": "11"}))
    with pytest.raises(ValueError, match="'tokens' must be a count"):
        open_tokens(path)
    meta_path.write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        open_tokens(path)
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="metadata"):
        open_tokens(path)


def test_encode_to_file_validates(tmp_path):
    with pytest.raises(TypeError, match="Tokenizer"):
        encode_to_file(["a"], "byte", tmp_path / "t.bin")
    with pytest.raises(TypeError, match="single str"):
        encode_to_file("a document", ByteTokenizer(), tmp_path / "t.bin")
