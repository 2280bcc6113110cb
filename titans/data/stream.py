"""From the corpus to training batches: tokenise each split once into a flat token file, then draw
windows of seq_len + 1 tokens.

Training windows for (step, micro-step) come from a generator seeded by (seed, step, micro): the
batch depends on nothing but those numbers, so a resumed run sees exactly the batches the
uninterrupted run would have seen, and N processes each taking their slice of the global batch
see the same samples as one process taking all of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import TitansError
from .corpus import CorpusError, build_corpus, load_documents
from .tokenizer import Tokenizer, encode_to_file, get_tokenizer, open_tokens


@dataclass
class Split:
    """A split as one token stream: tokens (N,) memmap; bytes: UTF-8 bytes of its text."""

    name: str
    tokens: np.ndarray
    bytes: int

    @property
    def bits_per_token_to_bpb(self) -> float:
        """Multiply a loss in bits per token by this to get bits per byte."""
        return len(self.tokens) / self.bytes


def prepare(data_dir: str | Path, sources, tokenizer_spec: str, seq_len: int, *,
            log=print) -> tuple[Tokenizer, dict[str, Split]]:
    """Build the corpus if needed (cached), get the tokenizer (BPE: trained on the train split once,
    cached) and the tokenised train / val / test splits (cached, keyed by corpus and tokenizer)."""
    data_dir = Path(data_dir)
    try:
        manifest = build_corpus(data_dir, sources, log=log)
    except CorpusError as e:
        raise TitansError(str(e)) from None
    key = str(manifest.get("key", "corpus"))[:10]

    def train_texts():
        return (d.text for d in load_documents(data_dir, "train"))

    tokenizer = get_tokenizer(tokenizer_spec, train_texts, data_dir / "tokenizers" / key, log=log)
    folder = data_dir / "tokens" / f"{key}-{tokenizer.name}-{tokenizer.fingerprint[:10]}"
    splits = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.bin"
        if not path.exists():
            docs = load_documents(data_dir, split)
            encode_to_file((d.text for d in docs), tokenizer, path, log=log)
        tokens, meta = open_tokens(path)
        splits[split] = Split(split, tokens, max(1, int(meta["bytes"])))
    for split in ("train", "val"):
        if len(splits[split].tokens) < seq_len + 2:
            raise TitansError(f"the {split} split of the corpus in {data_dir} has "
                              f"{len(splits[split].tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                              "add sources (titans data build --sources all) or lower data.seq_len")
    return tokenizer, splits


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def train_batch(split: Split, seq_len: int, batch_size: int, *, seed: int, step: int, micro: int = 0,
                accum: int = 1, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, seq_len) long: this rank's share of micro-step `micro`
    of the global batch of batch_size * accum * world windows drawn for (seed, step). The global
    batch is the same for every split into processes and micro-steps of the same total size."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(split.tokens) - seq_len - 1, size=batch_size * accum * world)
    block = micro * world + rank
    return _windows(split.tokens, starts[block * batch_size:(block + 1) * batch_size], seq_len)


def eval_windows(split: Split, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets of n_windows windows spread evenly over the split (fixed, so evaluations at
    different steps and in different runs score the same text)."""
    last = len(split.tokens) - seq_len - 1
    n = max(1, min(n_windows, last // seq_len + 1))
    return np.linspace(0, last, n).astype(np.int64)


@torch.no_grad()
def evaluate_loss(model, split: Split, seq_len: int, n_windows: int, batch_size: int,
                  device: torch.device, *, rank: int = 0, world: int = 1, autocast=None) -> tuple[float, int]:
    """Mean next-token loss (nats) over this rank's share of the evaluation windows, and the number
    of tokens it scored."""
    starts = eval_windows(split, seq_len, n_windows)[rank::world]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = _windows(split.tokens, starts[i:i + batch_size], seq_len)
        x, y = x.to(device), y.to(device)
        with autocast():
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    return total / max(count, 1), count


def bits_per_byte(loss_nats: float, split: Split) -> float:
    return loss_nats / math.log(2) * split.bits_per_token_to_bpb


class TaskMix:
    """Replace a fraction of each global batch with generated task examples (titans.tasks: needles,
    bAbI facts in book text), for fine-tuning on retrieval at the training length.

    The haystack is the *train* split, never the held-out books the evaluation uses. Which rows of
    the global batch are task rows, and each row's task, depth and seed, are drawn from (seed, step),
    so resume and data parallelism stay exact. Each row is an example of seq_len + 1 tokens
    (left-padded with the document separator; its prompt seq_len - 16 tokens, or with lengths
    "varied" a length drawn per row between about half of that and all of it) whose answer is
    followed by the separator, so the model learns where an answer ends; with loss "answer" only
    the answer tokens and that separator are scored, with "all" every token is. With place "random"
    the row's padding is split at random between before the example and after it, so the answer does
    not always end the row (a model with segments, MAC, otherwise sees every answer at one place in
    its segment)."""

    def __init__(self, names: list[str], haystack: str, tokenizer, seq_len: int, fraction: float,
                 loss: str = "answer", lengths: str = "fixed", place: str = "end"):
        from ..tasks import TASKS

        unknown = [n for n in names if n not in TASKS]
        if unknown or not names:
            raise TitansError(f"data.tasks: unknown task(s) {unknown or names}; "
                              f"choose from {', '.join(TASKS)}")
        if not 0 < fraction <= 1:
            raise TitansError(f"data.task_mix must lie in (0, 1], got {fraction}")
        if loss not in ("answer", "all"):
            raise TitansError(f"data.task_loss must be 'answer' or 'all', got {loss!r}")
        if lengths not in ("fixed", "varied"):
            raise TitansError(f"data.task_lengths must be 'fixed' or 'varied', got {lengths!r}")
        if place not in ("end", "random"):
            raise TitansError(f"data.task_place must be 'end' or 'random', got {place!r}")
        self.makers = [TASKS[n] for n in names]
        self.names, self.haystack, self.tokenizer = names, haystack, tokenizer
        self.seq_len, self.fraction, self.loss = seq_len, fraction, loss
        self.lengths, self.place = lengths, place
        self.longest = seq_len - 16  # prompt tokens; the rest of the row is for the answer
        for i in range(len(names)):  # a task that cannot fit seq_len fails here, not at some step
            for seed in range(3):
                self._make(i, seed, depth=0.5)
        # varied: each row's prompt length is drawn from [shortest, longest], where shortest is half
        # the row or the shortest prompt the task fits in (plus a margin for its longer values)
        self.shortest = [self._shortest(i) for i in range(len(names))] if lengths == "varied" else None

    def _shortest(self, i: int) -> int:
        lo, hi = 1, self.longest  # hi fits (checked above); find the smallest length that fits
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                for seed in range(3):
                    self._example(i, mid, seed, 0.5)
                hi = mid
            except ValueError:
                lo = mid + 1
        return min(self.longest, max(self.seq_len // 2, lo + 8))

    def _example(self, i: int, length: int, seed: int, depth: float):
        """Task i's example of a prompt of `length` tokens (ValueError if it does not fit)."""
        return self.makers[i](length, haystack=self.haystack, tokenizer=self.tokenizer, seed=seed,
                              depth=depth)

    def _make(self, i: int, seed: int, depth: float, length: int | None = None):
        try:
            return self._example(i, length or self.longest, seed, depth)
        except ValueError as e:
            if length is not None:  # a drawn length too short for this example: the longest fits
                return self._make(i, seed, depth)
            raise TitansError(f"data.tasks: {self.names[i]} does not fit data.seq_len = {self.seq_len} "
                              f"({e}); raise data.seq_len or drop the task") from None

    def example(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(seed)
        i = int(rng.integers(len(self.makers)))
        tok = self.tokenizer
        ex_seed, depth = int(rng.integers(2 ** 31)), float(rng.random())
        length = None if self.shortest is None else int(rng.integers(self.shortest[i], self.longest + 1))
        ex = self._make(i, ex_seed, depth, length)
        # the answer ends with the document separator: the model learns to stop after it (greedy
        # evaluation stops there; a model never shown an end goes on with more digits or letters,
        # and "4975333" is not the pass key 49753)
        prompt, ans = tok.encode(ex.prompt), tok.encode(ex.answer) + [tok.eos_id]
        ids = (prompt + ans)[-(self.seq_len + 1):]
        pad = self.seq_len + 1 - len(ids)
        after = int(rng.integers(pad + 1)) if self.place == "random" else 0
        ids = torch.tensor([tok.eos_id] * (pad - after) + ids + [tok.eos_id] * after)
        y = ids[1:].clone()
        if self.loss == "answer":  # the answer and its separator: y[end - len(ans):end]
            end = len(y) - after
            y[: end - len(ans)] = -100
            y[end:] = -100
        return ids[:-1], y

    def apply(self, x: torch.Tensor, y: torch.Tensor, *, seed: int, step: int, micro: int = 0,
              accum: int = 1, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap this rank's task rows of the global batch into (x, y) (batch_size, seq_len)."""
        b = x.shape[0]
        rng = np.random.default_rng([seed, step, 7])
        total = b * accum * world
        is_task = rng.random(total) < self.fraction
        seeds = rng.integers(0, 2 ** 62, size=total)
        block = micro * world + rank
        x, y = x.clone(), y.clone()
        for i in range(b):
            j = block * b + i
            if is_task[j]:
                x[i], y[i] = self.example(int(seeds[j]))
        return x, y
