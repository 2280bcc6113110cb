"""How a training step's per-token time grows from a short to a long sequence, measured so that
this shared machine's drift cancels: one process per variant runs the two lengths in alternation
(each round: a short warm-up step, a timed short step, a timed long step, after one untimed long
step that grows the heap), and the long/short ratio of per-token times is taken per round; the
median over rounds is reported. Issue 3's targets: at most 1.3x from 1K to 32K for the memory
variants, at least 4x for Transformer++. `model_speed.py` gives throughput and peak memory per
length, one process per cell; this script gives the growth ratio.

    python benchmarks/length_growth.py                          # all variants, 1024 vs 32768, 3 rounds
    python benchmarks/length_growth.py --variants mac,mal --long 16384 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import SETTINGS, VARIANTS, make_step  # noqa: E402


def worker(variant: str, short: int, long: int, rounds: int, dtype: str) -> dict:
    import torch

    step = make_step(variant, dtype)
    g = torch.Generator().manual_seed(0)
    x_short, x_long = (torch.randint(0, 256, (1, T + 1), generator=g) for T in (short, long))
    step(x_short)
    step(x_long)  # grows the heap to the long step's peak: later long steps reuse it
    ratios, t_short, t_long, finite = [], [], [], True
    for _ in range(rounds):
        step(x_short)  # the long step left the caches cold
        s = step(x_short)[0] / short
        lt, ok = step(x_long)
        finite &= ok
        t_short.append(s)
        t_long.append(lt / long)
        ratios.append(t_long[-1] / s)
    return {"variant": variant, "short": short, "long": long,
            "us_per_token_short": [1e6 * t for t in t_short],
            "us_per_token_long": [1e6 * t for t in t_long], "ratios": ratios,
            "median_ratio": statistics.median(ratios), "long_grad_finite": finite}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--short", type=int, default=1024)
    p.add_argument("--long", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant before giving up")
    p.add_argument("--out", default="benchmarks/results/length_growth")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; expected some of {VARIANTS}")
    if not 0 < args.short < args.long:
        p.error(f"need 0 < --short < --long, got {args.short} and {args.long}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.short, args.long, args.rounds, args.dtype)))
        return
    results = []
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v, "--short", str(args.short), "--long", str(args.long),
               "--rounds", str(args.rounds), "--dtype", args.dtype]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            r = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                 else {"variant": v, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:100]})
        except subprocess.TimeoutExpired:
            r = {"variant": v, "error": f"over {args.timeout:.0f} s"}
        results.append(r)
        shown = (f"{r['median_ratio']:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in r['ratios'])})"
                 if "error" not in r else r["error"])
        print(f"{v:15s} {shown}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    lines = [f"| variant | us/token at {args.short} | us/token at {args.long} | per-token time "
             f"{args.long} / {args.short} (median) | per round |", "|---|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | - | {r['error']} | |")
            continue
        star = "" if r["long_grad_finite"] else "*"
        lines.append(f"| {r['variant']} | {statistics.median(r['us_per_token_short']):.0f} | "
                     f"{statistics.median(r['us_per_token_long']):.0f}{star} | "
                     f"{r['median_ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    lines.append(f"\nOne training step (forward, backward, gradient clip 1.0, AdamW), batch 1, {args.dtype}; "
                 f"the two lengths alternate in one process per variant, {args.rounds} rounds; settings "
                 f"{SETTINGS}. * the gradient at the long length was not finite (the update is skipped; "
                 f"benchmarks/results/grad_norm_vs_length.md).")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": SETTINGS, "dtype": args.dtype,
                                                    "rounds": args.rounds, "results": results}, indent=1))
    print(f"wrote {out.with_suffix('.md')}, .json")


if __name__ == "__main__":
    main()
