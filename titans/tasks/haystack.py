"""Long contexts of a target token length: filler text with sentences inserted at sentence boundaries.

    context, offsets, meta = fit_context(book_text, 16_000, ["The pass key is 123."], [0.5], question,
                                         tokenizer=ByteTokenizer(), start=0.3)

The filler is the haystack text read from a start offset (snapped to a sentence start); a haystack
shorter than needed is cycled (copies joined by `joiner`) and `meta["haystack_cycled"]` says so.
The filler is cut at a word boundary so that `context + question` has between `length - TOLERANCE`
and `length` tokens. Every step is linear in the length: 1M byte tokens take tens of milliseconds.
"""

from __future__ import annotations

import math
import re

from titans.data.tokenizer import Tokenizer

TOLERANCE = 32  # tokens: a fitted prompt has length - TOLERANCE <= n <= length tokens
_MAX_FITS = 8  # re-fits of the filler length; bytes converge in 1-2, BPE in 2-3
_MAX_STARTS = 4  # start offsets tried when one start's word boundaries skip the target window

# An insertion point: the first character after sentence-ending punctuation (and closing quotes)
# plus whitespace, or the first non-blank character of a line. Both follow whitespace, so an
# inserted sentence never splits a word.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=\S)|\n\s*(?=\S)")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\Z")


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of `text`; for bytes without building the id list."""
    if getattr(tokenizer, "kind", None) == "byte":
        return len(text.encode("utf-8"))
    return len(tokenizer.encode(text))


def nearest_boundary(text: str, target: int) -> int:
    """The insertion point of `text` nearest to character index `target` (ties: the earlier one).

    0 is always an insertion point, and so is len(text) when the text ends a sentence. Searches a
    window around `target` that widens until it holds a boundary, so the cost is local."""
    n = len(text)
    target = min(max(int(target), 0), n)
    candidates = [0] + ([n] if n and _SENTENCE_END.search(text, max(0, n - 8)) else [])
    width = 256
    while True:
        lo, hi = max(0, target - width), min(n, target + width)
        # start a little early so a match that began before `lo` is still seen whole
        found = [m.end() for m in _BOUNDARY.finditer(text, max(0, lo - 16), min(n, hi + 16))
                 if lo <= m.end() <= hi]
        if found or (lo == 0 and hi == n):
            break
        width *= 4
    return min(candidates + found, key=lambda p: (abs(p - target), p))


def insert_sentences(text: str, sentences: list[str], positions: list[int]) -> tuple[str, list[int]]:
    """Insert sentences[i] at insertion point positions[i] of `text` (one pass, linear).

    A sentence inserted at a line start goes on its own line ("sentence\\n"), elsewhere it is followed
    by a space; at the very end of the text it is preceded by a space. Sentences at the same point
    keep their list order. Returns the new text and each sentence's character offset in it."""
    order = sorted(range(len(sentences)), key=lambda i: (positions[i], i))
    pieces: list[str] = []
    offsets = [0] * len(sentences)
    prev = size = 0
    for i in order:
        p = positions[i]
        pieces.append(text[prev:p])
        size += p - prev
        prev = p
        if p == len(text) and p > 0:
            piece, offsets[i] = " " + sentences[i], size + 1
        else:
            k = p
            while k > 0 and text[k - 1].isspace():
                k -= 1
            piece, offsets[i] = sentences[i] + ("\n" if "\n" in text[k:p] else " "), size
        pieces.append(piece)
        size += len(piece)
    pieces.append(text[prev:])
    return "".join(pieces), offsets


def _filler(source: str, joiner: str, start: int, n_chars: int) -> str:
    """About n_chars characters of `source` read cyclically from `start`, cut back to a word boundary."""
    if n_chars <= 0:
        return ""
    unit = source + joiner
    head = unit[start:]
    copies = max(0, math.ceil((n_chars + 1 - len(head)) / len(unit)))
    stream = head + unit * copies
    lo = max(0, n_chars - 32)  # a run of 32+ non-blank characters is cut where it stands
    cut = max(stream.rfind(" ", lo, n_chars + 1), stream.rfind("\n", lo, n_chars + 1))
    return stream[:n_chars if cut < 0 else cut].rstrip()


