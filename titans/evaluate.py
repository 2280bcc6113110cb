"""Evaluation on the model's streaming state: `titans eval --checkpoint PATH --task ... --lengths ...`.

Every input is fed in pieces (`piece` tokens at a time) with the recurrent state carried between
them, so a 1M-token haystack needs the memory of one piece plus the bounded state, never the whole
sequence (full attention, the Transformer++ baseline, keeps its whole key/value cache: its memory
grows with the length, as it should).

Tasks
  niah       S-NIAH-1/2/3 (pass-key in filler, number and UUID needles in held-out books), RULER style
  babilong   bAbI QA1-QA5 facts scattered through held-out books
  mqar       multi-query associative recall on token ids (Zoology)
  ppl        bits per byte on the held-out documents
  position   loss against position inside long held-out books (does the model use long context?)
  lambada    last-word accuracy on passages of held-out books (a stand-in for LAMBADA)
Accuracy tasks generate greedily after the prompt and score exact matches (titans.tasks.score).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .device import cpu_warning, pick_device
from .errors import TitansError

TASK_GROUPS = {
    "niah": ["niah_single_1", "niah_single_2", "niah_single_3"],
    "niah_multi": ["niah_multikey", "niah_multivalue", "niah_multiquery"],
    "babilong": [f"babilong_qa{i}" for i in range(1, 6)],
}
ALL_TASKS = ("niah", "niah_multi", "babilong", "mqar", "ppl", "position", "lambada")


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,16k,1m' -> [1024, 4096, 16384, 1048576] (k = 1024, m = 1024**2; plain ints allowed)."""
    out = []
    for item in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", item)
        if not m or int(m.group(1)) == 0:
            raise TitansError(f"--lengths: {item.strip()!r} is not a length; use e.g. 1k,4k,16k,1m or 2048")
        out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()])
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial share k / n (z = 1.96: 95%). Unlike k/n +- z SE it
    stays inside [0, 1] and is not empty at k = 0 or k = n, which matters for 30-example cells."""
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int):
        raise TitansError(f"wilson_interval: k and n must be integers, got k={k!r}, n={n!r}")
    if n < 1 or not 0 <= k <= n:
        raise TitansError(f"wilson_interval: expected 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not z > 0:
        raise TitansError(f"wilson_interval: z must be > 0, got {z!r}")
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def length_label(n: int) -> str:
    if n % (1024 ** 2) == 0:
        return f"{n // 1024 ** 2}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------- streaming primitives

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_ids(model, ids) -> torch.Tensor:
    """(T,) or a list -> (1, T); (B, T) stays (B, T). Long, on the model's device, ids in range."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() > 2:
        raise ValueError(f"evaluate: token ids must be (T,) or (B, T), got shape {tuple(ids.shape)}")
    ids = ids.reshape(1, -1) if ids.dim() < 2 else ids
    if ids.shape[1] == 0:
        raise ValueError("evaluate: the token sequence is empty")
    if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"evaluate: token ids must lie in [0, {model.config.vocab_size}); the tokenizer "
                         "does not match the model")
    return ids.to(_device(model))


