"""Tokenizers (bytes or byte-level BPE) behind one interface, and the token files the trainer reads.

    tok = get_tokenizer("bpe8k", train_texts=lambda: corpus_texts(), cache_dir="runs/tokenizers")
    ids = tok.encode("hello")                     # list[int], each < tok.vocab_size
    meta = encode_to_file(docs, tok, "train.bin")  # flat stream: doc tokens, eos, doc tokens, eos, ...
    tokens, meta = open_tokens("train.bin")        # read-only np.memmap (uint16 or uint32)

A tokenizer directory holds `tokenizer.json` (our metadata: type, name, vocab_size, eos_id,
fingerprint) and, for BPE, `bpe.json` (the Hugging Face `tokenizers` file). The fingerprint is a
hash of the vocabulary and merges, so a checkpoint or token file made with another tokenizer is
caught instead of silently decoding to garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

EOS_TOKEN = "<|endoftext|>"
META_FILE = "tokenizer.json"
BPE_FILE = "bpe.json"
MIN_BPE_VOCAB = 512  # 256 byte symbols + the eos token + room for merges worth having
BPE_ALIASES = {"bpe8k": 8192, "bpe32k": 32000}
SPEC_FORMS = "'byte', 'bpe8k' (8192), 'bpe32k' (32000) or 'bpe<N>' with N >= 512 (e.g. 'bpe4096')"
_BATCH_CHARS = 1 << 22  # characters per encode batch: enough to keep HF's parallel encode busy


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind`, `name`, `vocab_size`, `eos_id` and implement the rest.

    `eos_id` separates documents in a token stream; encoding ordinary text never produces it
    (for bytes, because the corpus builder strips NUL from texts).
    """

    kind: str  # "byte" or "bpe": the type saved in tokenizer.json
    name: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """text -> token ids, each in [0, vocab_size)."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decode ids already checked to be in range."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex digest identifying the vocabulary and merges."""

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids (list, 1-D array or tensor) -> text. Invalid UTF-8 becomes U+FFFD; an id outside
        [0, vocab_size) raises ValueError."""
        return self._decode(self._checked_ids(ids))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """[text] -> [ids], same as encode on each."""
        return [self.encode(text) for text in _checked_texts(texts)]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Documents -> one stream: encode(doc) + [eos_id] for each doc, as int64 (N,)."""
        pieces = [np.asarray(ids + [self.eos_id], dtype=np.int64) for ids in self.encode_batch(texts)]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def save(self, directory: str | os.PathLike) -> None:
        """Write DIR/tokenizer.json (metadata), creating DIR; the file is replaced atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / META_FILE, json.dumps(self._metadata(), indent=2) + "\n")

    def _metadata(self) -> dict:
        return {"type": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "fingerprint": self.fingerprint}

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        # tolist() first, so that tensors on any device and memmap slices all work
        arr = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids))
        if arr.size == 0:
            return []
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"decode expects a 1-D sequence of integer ids, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad.argmax()])} is out of range for tokenizer {self.name!r} "
                             f"(vocab size {self.vocab_size}: ids must be in [0, {self.vocab_size}))")
        return arr.tolist()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocab 256, eos = 0 (the NUL byte)."""

    kind = "byte"
    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(_checked_text(text).encode("utf-8"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"titans byte tokenizer: utf-8 bytes, eos=0").hexdigest()

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Fast path of Tokenizer.encode_documents: join the UTF-8 bytes with NUL in one buffer."""
        texts = _checked_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.int64)
        data = "\0".join(texts).encode("utf-8") + b"\0"
        if data.count(0) != len(texts):
            raise ValueError("a document contains a NUL character, which the byte tokenizer reserves as the "
                             "document separator (eos_id=0); strip NUL from texts first")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE from Hugging Face `tokenizers`: any string round-trips exactly; eos = <|endoftext|>."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, name: str | None = None):
        """hf_tokenizer: a `tokenizers.Tokenizer` with a ByteLevel pre-tokenizer/decoder and <|endoftext|>."""
        eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"the BPE tokenizer has no {EOS_TOKEN!r} token; train it with train_bpe")
        # Text that happens to contain "<|endoftext|>" (e.g. source code about tokenizers) must encode
        # as ordinary text, or it would forge a document boundary.
        hf_tokenizer.encode_special_tokens = True
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id
        self.name = name or f"bpe{self.vocab_size}"
        self._fingerprint = _bpe_fingerprint(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(_checked_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.hf.encode_batch_fast(_checked_texts(texts), add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def _decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> None:
        """Write DIR/bpe.json, then DIR/tokenizer.json: the metadata's presence marks a complete directory."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_atomic(Path(directory) / BPE_FILE, self.hf.to_str())
        super().save(directory)


def train_bpe(texts: Iterable[str], vocab_size: int, *, name: str | None = None,
              log: Callable[[str], None] = print) -> BPETokenizer:
    """Train a byte-level BPE with `vocab_size` tokens in all (256 bytes, <|endoftext|> with id 0, merges).

    Deterministic: the same texts give the same merges and fingerprint. A small corpus may stop
    short of vocab_size (no pair left to merge); `vocab_size` of the result is the real size.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"BPE vocab_size must be an int >= {MIN_BPE_VOCAB} (256 bytes + eos + merges), "
                         f"got {vocab_size!r}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    counter = _Counter(texts)
    start = time.perf_counter()
    hf.train_from_iterator(counter, trainer=trainer)
    tok = BPETokenizer(hf, name=name or f"bpe{vocab_size}")
    log(f"tokenizer: trained {tok.name} ({tok.vocab_size} tokens) on {counter.documents} texts, "
        f"{counter.bytes / 1e6:.1f} MB, in {time.perf_counter() - start:.1f} s")
    return tok


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by Tokenizer.save; checks the model files against the saved fingerprint."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {directory}: {META_FILE} is missing "
                                f"(save one with Tokenizer.save or get_tokenizer(..., cache_dir=...))")
    meta = _read_json(meta_path, required=("type", "vocab_size", "eos_id", "fingerprint"))
    if meta["type"] == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif meta["type"] == "bpe":
        tok = _load_bpe(directory, meta.get("name"))
    else:
        raise ValueError(f"{meta_path}: unknown tokenizer type {meta['type']!r}; expected 'byte' or 'bpe'")
    found = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "fingerprint": tok.fingerprint}
    for key, value in found.items():
        if meta[key] != value:
            raise ValueError(f"{meta_path}: {key} is {meta[key]!r} but the loaded tokenizer has {value!r}; "
                             f"the directory is corrupt or was edited by hand")
    return tok


def _load_bpe(directory: Path, name: str | None) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = directory / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"BPE tokenizer at {directory} is incomplete: {BPE_FILE} is missing")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise ValueError(f"{path} is not a valid Hugging Face tokenizer file: {e}") from e
    return BPETokenizer(hf, name=name)


def parse_spec(spec: str) -> int | None:
    """'byte' -> None; 'bpe8k' -> 8192; 'bpe32k' -> 32000; 'bpe<N>' -> N. Anything else: ValueError."""
    if spec == "byte":
        return None
    if isinstance(spec, str) and spec in BPE_ALIASES:
        return BPE_ALIASES[spec]
    match = re.fullmatch(r"bpe(\d+)", spec) if isinstance(spec, str) else None
    if match is None or int(match.group(1)) < MIN_BPE_VOCAB:
        raise ValueError(f"unknown tokenizer {spec!r}; expected {SPEC_FORMS}")
    return int(match.group(1))


def get_tokenizer(spec: str, train_texts: Callable[[], Iterable[str]] | None = None,
                  cache_dir: str | os.PathLike | None = None, *,
                  log: Callable[[str], None] = print) -> Tokenizer:
    """Tokenizer for `spec` (see parse_spec). BPE: load cache_dir/<name>/ if saved there, else train on
    train_texts() and save it there (if cache_dir is given)."""
    vocab_size = parse_spec(spec)
    if vocab_size is None:
        return ByteTokenizer()
    name = f"bpe{vocab_size}"
    directory = Path(cache_dir) / name if cache_dir is not None else None
    if directory is not None and (directory / META_FILE).is_file():
        tok = load_tokenizer(directory)
        log(f"tokenizer: loaded {tok.name} ({tok.vocab_size} tokens) from {directory}")
        return tok
    if train_texts is None:
        where = f"no saved tokenizer in {directory}" if directory is not None else "no cache_dir"
        raise ValueError(f"tokenizer {spec!r} must be trained ({where}) but train_texts was not given")
    tok = train_bpe(train_texts(), vocab_size, name=name, log=log)
    if directory is not None:
        tok.save(directory)
        log(f"tokenizer: saved {tok.name} to {directory}")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype of a token file: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_to_file(texts: Iterable[str], tokenizer: Tokenizer, path: str | os.PathLike, *,
                   log: Callable[[str], None] = print) -> dict:
    """Encode documents into a flat token file at `path` (each doc's tokens then eos_id) and its
    metadata at `path`.json; both replace any old file atomically. Returns the metadata:
    {"tokens", "bytes" (UTF-8 bytes of the texts), "documents", "dtype", "tokenizer", "fingerprint"}."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a titans Tokenizer, got {type(tokenizer).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    tokens = n_bytes = documents = 0
    with _atomic_file(path, "wb") as f:
        for batch in _batches(texts):
            stream = tokenizer.encode_documents(batch)
            stream.astype(dtype).tofile(f)
            tokens += len(stream)
            n_bytes += sum(len(text.encode("utf-8")) for text in batch)
            documents += len(batch)
    meta = {"tokens": tokens, "bytes": n_bytes, "documents": documents, "dtype": dtype.name,
            "tokenizer": tokenizer.name, "fingerprint": tokenizer.fingerprint}
    _write_atomic(_meta_path(path), json.dumps(meta, indent=2) + "\n")
    log(f"tokens: {documents} documents, {n_bytes / 1e6:.1f} MB -> {tokens} {tokenizer.name} tokens "
        f"({n_bytes / max(tokens, 1):.2f} bytes/token) in {time.perf_counter() - start:.1f} s: {path}")
    return meta


def open_tokens(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, dict]:
    """Open a token file written by encode_to_file: (read-only memmap (tokens,), metadata).
    If `tokenizer` is given, its fingerprint must match the one the file was written with."""
    path = Path(path)
    meta_path = _meta_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path} (write one with encode_to_file)")
    if not meta_path.is_file():
        raise FileNotFoundError(f"token file {path} has no metadata file {meta_path}; rewrite it with "
                                f"encode_to_file")
    meta = _read_json(meta_path, required=("tokens", "dtype", "tokenizer", "fingerprint"))
    if not isinstance(meta["tokens"], int) or meta["tokens"] < 0:
        raise ValueError(f"{meta_path}: 'tokens' must be a count >= 0, got {meta['tokens']!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: unknown dtype {meta['dtype']!r}; expected 'uint16' or 'uint32'")
    dtype = np.dtype(meta["dtype"])
    expected = meta["tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"token file {path} has {path.stat().st_size} bytes but its metadata says "
                         f"{meta['tokens']} {dtype.name} tokens ({expected} bytes); the file is truncated "
                         f"or stale: rewrite it with encode_to_file")
    if tokenizer is not None and tokenizer.fingerprint != meta["fingerprint"]:
        raise ValueError(f"token file {path} was written with tokenizer {meta['tokenizer']!r} (fingerprint "
                         f"{meta['fingerprint'][:12]}) but {tokenizer.name!r} has fingerprint "
                         f"{tokenizer.fingerprint[:12]}; re-encode the corpus")
    if meta["tokens"] == 0:  # np.memmap cannot map an empty file
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
        return tokens, meta
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["tokens"],)), meta


