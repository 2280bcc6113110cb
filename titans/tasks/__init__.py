"""Synthetic evaluation tasks: needles in a haystack (RULER style), bAbI / BABILong QA1-QA5, and MQAR.

Text tasks return an `Example` (prompt = context + question, answer with a leading space) scored by
`score`. `TASKS` maps each text task name to `make(length, *, haystack, tokenizer, seed, depth)`,
so an evaluation loop can run them all the same way:

    for name, make in TASKS.items():
        ex = make(16_000, haystack=book_text, tokenizer=tok, seed=0, depth=0.5)
        correct = score(ex, generate(model, ex.prompt))

`depth` places the needle of the niah tasks (None: seeded random); BABILong tasks scatter their
facts at seeded random positions and ignore it. niah_single_1 uses noise filler, not the haystack.
"""

from __future__ import annotations

from collections.abc import Callable

from titans.data.tokenizer import Tokenizer

from .babilong import make_babi, make_babilong
from .common import Example, answer_in, check_depth, score
from .haystack import TOLERANCE, count_tokens
from .mqar import make_mqar
from .niah import make_niah

TaskFn = Callable[..., Example]


def _niah(kind: str, **counts: int) -> TaskFn:
    def make(length: int, *, haystack: str | None = None, tokenizer: Tokenizer | None = None, seed: int = 0,
             depth: float | None = None) -> Example:
        return make_niah(kind, length, depth, haystack=haystack, tokenizer=tokenizer, seed=seed, **counts)
    return make


def _babilong(qa: int) -> TaskFn:
    def make(length: int, *, haystack: str, tokenizer: Tokenizer | None = None, seed: int = 0,
             depth: float | None = None) -> Example:
        check_depth(f"babilong_qa{qa}", depth)  # accepted for a uniform signature; facts go at random depths
        return make_babilong(qa, length, haystack=haystack, tokenizer=tokenizer, seed=seed)
    return make


# RULER's multi-needle settings: 4 keys (MK), 4 values (MV), 4 of 4 keys asked (MQ)
TASKS: dict[str, TaskFn] = {
    "niah_single_1": _niah("single_1"),
    "niah_single_2": _niah("single_2"),
    "niah_single_3": _niah("single_3"),
    "niah_multikey": _niah("single_2", n_keys=4),
    "niah_multivalue": _niah("single_2", n_values=4),
    "niah_multiquery": _niah("single_2", n_keys=4, n_queries=4),
    **{f"babilong_qa{qa}": _babilong(qa) for qa in range(1, 6)},
}

__all__ = ["TASKS", "TOLERANCE", "Example", "answer_in", "count_tokens", "make_babi", "make_babilong",
           "make_mqar", "make_niah", "score"]
