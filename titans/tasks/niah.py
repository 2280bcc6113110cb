"""Needle in a haystack in the style of RULER (Hsieh et al. 2024), the S-NIAH tasks of the Titans paper.

    ex = make_niah("single_2", 16_000, 0.5, haystack=book_text, seed=3)
    ex.prompt   # "...book text... One of the special magic numbers for quiet-river is: 4817263. ..."
                # "\\nQuestion: What is the special magic number for quiet-river?\\nAnswer:"
    ex.answer   # " 4817263"

kinds (values; filler):
  single_1  a 5-digit pass key in repeated noise sentences (the haystack argument is not used):
            "The pass key is 71432. Remember it. 71432 is the pass key."
  single_2  a 7-digit number for a word key, in real text (haystack required):
            "One of the special magic numbers for quiet-river is: 4817263."
  single_3  a UUID for a word key, in real text: "One of the special magic uuids for quiet-river is: <uuid>."
Variants of single_2 / single_3 as in RULER: n_keys > 1 (multi-key: distractor needles of the same
form with other keys), n_values > 1 (multi-value: every key has n_values values, all asked for),
n_queries > 1 (multi-query: several keys asked for, all their values expected).

Placement: the first needle of the first queried key goes at `depth` (None: a seeded random depth);
every other needle at a seeded random depth. Depth is a fraction of the filler; each needle goes at
the sentence boundary nearest to it. There is no instruction preamble (RULER's "Some special magic
numbers are hidden..." line): the context is filler and needles only, so depth 0 is offset 0.
"""

from __future__ import annotations

import random
import uuid

from titans.data.tokenizer import Tokenizer

from .common import Example, check_depth, check_haystack, check_int, check_tokenizer
from .haystack import fit_context

KINDS = ("single_1", "single_2", "single_3")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MAX_NEEDLES = 256

# Word keys are "adjective-noun" pairs, like RULER's word keys: 48 x 48 = 2304 distinct keys.
_ADJECTIVES = (
    "quiet", "bright", "ancient", "hollow", "gentle", "silver", "frozen", "hidden", "golden", "rapid",
    "lonely", "crooked", "humble", "scarlet", "wooden", "velvet", "distant", "eager", "fragile", "hungry",
    "narrow", "polite", "restless", "shallow", "stubborn", "tender", "vivid", "weary", "amber", "brave",
    "clever", "dusty", "faint", "glossy", "hasty", "idle", "jolly", "lucky", "mellow", "noble",
    "plain", "rusty", "sturdy", "tidy", "urban", "vacant", "wild", "young",
)
_NOUNS = (
    "river", "lantern", "harbor", "meadow", "falcon", "compass", "orchard", "engine", "pillow", "canyon",
    "violin", "ladder", "garden", "island", "kettle", "marble", "needle", "pepper", "saddle", "thimble",
    "tunnel", "walnut", "anchor", "basket", "candle", "dragon", "feather", "glacier", "hammer", "jacket",
    "kitten", "lemon", "mirror", "nutmeg", "oyster", "parrot", "quarry", "ribbon", "shadow", "tiger",
    "valley", "window", "beacon", "cellar", "dolphin", "forest", "helmet", "magnet",
)


def _task_name(kind: str, n_keys: int, n_values: int, n_queries: int) -> str:
    if n_keys == n_values == n_queries == 1:
        return f"niah_{kind}"
    variant = "multiquery" if n_queries > 1 else "multivalue" if n_values > 1 else "multikey"
    return f"niah_{variant}" + ("_uuid" if kind == "single_3" else "")