@torch.no_grad()
def stream(model, ids, *, piece: int = 2048, state=None, losses: bool = False):
    """Feed ids (a list or (T,) tensor; or (B, T) rows streamed side by side) through the model in
    pieces, carrying the state.

    Returns (logits of the last position (V,) or, for (B, T) input, (B, V); state; per-token losses
    (T-1,) or None). The loss of token t+1 is taken from the logits at t, across piece boundaries
    (one row only)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    batched = ids.dim() == 2
    ids = _check_ids(model, ids)
    if losses and ids.shape[0] != 1:
        raise ValueError(f"evaluate.stream: losses=True takes one row, got {ids.shape[0]}")
    out_losses = [] if losses else None
    last = None  # (B, V): the logits of each row's last token so far
    for start in range(0, ids.shape[1], piece):
        chunk = ids[:, start:start + piece]
        logits, state = model(chunk, state)
        logits = logits.float()
        if losses:
            if last is not None:
                out_losses.append(F.cross_entropy(last[:1], chunk[0, :1], reduction="none"))
            if chunk.shape[1] > 1:
                out_losses.append(F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="none"))
        last = logits[:, -1]
    per_token = torch.cat(out_losses).cpu() if losses and out_losses else None
    return (last if batched else last[0]), state, per_token


@torch.no_grad()
def greedy_continue(model, logits, state, n_tokens: int, stop_ids=()):
    """n_tokens greedy tokens after `logits` on `state`, stopping early at a stop id: a list of ids
    for logits (V,), a list of such lists for logits (B, V) (rows decoded side by side; a row that
    has stopped is still fed, its output is not kept)."""
    single = logits.dim() == 1
    logits = logits[None] if single else logits
    outs: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = [False] * len(outs)
    for _ in range(n_tokens):
        nxt = logits.argmax(-1)
        for row, t in enumerate(nxt.tolist()):
            done[row] = done[row] or t in stop_ids
            if not done[row]:
                outs[row].append(t)
        if all(done):
            break
        logits, state = model(nxt[:, None], state)
        logits = logits[:, -1].float()
    return outs[0] if single else outs


def answer(model, tokenizer, prompt: str, max_new_tokens: int, *, piece: int = 2048,
           separator: bool = True) -> str:
    """The model's greedy continuation of prompt (read on the streaming state)."""
    return answers(model, tokenizer, [prompt], max_new_tokens, piece=piece, separator=separator)[0]


def answers(model, tokenizer, prompts: list[str], max_new_tokens, *, piece: int = 2048,
            separator: bool = True) -> list[str]:
    """Greedy continuations of several prompts, streamed side by side as one batch (much faster
    than one by one where small ops dominate, as with the memory's chunk loop on a CPU). Shorter
    prompts are left-padded with the document separator to the longest one, as training pads its
    task rows; a row's result differs from answering it alone only by those leading separators
    (none when all prompts have the same length, and none for a single prompt).
    separator: each prompt is read as a document, after the document separator, as every document
    of the training stream and every task row is (False: from position 0 with nothing before it).
    The tiny pass-key transformer of docs/results.md answers 60% of its training-length needles from
    position 0 and 75% after the separator.
    max_new_tokens: one count for all, or one per prompt (each row is cut to its own)."""
    if not prompts:
        raise ValueError("evaluate.answers: no prompts")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or min(limits) < 0:
        raise ValueError(f"evaluate.answers: max_new_tokens must be an int >= 0 or one per prompt "
                         f"({len(prompts)}), got {max_new_tokens}")
    logits, state = _read_prompts(model, tokenizer, prompts, piece, separator)
    outs = greedy_continue(model, logits.float(), state, max(limits), {tokenizer.eos_id})
    return [tokenizer.decode(o[:k]) for o, k in zip(outs, limits, strict=True)]


def _read_prompts(model, tokenizer, prompts: list[str], piece: int, separator: bool, align: int = 0,
                  answer_tokens: int = 0):
    """Stream the prompts side by side (left-padded with the separator to the longest, after one
    separator when `separator`; with `align`, padded further so that an answer of `answer_tokens`
    tokens ends a block of `align` tokens); the last position's logits (B, V) and the state after
    them."""
    lead = [tokenizer.eos_id] if separator else []
    encoded = [lead + tokenizer.encode(p) for p in prompts]
    n = max(len(e) for e in encoded)
    if align:
        n += -(n + answer_tokens) % align
    ids = torch.tensor([[tokenizer.eos_id] * (n - len(e)) + e for e in encoded], dtype=torch.long)
    logits, state, _ = stream(model, ids, piece=piece)
    return logits, state


