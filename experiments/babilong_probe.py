"""What a model's BABILong QA1 answers rest on: accuracy by how far back the supporting fact lies,
against the shortcut of answering the last fact's room.

    python experiments/babilong_probe.py --checkpoint out/qa1_512_s0 --length 4k --examples 60 --align 64

QA1 asks "Where is Mary?"; the answer is the room of Mary's last move (the *supporting fact*). A
model that reads no facts answers the commonest room (about 1/6 right). A model that has learned
only "the last room mentioned" is right whenever the story's last fact is the asked person's move
(and by coincidence otherwise): `recency_accuracy` is that shortcut's score on the same examples,
and `by_last_fact` splits the model's accuracy by whether the last fact is about the asked person.
A model that answers from the person's own fact is right in both groups; one that uses recency only
in the first.

`by_support_distance` bins the examples by the number of tokens from the supporting fact's start
to the end of the prompt: a memory that carries facts keeps its accuracy in the far bins, a model
that answers only from what it can attend to (a MAC segment: 64 tokens) loses it there.

Examples are `titans eval`'s (the same seeds, held-out books, one document separator before each
prompt, `--align` as in `titans eval`), answered greedily and scored with `titans.tasks.score`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

BINS = (0, 64, 512, 2048, 8192, 32768, 131072, 524288)  # support distance bins in tokens: [0, 64), ...


def supporting_fact(example) -> int:
    """Index in meta["facts"] of the asked person's last move (QA1's supporting fact)."""
    person = example.meta["babi_question"].removeprefix("Where is ").removesuffix("?")
    moves = [i for i, f in enumerate(example.meta["facts"]) if f.startswith(person + " ")]
    if not moves:
        raise ValueError(f"babilong_probe: no fact about {person!r} in {example.meta['facts']}")
    return moves[-1]


def fact_room(fact: str) -> str:
    """The room a QA1 fact moves its person to: "Mary went back to the office." -> "office"."""
    return fact.rstrip(".").rsplit(" the ", 1)[1]


def _bin(distance: int) -> str:
    lo = max(b for b in BINS if b <= distance)
    later = [b for b in BINS if b > distance]
    return f"[{lo}, {later[0]})" if later else f"[{lo}, inf)"


def _group(records: list[dict]) -> dict:
    n = len(records)
    return {"examples": n, "accuracy": sum(r["correct"] for r in records) / n,
            "recency_accuracy": sum(r["recency_right"] for r in records) / n,
            "answers_last_fact_room": sum(r["answers_last_fact_room"] for r in records) / n}


def probe(checkpoint: str, length: int, examples: int, *, seed: int = 0, align: int = 0,
          batch_size: int = 10, data_dir: str = "data", forget_scale: float | None = None,
          seeds: list[int] | None = None) -> dict:
    """Read `examples` QA1 stories of `length` tokens (example seeds seed, seed + 1, ...; or the
    listed `seeds`, whose count then replaces `examples`) and group the answers."""
    import torch

    from titans.checkpoint import load
    from titans.evaluate import graded_answers, haystack_text
    from titans.tasks import make_babilong, score

    model, tokenizer = load(checkpoint)
    if forget_scale is not None and forget_scale != model.config.forget_scale:
        model.set_forget_scale(forget_scale)
    haystack = haystack_text(data_dir)
    # read in order of the answer's length: `graded_answers` with `align` splits a batch by that
    # length, so sorted batches keep their size (10 at a time rather than three groups of 3 or 4)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"babilong_probe: seeds must be distinct and not empty, got {seeds}")
        examples, seed = len(seeds), min(seeds)
    seeds = list(range(seed, seed + examples)) if seeds is None else list(seeds)
    pairs = [(s, make_babilong(1, length, haystack=haystack, tokenizer=tokenizer, seed=s)) for s in seeds]
    pairs.sort(key=lambda p: len(tokenizer.encode(p[1].answer)))
    seeds, exs = [p[0] for p in pairs], [p[1] for p in pairs]
    got: list[dict] = []
    correct: list[bool] = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, examples, batch_size):
            batch = exs[first:first + batch_size]
            read = graded_answers(model, tokenizer, [e.prompt for e in batch], [e.answer for e in batch],
                                  align=align)
            got += read
            correct += [bool(score(e, g["generated"])) for e, g in zip(batch, read, strict=True)]
            print(f"babilong_probe: {len(got)}/{examples} read, {sum(correct)} right "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    records = []
    for ex_seed, ex, g, right in zip(seeds, exs, got, correct, strict=True):
        facts, answer = ex.meta["facts"], ex.answer.strip()
        j = supporting_fact(ex)
        distance = len(tokenizer.encode(ex.prompt[ex.meta["fact_offsets"][j]:]))
        words = g["generated"].split()
        said = words[0].strip(".,;:!?") if words else ""
        last_room = fact_room(facts[-1])
        records.append({"seed": ex_seed, "answer": answer, "generated": g["generated"],
                        "correct": right, "support_fact": j, "facts": len(facts),
                        "support_distance_tokens": distance, "support_bin": _bin(distance),
                        "last_fact_about_person": j == len(facts) - 1, "recency_right": last_room == answer,
                        "answers_last_fact_room": said == last_room,
                        "answer_loss_nats_per_token": g["answer_nats"] / g["answer_tokens"]})
    return summarize({"checkpoint": checkpoint, "length": length, "examples": examples, "seed": seed,
                      "example_seeds": sorted(seeds), "align": align,
                      "forget_scale": model.config.forget_scale},
                     sorted(records, key=lambda r: r["seed"]))


def summarize(run: dict, records: list[dict]) -> dict:
    """The probe's groups over per-example records (one run's, or several runs' pooled by `merge`)."""
    if not records:
        raise ValueError("babilong_probe: no examples to summarize")
    counts = Counter(r["answer"] for r in records)
    bins = [b for b in dict.fromkeys(_bin(lo) for lo in BINS) if any(r["support_bin"] == b for r in records)]
    return {
        **run,
        **_group(records),
        "majority_answer_share": max(counts.values()) / len(records),
        "by_last_fact": {key: _group(group) for key, flag in (("about_the_asked_person", True),
                                                              ("about_someone_else", False))
                         if (group := [r for r in records if r["last_fact_about_person"] == flag])},
        "by_support_distance": {b: _group([r for r in records if r["support_bin"] == b]) for b in bins},
        "per_example": records,
    }


