"""What every text task returns (an Example), how an answer is scored, and argument checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Example:
    """One prompt with its expected continuation.

    The prompt is `context + question`; `question` starts with a newline and ends with "Answer:"
    (no trailing space), and `answer` is what should follow, *with* its leading space, e.g.
    " 7341982", so `prompt + answer` reads naturally and tokenizes as the model saw it in training.
    `meta["answers"]` lists the values (no leading space) that must all be produced: one for
    single-answer tasks, several for multi-value / multi-query needles.
    """

    task: str
    context: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.question


def _word(value: str) -> str:
    # a value counts only as a whole word: "71432" is not found in "714321" nor in "a71432"
    return r"(?<![0-9A-Za-z])" + re.escape(value) + r"(?![0-9A-Za-z])"


def answer_in(values: list[str], generated: str) -> bool:
    """True when every value occurs in `generated` as a whole word (any order, anything between)."""
    if isinstance(values, str):
        raise ValueError("answer_in: values must be a list of strings, got a single str")
    return all(re.search(_word(v.strip()), generated) for v in values)


def score(example: Example, generated: str) -> bool:
    """Exact match of the model's continuation against the example.

    Single answer: after stripping leading whitespace, `generated` must begin with the answer and
    then end or go on with a non-alphanumeric character, so a model that keeps talking after the
    right answer ("71432. Next...") is not penalised, while "714321" or "bathrooms" is wrong.
    Several answers (multi-value / multi-query): all must appear, as whole words, in any order.
    """
    answers = example.meta.get("answers") or [example.answer.strip()]
    if len(answers) == 1:
        return re.match(r"\s*" + _word(answers[0].strip()), generated) is not None
    return answer_in(answers, generated)


def check_int(where: str, name: str, value, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi], else a ValueError naming the argument, the range and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        expected = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}")
    return value


def check_depth(where: str, depth) -> float | None:
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"{where}: depth must be a float in [0, 1] (or None for a seeded random depth), "
                         f"got {depth!r}")
    return float(depth)


def check_tokenizer(where: str, tokenizer):
    """The tokenizer, ByteTokenizer() for None; anything without an encode(str) method is refused."""
    if tokenizer is None:
        from titans.data.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if isinstance(tokenizer, (str, bytes)) or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"{where}: tokenizer must be a titans.data.tokenizer.Tokenizer (or None for bytes), "
                         f"got {tokenizer!r:.60}")
    return tokenizer


def check_haystack(where: str, haystack) -> str:
    if not isinstance(haystack, str) or not haystack.strip():
        got = type(haystack).__name__
        if isinstance(haystack, str):
            got = f"a blank str of length {len(haystack)}"
        raise ValueError(f"{where}: haystack must be a non-empty str of real text (e.g. a held-out book: "
                         f"titans.data.corpus.load_documents(data_dir, 'test')[i].text), got {got}")
    return haystack