@torch.no_grad()
def graded_answers(model, tokenizer, prompts: list[str], targets: list[str], *, piece: int = 2048,
                   separator: bool = True, align: int = 0) -> list[dict]:
    """Greedy answers plus how close each came, per prompt, read as `answers` reads them:
    `generated` (the greedy continuation, as many tokens as the target has plus 4), and, with the
    target's tokens fed back (teacher forcing) on the same state, `answer_nats` (summed next-token
    loss over the target's tokens), `answer_right` (how many of them are the argmax) and
    `answer_tokens`. A model that has learned an answer's format but not the needle scores zero
    exact matches and still shows here how far it got (a pass key's five digits: ln 10 nats and a
    tenth right each by chance).
    align > 0: more leading separators, so that each row's target ends a block of `align` tokens,
    as the answer ends a segment in every training row of `data.task_place=end` (a MAC model's
    answers depend on where they fall in its segment; see the pass-key probe in docs/results.md). Rows whose
    targets differ in length are read in separate batches, one per target length, since one shared
    padding can end only one length's targets at a block's end (a QA1 MAC answering " office" one
    token early fell from 0.75 to 8.5 nats)."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 0:
        raise ValueError(f"evaluate.graded_answers: align must be an int >= 0 (0: off), got {align!r}")
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"evaluate.graded_answers: one target per prompt expected, got {len(prompts)} "
                         f"prompts and {len(targets)} targets")
    goal = [tokenizer.encode(t) for t in targets]
    if min(len(g) for g in goal) < 1:
        raise ValueError("evaluate.graded_answers: every target needs at least one token")
    if align and len({len(g) for g in goal}) > 1:
        rows: list[dict] = [{} for _ in prompts]
        for k in sorted({len(g) for g in goal}):
            idx = [i for i, g in enumerate(goal) if len(g) == k]
            got = graded_answers(model, tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx],
                                 piece=piece, separator=separator, align=align)
            for i, g in zip(idx, got, strict=True):
                rows[i] = g
        return rows
    n = max(len(g) for g in goal)
    logits, state = _read_prompts(model, tokenizer, prompts, piece, separator, align, n)
    logits = logits.float()
    limits = [len(g) + 4 for g in goal]
    outs = greedy_continue(model, logits, state, max(limits), {tokenizer.eos_id})
    # teacher forcing: target tokens 0..n-2 go in after the prompt (right-padded with the separator;
    # the states are not changed in place, so the greedy pass above started from the same one)
    fed = torch.tensor([g + [tokenizer.eos_id] * (n - len(g)) for g in goal], dtype=torch.long,
                       device=logits.device)
    pred = logits[:, None]
    if n > 1:
        more, _ = model(fed[:, :-1], state)
        pred = torch.cat([pred, more.float()], dim=1)  # (B, n, V): the logits for target token i
    nats = F.cross_entropy(pred.transpose(1, 2), fed, reduction="none")
    hits = pred.argmax(-1) == fed
    rows = []
    for b, g in enumerate(goal):
        k = len(g)
        rows.append({"generated": tokenizer.decode(outs[b][:limits[b]]), "answer_tokens": k,
                     "answer_nats": float(nats[b, :k].sum()), "answer_right": int(hits[b, :k].sum())})
    return rows


# ----------------------------------------------------------------------------- tasks

def haystack_text(data_dir: str | Path) -> str:
    """The held-out books of the corpus (test split), longest first, joined: the haystack for the
    needle and BABILong tasks."""
    from .data.corpus import CorpusError, load_documents

    try:
        docs = load_documents(data_dir, "test")
    except CorpusError as e:
        raise TitansError(str(e)) from None
    if not docs:
        raise TitansError(f"the corpus in {data_dir} has no test documents; rebuild it (titans data build)")
    return "\n\n".join(d.text for d in sorted(docs, key=lambda d: -len(d.text)))


def eval_text_task(model, tokenizer, task: str, lengths: list[int], *, n_examples: int, haystack: str,
                   seed: int = 0, piece: int = 2048, batch_size: int = 1, separator: bool = True,
                   align: int = 0, log=print) -> list[dict]:
    """Accuracy of one text task (a name in titans.tasks.TASKS) at each length; depths are spread
    evenly over the examples (RULER). batch_size > 1 streams that many examples side by side
    (`answers`: shorter prompts get up to haystack.TOLERANCE leading separators). Each row holds the
    accuracy with its count and 95% Wilson interval, the share of the commonest answer (the score
    of a constant answer: 1/n for needles, about a third for bAbI rooms), teacher-forced answer
    scores, and every example (depth, answer, generation, correct) under "samples"."""
    from .tasks import TASKS, score

    if task not in TASKS:
        raise TitansError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if batch_size < 1:
        raise TitansError(f"batch size for evaluation must be >= 1, got {batch_size}")
    rows = []
    for length in lengths:
        correct, t0 = 0, time.perf_counter()
        nats, right, tokens = 0.0, 0, 0
        samples = []
        for first in range(0, n_examples, batch_size):
            idx = range(first, min(first + batch_size, n_examples))
            depths = [(i + 0.5) / n_examples for i in idx]
            exs = [TASKS[task](length, haystack=haystack, tokenizer=tokenizer, seed=seed + i, depth=d)
                   for i, d in zip(idx, depths, strict=True)]
            got = graded_answers(model, tokenizer, [ex.prompt for ex in exs], [ex.answer for ex in exs],
                                 piece=piece, separator=separator, align=align)
            for depth, ex, g in zip(depths, exs, got, strict=True):
                ok = score(ex, g["generated"])
                correct += ok
                nats += g["answer_nats"]
                right += g["answer_right"]
                tokens += g["answer_tokens"]
                samples.append({"depth": round(depth, 3), "answer": ex.answer,
                                "generated": g["generated"], "correct": bool(ok)})
        counts = Counter(s["answer"] for s in samples)
        rows.append({"task": task, "length": length, "accuracy": correct / n_examples, "n": n_examples,
                     "correct": int(correct), "ci95": list(wilson_interval(int(correct), n_examples)),
                     # what answering the commonest answer every time would score on these examples
                     "majority_answer_share": max(counts.values()) / n_examples,
                     "answer_token_accuracy": right / tokens, "answer_loss": nats / tokens,
                     "seconds": time.perf_counter() - t0, "samples": samples})
        log(f"{task:18s} {length_label(length):>6s}: {correct}/{n_examples} correct; teacher-forced "
            f"{100 * right / tokens:.0f}% of answer tokens, {nats / tokens:.2f} nats/token "
            f"({time.perf_counter() - t0:.0f} s)")
    return rows


@torch.no_grad()
def eval_mqar(model, lengths: list[int], *, n_examples: int, n_pairs: int = 16, seed: int = 0,
              piece: int = 2048, batch_size: int = 1, log=print) -> list[dict]:
    """MQAR accuracy (argmax of the value after each queried key) at each sequence length;
    batch_size sequences are streamed side by side (same lengths: no padding)."""
    from .tasks import make_mqar

    if batch_size < 1:
        raise TitansError(f"batch size for evaluation must be >= 1, got {batch_size}")
    rows = []
    for length in lengths:
        inputs, targets = make_mqar(n_examples, length, n_pairs, vocab_size=model.config.vocab_size,
                                    seed=seed)
        inputs, targets = inputs.to(_device(model)), targets.to(_device(model))
        hit = total = 0
        for b in range(0, n_examples, batch_size):
            preds = []
            state = None
            for start in range(0, length, piece):
                logits, state = model(inputs[b:b + batch_size, start:start + piece], state)
                preds.append(logits.argmax(-1))
            pred = torch.cat(preds, dim=1)
            tgt = targets[b:b + batch_size]
            mask = tgt != -100
            hit += int((pred[mask] == tgt[mask]).sum())
            total += int(mask.sum())
        rows.append({"task": "mqar", "length": length, "accuracy": hit / max(total, 1), "n": n_examples,
                     "n_pairs": n_pairs})
        log(f"mqar               {length_label(length):>6s}: {hit}/{total} values recalled")
    return rows


def _encode_docs(tokenizer, data_dir, max_tokens: int, min_tokens: int = 2):
    from .data.corpus import load_documents

    docs = load_documents(data_dir, "test")
    out = []
    for d in sorted(docs, key=lambda d: -len(d.text)):
        ids = tokenizer.encode(d.text)[:max_tokens]
        if len(ids) >= min_tokens:
            out.append((d, ids))
    return out


def eval_ppl(model, tokenizer, data_dir, *, max_tokens: int, piece: int = 2048, log=print) -> list[dict]:
    """Bits per byte of each held-out document (its first max_tokens tokens), streamed."""
    rows, total_bits, total_bytes = [], 0.0, 0
    for doc, ids in _encode_docs(tokenizer, data_dir, max_tokens):
        _, _, losses = stream(model, ids, piece=piece, losses=True)
        n_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
        bits = float(losses.sum()) / math.log(2)
        total_bits += bits
        total_bytes += n_bytes
        rows.append({"task": "ppl", "document": doc.id, "tokens": len(ids), "bpb": bits / max(n_bytes, 1)})
        log(f"ppl {doc.id:40s} {len(ids):>9,} tokens  {bits / max(n_bytes, 1):.4f} bits/byte")
    rows.append({"task": "ppl", "document": "ALL", "tokens": sum(r["tokens"] for r in rows),
                 "bpb": total_bits / max(total_bytes, 1)})
    return rows


def eval_position(model, tokenizer, data_dir, *, max_tokens: int, piece: int = 2048, log=print) -> list[dict]:
    """Mean loss (bits per token) in log-spaced position bins inside the longest held-out books:
    a falling curve means the model uses what it read long ago."""
    sums: dict[int, list[float]] = {}
    docs = [x for x in _encode_docs(tokenizer, data_dir, max_tokens) if len(x[1]) >= min(max_tokens, 4096)]
    if not docs:
        raise TitansError("position: no held-out document is long enough (4096 tokens)")
    for doc, ids in docs[:4]:
        _, _, losses = stream(model, ids, piece=piece, losses=True)
        bins = np.floor(np.log2(np.arange(1, len(losses) + 1))).astype(int)  # [2^b, 2^(b+1))
        for b in np.unique(bins):
            sums.setdefault(int(b), []).append(float(losses[torch.from_numpy(bins == b)].mean()))
        log(f"position: {doc.id} ({len(ids):,} tokens)")
    return [{"task": "position", "start": 2 ** b, "end": 2 ** (b + 1), "bits_per_token":
             float(np.mean(v)) / math.log(2), "documents": len(v)} for b, v in sorted(sums.items())]


def lambada_examples(text: str, n: int, context_tokens: int, tokenizer,
                     seed: int = 0) -> list[tuple[str, str]]:
    """(context, last word) pairs: a passage ending just before the last word of a sentence that
    is at least 4 words long; the word must be alphabetic and 3+ letters (LAMBADA-like)."""
    rng = np.random.default_rng(seed)
    ends = [m.start() for m in re.finditer(r"(?<=[a-z])[.!?](\s|$)", text)]
    rng.shuffle(ends)
    out = []
    for end in ends:
        m = re.search(r"\s([A-Za-z]{3,})$", text[max(0, end - 40):end])
        if not m:
            continue
        word = m.group(1)
        start_word = end - len(word)
        ctx = text[max(0, start_word - context_tokens * 4):start_word]
        ids = tokenizer.encode(ctx)[-context_tokens:]
        ctx = tokenizer.decode(ids)
        if len(ctx.split()) >= 20 and text[start_word - 1] == " ":
            out.append((ctx.rstrip(" "), " " + word))
        if len(out) == n:
            break
    return out


def eval_lambada(model, tokenizer, data_dir, *, n_examples: int, context_tokens: int = 1024, seed: int = 0,
                 piece: int = 2048, log=print) -> list[dict]:
    """Greedy last-word accuracy on passages of held-out books."""
    exs = lambada_examples(haystack_text(data_dir), n_examples, context_tokens, tokenizer, seed)
    correct = 0
    for ctx, word in exs:
        # a passage cut from inside a book: no document separator before it
        got = answer(model, tokenizer, ctx, len(tokenizer.encode(word)) + 2, piece=piece, separator=False)
        correct += got.startswith(word) and not got[len(word):len(word) + 1].isalpha()
    acc = correct / max(len(exs), 1)
    log(f"lambada: {correct}/{len(exs)} last words right ({context_tokens}-token contexts)")
    return [{"task": "lambada", "accuracy": acc, "n": len(exs), "context_tokens": context_tokens}]


# ----------------------------------------------------------------------------- reports

def write_report(result: dict, out_dir: Path) -> dict:
    """result.json, result.md and a PNG (accuracy vs length and/or loss vs position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    md = [f"# Evaluation of `{result['checkpoint']}`", "",
          f"variant {result['variant']}, {result['parameters']:,} parameters, trained on "
          f"{result['tokens_seen']:,} tokens; command: `{result['command']}`", ""]
    if result.get("forget_scale", 1.0) != 1.0:
        md += [f"Read with every memory's forgetting gate alpha multiplied by {result['forget_scale']:g} "
               "(`forget_scale`; `--forget-scale` sets it).", ""]
    if result.get("align"):
        md += [f"Needle and bAbI prompts padded so that each answer ends a block of {result['align']} tokens "
               "(`--align`).", ""]
    acc = [r for r in rows if "length" in r]
    if acc:
        lengths = sorted({r["length"] for r in acc})

        def table(rows_: list[dict], cell) -> list[str]:
            """A task x length markdown table of cell(row)."""
            out = ["| task | " + " | ".join(length_label(n) for n in lengths) + " |",
                   "|---|" + "---:|" * len(lengths)]
            for t in dict.fromkeys(r["task"] for r in rows_):
                cells = {r["length"]: cell(r) for r in rows_ if r["task"] == t}
                out.append(f"| {t} | " + " | ".join(cells.get(n, "") for n in lengths) + " |")
            return out + [""]

        md += table(acc, lambda r: f"{100 * r['accuracy']:.0f}%")
        counted = [r for r in acc if "ci95" in r]
        if counted:
            md += ["Right of n, the 95% interval (Wilson) and, after the dot, the score of answering the "
                   "commonest answer of these examples every time (the bar a model that reads nothing "
                   "can reach)", ""]
            def counted_cell(r: dict) -> str:
                lo, hi, bar = (100 * x for x in (*r["ci95"], r["majority_answer_share"]))
                return f"{r['correct']}/{r['n']} ({lo:.0f}–{hi:.0f}%) · {bar:.0f}%"

            md += table(counted, counted_cell)
        graded = [r for r in acc if "answer_loss" in r]
        if graded:
            md += ["Teacher-forced, the answer's tokens fed back: share of them predicted right / loss in "
                   "nats per answer token (a format learned without the needle: a pass-key digit costs "
                   "ln 10 = 2.30 and is right one time in ten)", ""]
            md += table(graded, lambda r: f"{100 * r['answer_token_accuracy']:.0f}% / {r['answer_loss']:.2f}")
    for r in rows:
        if r["task"] == "ppl" and r["document"] == "ALL":
            md += [f"Held-out bits per byte (all test documents, first {result['max_tokens']:,} tokens "
                   f"each): **{r['bpb']:.4f}**", ""]
        if r["task"] == "lambada":
            md += [f"Last-word accuracy: **{100 * r['accuracy']:.1f}%** of {r['n']} passages "
                   f"({r['context_tokens']}-token contexts)", ""]
    pos = [r for r in rows if r["task"] == "position"]
    if pos:
        md += ["| positions | bits/token |", "|---|---:|"]
        md += [f"| {r['start']:,}–{r['end'] - 1:,} | {r['bits_per_token']:.3f} |" for r in pos] + [""]
    (out_dir / "result.md").write_text("\n".join(md))
    paths = {"json": str(out_dir / "result.json"), "md": str(out_dir / "result.md")}
    panels = [p for p in (acc, pos) if p]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
        ax_i = 0
        if acc:
            ax = axes[0, ax_i]
            for t in dict.fromkeys(r["task"] for r in acc):
                pts = sorted((r["length"], r["accuracy"]) for r in acc if r["task"] == t)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=t)
            ax.set(xscale="log", xlabel="context length (tokens)", ylabel="accuracy (%)", ylim=(-3, 103))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            ax_i += 1
        if pos:
            ax = axes[0, ax_i]
            ax.plot([r["start"] for r in pos], [r["bits_per_token"] for r in pos], "o-")
            ax.set(xscale="log", xlabel="position in the book (tokens)", ylabel="bits per token")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{result['variant']} ({Path(result['checkpoint']).name})")
        fig.tight_layout()
        fig.savefig(out_dir / "result.png", dpi=110)
        plt.close(fig)
        paths["png"] = str(out_dir / "result.png")
    return paths


