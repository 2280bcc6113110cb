"""Multi-query associative recall (MQAR) from Zoology (Arora et al. 2023), on token ids.

    inputs, targets = make_mqar(64, 256, 16, vocab_size=8192, seed=0)   # (64, 256) each

One sequence of length T:
    k1 v1 k2 v2 ... kN vN | 0 0 kq vq 0 0 0 kq' vq' 0 ...
The N key-value pairs come first; then n_queries of the keys (distinct, in random order), each
followed by its value, at uniformly random even offsets of the rest (Zoology draws the offsets from
a power law that favours early ones). Every other position holds the filler id 0, which is never a
key or a value (Zoology optionally replaces it by random tokens; plain zeros keep every non-zero
token after the pairs part of a query). Keys come from [1, vocab_size // 2), values from
[vocab_size // 2, vocab_size), both without repeats within a sequence.

targets[b, t] = inputs[b, t + 1] where inputs[b, t] is a queried key (so the model is scored on
predicting the value), -100 (ignored by cross_entropy) everywhere else.
"""

from __future__ import annotations

import torch

from .common import check_int

IGNORE = -100


def make_mqar(batch: int, seq_len: int, n_pairs: int, *, vocab_size: int, n_queries: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): LongTensors (batch, seq_len) on the CPU, deterministic in all arguments.

    n_queries defaults to n_pairs (every key is asked once, as in Zoology)."""
    where = "make_mqar"
    check_int(where, "batch", batch, 1)
    check_int(where, "n_pairs", n_pairs, 1)
    check_int(where, "vocab_size", vocab_size, 4)
    n_queries = check_int(where, "n_queries", n_pairs if n_queries is None else n_queries, 1, n_pairs)
    check_int(where, "seq_len", seq_len, 1)
    if seq_len < 2 * n_pairs + 2 * n_queries:
        raise ValueError(f"{where}: seq_len must be >= 2 * n_pairs + 2 * n_queries = "
                         f"{2 * n_pairs + 2 * n_queries} (the pairs, then a key and value per query), "
                         f"got {seq_len}")
    check_int(where, "seed", seed, 0)
    half = vocab_size // 2
    if n_pairs > half - 1:
        raise ValueError(f"{where}: n_pairs must be <= {half - 1} (distinct keys in [1, vocab_size // 2) "
                         f"for vocab_size={vocab_size}), got {n_pairs}")

    g = torch.Generator().manual_seed(seed)
    # k distinct items of n in random order: the top k of n uniform draws
    pick = lambda n, k: torch.rand(batch, n, generator=g).topk(k, dim=1).indices
    keys = pick(half - 1, n_pairs) + 1  # (B, N)
    values = pick(vocab_size - half, n_pairs) + half  # (B, N)
    asked = pick(n_pairs, n_queries)  # (B, Q): which pairs are queried
    slots = (seq_len - 2 * n_pairs) // 2  # query slots of two positions after the pairs
    pos = 2 * n_pairs + 2 * pick(slots, n_queries)  # (B, Q): position of each query key

    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    inputs[:, 0:2 * n_pairs:2] = keys
    inputs[:, 1:2 * n_pairs:2] = values
    asked_keys, asked_values = keys.gather(1, asked), values.gather(1, asked)
    inputs.scatter_(1, pos, asked_keys)
    inputs.scatter_(1, pos + 1, asked_values)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, pos, asked_values)
    return inputs, targets