def merge(runs: list[dict]) -> dict:
    """Pool probe results of one checkpoint, length, alignment and forgetting scale read over
    disjoint example seeds (a long length split across processes): the groups of all their examples."""
    same = ("checkpoint", "length", "align", "forget_scale")
    for r in runs[1:]:
        if any(r[k] != runs[0][k] for k in same):
            raise ValueError(f"babilong_probe: cannot pool runs that differ in {same}: "
                             f"{[{k: x[k] for k in same} for x in runs]}")
    records = [rec for r in runs for rec in r["per_example"]]
    seeds = [rec["seed"] for rec in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"babilong_probe: runs to pool share example seeds: {sorted(seeds)}")
    run = {k: runs[0][k] for k in same} | {"examples": len(records), "seed": min(seeds),
                                           "example_seeds": sorted(seeds), "pooled_runs": len(runs)}
    return summarize(run, sorted(records, key=lambda rec: rec["seed"]))


def main() -> None:
    from titans.evaluate import parse_lengths

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run folder or a checkpoints/step_* folder")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="instead of reading: pool the printed results of runs over disjoint seeds")
    p.add_argument("--length", default="1k", help="prompt length in tokens (496, 4k, 64k, ...)")
    p.add_argument("--examples", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="the first example's seed")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="read these example seeds instead of --seed, --seed + 1, ... (--examples ignored)")
    p.add_argument("--align", type=int, default=0, metavar="N",
                   help="pad so that each answer ends a block of N tokens (as titans eval --align)")
    p.add_argument("--batch-size", type=int, default=10, help="examples read side by side")
    p.add_argument("--data", default="data", help="corpus folder (the held-out books are the haystack)")
    p.add_argument("--forget-scale", type=float, default=None, metavar="S",
                   help="read with every memory's forgetting gate multiplied by S in [0, 1] "
                        "(default: as trained)")
    args = p.parse_args()
    if args.merge:
        print(json.dumps(merge([json.loads(Path(f).read_text()) for f in args.merge]), indent=1))
        return
    if not args.checkpoint:
        p.error("--checkpoint is required (or --merge to pool results)")
    lengths = parse_lengths(args.length)
    if len(lengths) != 1:
        p.error(f"--length takes one length, got {args.length!r}")
    if args.examples < 1 or args.batch_size < 1 or args.align < 0:
        p.error("--examples and --batch-size must be >= 1, --align >= 0")
    if args.forget_scale is not None and not 0 <= args.forget_scale <= 1:
        p.error(f"--forget-scale must lie in [0, 1], got {args.forget_scale}")
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    out = probe(args.checkpoint, lengths[0], args.examples, seed=args.seed, align=args.align,
                batch_size=args.batch_size, data_dir=args.data, forget_scale=args.forget_scale, seeds=seeds)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