def evaluate(checkpoint: str | Path, tasks: list[str], lengths: list[int], *, data_dir="data",
             n_examples: int = 10, max_tokens: int = 65536, piece: int = 2048, seed: int = 0,
             out_dir: str | Path | None = None, command: str = "", device: str = "cpu", batch_size: int = 1,
             cuda_graphs: bool = False, separator: bool = True, align: int = 0,
             forget_scale: float | None = None, log=print) -> dict:
    """Run the named tasks (see ALL_TASKS and titans.tasks.TASKS) on a checkpoint and write the
    report; returns {"rows": [...], "paths": {...}, ...}. `device`: auto, cpu, cuda or cuda:N.
    batch_size: examples streamed side by side by the accuracy tasks (needles, bAbI, MQAR).
    cuda_graphs: run the memory's chunk loops as CUDA graphs (titans.memory.graph_chunks; CUDA only).
    separator: the needle and bAbI prompts are read after the document separator (`answers`).
    align: needle and bAbI prompts get more leading separators, so that the answer ends a block of
    `align` tokens (`graded_answers`; 0: off). forget_scale: read with every memory's forgetting
    gate multiplied by this number in [0, 1] (`TitansLM.set_forget_scale`; None: the checkpoint's own
    value, 1 unless it was trained with another); the result records the value read with."""
    from .memory import chunks_graphed, graph_chunks
    from .memory.layer import check_forget_scale

    if isinstance(align, bool) or not isinstance(align, int) or align < 0:
        raise TitansError(f"--align must be an int >= 0 (0: off), got {align!r}")
    if forget_scale is not None:
        try:
            forget_scale = check_forget_scale(forget_scale, "--forget-scale")
        except ValueError as e:
            raise TitansError(str(e)) from None
    if n_examples < 1 or max_tokens < 2 or piece < 1 or batch_size < 1:
        raise TitansError("--examples, --piece and --batch-size must be >= 1 and --max-tokens >= 2; got "
                          f"{n_examples}, {piece}, {batch_size} and {max_tokens}")
    target = pick_device(device)
    hint = cpu_warning(target)
    if hint:
        log(f"warning: {hint}")
    graph_here = cuda_graphs and not chunks_graphed()
    if graph_here and target.type != "cuda":
        raise TitansError(f"--cuda-graphs needs a CUDA device, got {target}: drop it or pass --device cuda")
    if graph_here:
        graph_chunks()
    try:
        return _evaluate(checkpoint, tasks, lengths, data_dir, n_examples, max_tokens, piece, seed, out_dir,
                         command, target, batch_size, separator, align, forget_scale, log)
    finally:
        if graph_here:
            graph_chunks(False)


