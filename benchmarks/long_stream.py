"""Stream millions of tokens through a Titans model without gradients, piece by piece on its
bounded state; report tokens/s and RSS every --report tokens, and fail on NaN/Inf.

    python benchmarks/long_stream.py                         # small MAC, 2M tokens, pieces of 4096
    python benchmarks/long_stream.py --tokens 10000000
The input is random bytes (the memory cost and speed do not depend on the content).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil
import torch

from titans.model import TitansConfig, TitansLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--variant", default="mac")
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--piece", type=int, default=4096)
    p.add_argument("--report", type=int, default=131072, help="report every this many tokens")
    p.add_argument("--out", default="benchmarks/results/long_stream")
    args = p.parse_args()

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset(args.preset, variant=args.variant)).eval()
    proc = psutil.Process()
    g = torch.Generator().manual_seed(0)
    state, seen, rows, t0 = None, 0, [], time.perf_counter()
    next_report = args.report
    with torch.no_grad():
        while seen < args.tokens:
            n = min(args.piece, args.tokens - seen)
            tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            logits, state = model(tokens, state)
            if not torch.isfinite(logits).all():
                raise SystemExit(f"non-finite logits in tokens [{seen}, {seen + n})")
            seen += n
            if seen >= next_report or seen == args.tokens:
                row = {
                    "tokens": seen,
                    "seconds": time.perf_counter() - t0,
                    "tokens_per_s": seen / (time.perf_counter() - t0),
                    "rss_gb": proc.memory_info().rss / 1e9,
                }
                rows.append(row)
                print(
                    f"{seen:>10,d} tokens  {row['tokens_per_s']:7.0f} tok/s  RSS {row['rss_gb']:.3f} GB",
                    flush=True,
                )
                next_report += args.report
    first, last = rows[0], rows[-1]
    summary = {
        "preset": args.preset,
        "variant": args.variant,
        "piece": args.piece,
        "rows": rows,
        "rss_growth": last["rss_gb"] / first["rss_gb"],
    }
    print(f"RSS at {last['tokens']:,} tokens / RSS at {first['tokens']:,}: {summary['rss_growth']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    out.with_suffix(".md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    rss = [r["rss_gb"] for r in rows]
    lines = ["| tokens | tokens/s (cumulative) | RSS GB |", "|---:|---:|---:|"]
    lines += [f"| {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['rss_gb']:.3f} |" for r in rows]
    first, last = rows[0]["tokens"], rows[-1]["tokens"]
    lines.append(f"\n{summary['preset']} {summary['variant']}, pieces of {summary['piece']}, no gradients. "
                 f"RSS at {last:,} / RSS at {first:,}: {summary['rss_growth']:.3f}; "
                 f"RSS range over the run {min(rss):.3f}-{max(rss):.3f} GB.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