def _value(kind: str, rng: random.Random) -> str:
    if kind == "single_1":
        return str(rng.randrange(10_000, 100_000))
    if kind == "single_2":
        return str(rng.randrange(1_000_000, 10_000_000))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))  # seeded, unlike uuid4()


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_niah(kind: str, length: int, depth: float | None = None, *, haystack: str | None = None,
              tokenizer: Tokenizer | None = None, seed: int = 0, n_keys: int = 1, n_values: int = 1,
              n_queries: int = 1) -> Example:
    """A needle task whose prompt (context + question) has `length` tokens of `tokenizer` (default:
    bytes), within haystack.TOLERANCE below, never above.

    kind: "single_1" | "single_2" | "single_3" (see the module docstring). depth in [0, 1] or None.
    haystack: real text for single_2 / single_3 (cycled when shorter than needed); ignored by single_1.
    Deterministic in all arguments. meta: kind, seed, depth (of the first queried needle; depth_drawn:
    it was drawn from the seed), keys, values ({key: [values]}),
    query_keys, answers, needles, needle_offsets (character offsets in the context, in the order of
    `needles`), needle_depths (offset / context length), plus fit_context's length and haystack fields.
    """
    where = "make_niah"
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_int(where, "length", length, 1)
    depth = check_depth(where, depth)
    check_int(where, "seed", seed, 0)
    check_int(where, "n_keys", n_keys, 1, MAX_NEEDLES)
    check_int(where, "n_values", n_values, 1, MAX_NEEDLES)
    check_int(where, "n_queries", n_queries, 1, n_keys)
    if n_keys * n_values > MAX_NEEDLES:
        raise ValueError(f"{where}: n_keys * n_values must be <= {MAX_NEEDLES}, got {n_keys} * {n_values}")
    if kind == "single_1" and (n_keys, n_values, n_queries) != (1, 1, 1):
        raise ValueError(f"{where}: the pass key (kind 'single_1') has no key to vary; n_keys, n_values and "
                         f"n_queries must be 1, got {n_keys}, {n_values}, {n_queries} "
                         f"(use kind 'single_2' or 'single_3' for multi-key / multi-value / multi-query)")
    if kind != "single_1":
        haystack = check_haystack(f"{where}(kind={kind!r})", haystack)
    tokenizer = check_tokenizer(where, tokenizer)

    rng = random.Random(seed)
    picks = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), n_keys)
    keys = [f"{_ADJECTIVES[i // len(_NOUNS)]}-{_NOUNS[i % len(_NOUNS)]}" for i in picks]
    seen: set[str] = set()
    values: dict[str, list[str]] = {}
    for key in keys:
        values[key] = []
        while len(values[key]) < n_values:
            value = _value(kind, rng)
            if value not in seen:
                seen.add(value)
                values[key].append(value)
    query_keys = keys[:n_queries]

    noun = {"single_1": "pass key", "single_2": "number", "single_3": "uuid"}[kind]
    needles, owners = [], []
    for key in keys:
        for value in values[key]:
            if kind == "single_1":
                needles.append(f"The pass key is {value}. Remember it. {value} is the pass key.")
            else:
                needles.append(f"One of the special magic {noun}s for {key} is: {value}.")
            owners.append((key, value))
    depths = [rng.random() if depth is None or i > 0 else depth for i in range(len(needles))]

    if kind == "single_1":
        question = "\nQuestion: What is the pass key?\nAnswer:"
    elif n_values == 1 and n_queries == 1:
        question = f"\nQuestion: What is the special magic {noun} for {keys[0]}?\nAnswer:"
    else:
        question = f"\nQuestion: What are all the special magic {noun}s for {_join(query_keys)}?\nAnswer:"

    source, joiner = (NOISE, " ") if kind == "single_1" else (haystack, "\n\n")
    context, offsets, fit = fit_context(source, length, needles, depths, question, tokenizer=tokenizer,
                                        start=rng.random(), joiner=joiner)
    # answers: queried keys in question order, each key's values in context order
    where_is = {owner: off for owner, off in zip(owners, offsets)}
    answers = [v for key in query_keys for v in sorted(values[key], key=lambda v: where_is[(key, v)])]
    meta = {
        "kind": kind, "seed": seed, "depth": depths[0], "depth_drawn": depth is None,
        "keys": keys, "values": values, "query_keys": query_keys,
        "answers": answers, "needles": needles, "needle_offsets": offsets,
        "needle_depths": [round(off / len(context), 4) for off in offsets],
        "filler": "noise" if kind == "single_1" else "haystack", **fit,
    }
    return Example(_task_name(kind, n_keys, n_values, n_queries), context, question,
                   " " + ", ".join(answers), meta)