def _evaluate(checkpoint, tasks, lengths, data_dir, n_examples, max_tokens, piece, seed, out_dir, command,
              target, batch_size, separator, align, forget_scale, log) -> dict:
    from .checkpoint import open_checkpoint
    from .model import count_parameters

    ckpt = open_checkpoint(checkpoint)
    model, tokenizer = ckpt.load_model()
    if forget_scale is not None and forget_scale != model.config.forget_scale:
        try:
            model.set_forget_scale(forget_scale)
        except ValueError as e:
            raise TitansError(str(e).replace("TitansLM.set_forget_scale", "--forget-scale")) from None
    model.to(target)
    torch.manual_seed(seed)
    rows: list[dict] = []
    haystack = None
    for task in tasks:
        names = TASK_GROUPS.get(task, [task])
        if task in ("ppl", "position", "lambada", "mqar"):
            names = []
        for name in names:
            haystack = haystack if haystack is not None else haystack_text(data_dir)
            rows += eval_text_task(model, tokenizer, name, lengths, n_examples=n_examples, haystack=haystack,
                                   seed=seed, piece=piece, batch_size=batch_size, separator=separator,
                                   align=align, log=log)
        if task == "mqar":
            rows += eval_mqar(model, lengths, n_examples=n_examples, seed=seed, piece=piece,
                              batch_size=batch_size, log=log)
        elif task == "ppl":
            rows += eval_ppl(model, tokenizer, data_dir, max_tokens=max_tokens, piece=piece, log=log)
        elif task == "position":
            rows += eval_position(model, tokenizer, data_dir, max_tokens=max_tokens, piece=piece, log=log)
        elif task == "lambada":
            rows += eval_lambada(model, tokenizer, data_dir, n_examples=n_examples, seed=seed, piece=piece,
                                 log=log)
    result = {"checkpoint": str(ckpt.path), "variant": ckpt.config.variant,
              "parameters": count_parameters(model), "tokens_seen": ckpt.meta.get("tokens_seen", 0),
              "max_tokens": max_tokens, "device": str(target), "batch_size": batch_size,
              "separator": separator, "align": align, "forget_scale": model.config.forget_scale,
              "command": command, "rows": rows}
    out = Path(out_dir) if out_dir is not None else ckpt.path.parent.parent / "eval"
    result["paths"] = write_report(result, out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .tasks import TASKS

    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run folder (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("--task", default="niah", metavar="TASKS",
                        help=f"comma-separated: {', '.join(ALL_TASKS)}, or single tasks "
                             f"({', '.join(TASKS)}) (default: niah)")
    parser.add_argument("--lengths", default="1k,4k", help="context lengths for niah / babilong / mqar, "
                        "e.g. 1k,4k,16k,64k,1m (k = 1024; default: 1k,4k)")
    parser.add_argument("--examples", type=int, default=10, metavar="N",
                        help="examples per task and length (default: 10)")
    parser.add_argument("--max-tokens", type=int, default=65536, metavar="N",
                        help="ppl / position: tokens read from each held-out document (default: 65536)")
    parser.add_argument("--data", default="data", metavar="DIR", help="corpus folder (default: data)")
    parser.add_argument("--piece", type=int, default=2048, metavar="N",
                        help="tokens fed per forward call on the streaming state (default: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="niah / babilong / mqar: examples streamed side by side (2x faster at 8 for "
                             "the tiny MAC on a CPU); shorter prompts get up to 32 leading document "
                             "separators (default: 1, each example alone)")
    parser.add_argument("--no-separator", action="store_true",
                        help="niah / babilong: read each prompt from position 0 with nothing before it, as "
                             "evaluations before 2026-11-27 did (default: after the document separator, "
                             "as every document and task row is in training)")
    parser.add_argument("--align", type=int, default=0, metavar="N",
                        help="niah / babilong: more leading separators, so that each answer ends a block "
                             "of N tokens, as in training rows with data.task_place=end (a MAC model: N = "
                             "its segment_len; its answers depend on where they fall in a segment; "
                             "default: 0, off)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run the memory's chunk loops as CUDA graphs (4-8x faster on a GPU; same "
                             "results)")
    parser.add_argument("--forget-scale", type=float, default=None, metavar="S",
                        help="multiply every memory's forgetting gate alpha by S in [0, 1] while reading "
                             "(default: as trained, 1 unless the run set model.forget_scale; lower keeps "
                             "what was written longer, for lengths past the training length)")
    parser.add_argument("--out", default=None, metavar="DIR", help="default: RUN/eval")


def run(args: argparse.Namespace) -> int:
    from .tasks import TASKS

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for t in tasks:
        if t not in ALL_TASKS and t not in TASKS:
            import difflib

            close = difflib.get_close_matches(t, [*ALL_TASKS, *TASKS], n=1)
            raise TitansError(f"unknown task {t!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; choose from {', '.join(ALL_TASKS)}")
    import shlex
    import sys

    command = "titans " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "titans eval"
    result = evaluate(args.checkpoint, tasks, parse_lengths(args.lengths), data_dir=args.data,
                      n_examples=args.examples, max_tokens=args.max_tokens, piece=args.piece, seed=args.seed,
                      out_dir=args.out, command=command, device=args.device, batch_size=args.batch_size,
                      cuda_graphs=args.cuda_graphs, separator=not args.no_separator, align=args.align,
                      forget_scale=args.forget_scale)
    print(Path(result["paths"]["md"]).read_text())
    print("Wrote " + ", ".join(result["paths"].values()))
    return 0