def fit_context(haystack: str, length: int, sentences: list[str], depths: list[float], question: str, *,
                tokenizer: Tokenizer, start: float, joiner: str = "\n\n",
                keep_order: bool = False) -> tuple[str, list[int], dict]:
    """Filler from `haystack` with `sentences` inserted, sized so `context + question` fits `length`.

    depths[i] in [0, 1] places sentences[i] at the insertion point nearest to that fraction of the
    filler. keep_order: sentences must appear in list order (bAbI facts), so a position is never
    before the previous one. start in [0, 1): where in the haystack the filler begins (seeded by the
    caller). Returns (context, character offsets of the sentences in it, meta) where meta has
    length_tokens (of context + question), length_target, haystack_offset (where in `haystack` the
    filler starts), haystack_chars,
    haystack_cycled (the haystack was shorter than the filler and was repeated from the start) and
    haystack_passes (filler length / haystack length).
    """
    source = haystack.strip()
    lead = len(haystack) - len(haystack.lstrip())
    fixed = count_tokens(tokenizer, question) + sum(count_tokens(tokenizer, s + " ") for s in sentences)
    if fixed >= length:
        raise ValueError(f"length={length} is too short: the question and the {len(sentences)} inserted "
                         f"sentence(s) alone take about {fixed} tokens")
    sample = source[:20_000]
    chars_per_token = len(sample) / max(1, count_tokens(tokenizer, sample))
    n_chars = int((length - fixed) * chars_per_token)
    # read without wrapping when the haystack is long enough: start anywhere that leaves room
    room = len(source) - int(n_chars * 1.05) - 256
    offset = nearest_boundary(source, int(start * (room if room > 0 else len(source))))

    best = None
    for move in range(_MAX_STARTS):
        if move:
            # this start's word boundaries skip over the target window (e.g. a line padded with a
            # long run of spaces): read from the next sentence start instead
            offset = nearest_boundary(source, (offset + 64 + 211 * move) % len(source))
        fit, n = _fit_from(source, joiner, offset, n_chars, length, sentences, depths, question,
                           tokenizer=tokenizer, keep_order=keep_order)
        if fit is not None and (best is None or fit[0] > best[0]):
            best = (*fit, offset)
        if best is not None and best[0] >= length - TOLERANCE:
            break
    if best is None or best[0] < length - max(TOLERANCE, length // 100):
        raise RuntimeError(f"could not fit the context to {length} tokens (last try: {n}); the tokenizer's "
                           f"token counts are far from additive over this text")
    n, context, offsets, filler_chars, offset = best
    meta = {"length_tokens": n, "length_target": length, "haystack_offset": lead + offset,
            "haystack_chars": len(source), "haystack_cycled": offset + filler_chars > len(source),
            "haystack_passes": round(filler_chars / len(source), 3)}
    return context, offsets, meta


def _fit_from(source: str, joiner: str, offset: int, n_chars: int, length: int, sentences: list[str],
              depths: list[float], question: str, *, tokenizer: Tokenizer, keep_order: bool):
    """Re-fit the filler length read from `offset` up to _MAX_FITS times. Returns (best, n): best is
    (tokens, context, offsets, filler chars) of the longest fit within `length`, or None; n is the
    last try's token count."""
    best = None
    for _ in range(_MAX_FITS):
        filler = _filler(source, joiner, offset, n_chars)
        positions = [nearest_boundary(filler, round(d * len(filler))) for d in depths]
        if keep_order:
            for i in range(1, len(positions)):
                positions[i] = max(positions[i], positions[i - 1])
        context, offsets = insert_sentences(filler, sentences, positions)
        context = context.rstrip()
        n = count_tokens(tokenizer, context + question)
        if n <= length and (best is None or n > best[0]):
            best = (n, context, offsets, len(filler))
        if length - TOLERANCE <= n <= length:
            break
        # aim a little below the target: the word-boundary cut only ever shortens
        n_chars = max(0, n_chars + round((length - TOLERANCE // 4 - n) * len(context + question) / max(n, 1)))
    return best, n