# --- helpers ---------------------------------------------------------------------------------------


class _Counter:
    """Iterate texts, checking each is a str and counting documents and UTF-8 bytes on the way."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.documents, self.bytes = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            _checked_text(text)
            self.documents += 1
            self.bytes += len(text.encode("utf-8"))
            yield text


def _checked_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    return text


def _checked_texts(texts: list[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single str (wrap it in a list)")
    texts = list(texts)
    for text in texts:
        _checked_text(text)
    return texts


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """Group texts into lists of about _BATCH_CHARS characters."""
    if isinstance(texts, str):
        raise TypeError("expected an iterable of texts, got a single str (wrap it in a list)")
    batch, size = [], 0
    for text in texts:
        batch.append(_checked_text(text))
        size += len(text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bpe_fingerprint(hf_tokenizer) -> str:
    """sha256 of the vocabulary, merges and added tokens in a canonical JSON form."""
    data = json.loads(hf_tokenizer.to_str())
    canonical = {"vocab": data["model"]["vocab"], "merges": data["model"]["merges"],
                 "added": sorted((t["id"], t["content"]) for t in data["added_tokens"])}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_json(path: Path, required: tuple[str, ...]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rebuild") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path} is missing {', '.join(missing)}; expected keys {', '.join(required)}")
    return data


@contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO]:
    """A temp file next to `path`, moved onto `path` if the block succeeds and removed if it raises."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_atomic(path: Path, text: str) -> None:
    with _atomic_file(path, "w") as f:
        f.write(text)
