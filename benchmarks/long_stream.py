"""Stream millions of tokens through a Titans model without gradients, piece by piece on its
bounded state; report tokens/s and RSS every --report tokens, and fail on NaN/Inf.

    python benchmarks/long_stream.py                         # small MAC, 2M tokens, pieces of 4096
    python benchmarks/long_stream.py --tokens 10000000 --max-minutes 75   # stops early, keeps its rows
    python benchmarks/long_stream.py --tokens 10000000 --resume    # go on from the last checkpoint
The input is random bytes (the memory cost and speed do not depend on the content).

With --checkpoint (default out/long_stream_<preset>_<variant>.pt) the model weights, the streaming state, the
random generator and the rows so far are saved at every report, so a run that is stopped (a session
ending, --max-minutes) can go on later with --resume: the stream continues exactly where it was (the
state is the model's whole memory of the stream; chained pieces equal one call). Each resumed leg is a
new process: its RSS rows are that process's, and tokens/s is over the legs' summed seconds.
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
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop after this many minutes (0: none); the rows so far are the result")
    p.add_argument("--out", default="benchmarks/results/long_stream")
    p.add_argument("--checkpoint", default=None,
                   help="save weights, state and rows here at every report "
                        "(default out/long_stream_<preset>_<variant>.pt; 'none' to skip)")
    p.add_argument("--resume", action="store_true", help="go on from --checkpoint")
    args = p.parse_args()
    if args.tokens < 1 or args.piece < 1 or args.report < 1 or args.max_minutes < 0:
        p.error("--tokens, --piece and --report must be >= 1 and --max-minutes >= 0")
    if args.checkpoint is None:
        args.checkpoint = f"out/long_stream_{args.preset}_{args.variant}.pt"
    ckpt = None if args.checkpoint == "none" else Path(args.checkpoint)
    if args.resume and (ckpt is None or not ckpt.exists()):
        p.error(f"--resume: no checkpoint at {args.checkpoint}; run once without --resume first")

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset(args.preset, variant=args.variant)).eval()
    proc = psutil.Process()
    g = torch.Generator().manual_seed(0)
    state, seen, rows, before, leg = None, 0, [], 0.0, 0
    if args.resume:
        saved = torch.load(ckpt, weights_only=False)
        if (saved["preset"], saved["variant"], saved["piece"]) != (args.preset, args.variant, args.piece):
            p.error(f"--resume: {ckpt} holds {saved['preset']} {saved['variant']} pieces of "
                    f"{saved['piece']}, not {args.preset} {args.variant} pieces of {args.piece}")
        # the model the stream started with: its config travels in the checkpoint (one from before
        # that is a preset model written before TitansConfig.write_norm existed)
        cfg = saved.get("config") or {**model.config.to_dict(), "write_norm": False}
        model = TitansLM(TitansConfig.from_dict(cfg)).eval()
        model.load_state_dict(saved["model"])
        g.set_state(saved["generator"])
        state, seen, rows = saved["state"], saved["seen"], saved["rows"]
        before, leg = rows[-1]["seconds"], rows[-1].get("leg", 0) + 1
        print(f"resumed at {seen:,} tokens (leg {leg}) from {ckpt}", flush=True)
        if seen >= args.tokens:
            raise SystemExit(f"{ckpt} has streamed {seen:,} tokens already; ask for more with --tokens")
    t0 = time.perf_counter()
    next_report = (seen // args.report + 1) * args.report
    with torch.no_grad():
        while seen < args.tokens:
            n = min(args.piece, args.tokens - seen)
            tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            logits, state = model(tokens, state)
            if not torch.isfinite(logits).all():
                raise SystemExit(f"non-finite logits in tokens [{seen}, {seen + n})")
            seen += n
            if seen >= next_report or seen == args.tokens:
                seconds = before + time.perf_counter() - t0
                row = {
                    "tokens": seen,
                    "seconds": seconds,
                    "tokens_per_s": seen / seconds,
                    "rss_gb": proc.memory_info().rss / 1e9,
                    "leg": leg,
                }
                rows.append(row)
                print(
                    f"{seen:>10,d} tokens  {row['tokens_per_s']:7.0f} tok/s  RSS {row['rss_gb']:.3f} GB",
                    flush=True,
                )
                next_report += args.report
                summary = save(args, rows, stopped=None)  # after every row: a killed run keeps them
                if ckpt is not None:
                    save_checkpoint(ckpt, args, model, g, state, seen, rows)
                late = args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes
                if late and seen < args.tokens:
                    summary = save(args, rows, stopped=f"--max-minutes {args.max_minutes:g}")
                    break
    print(f"RSS at {rows[-1]['tokens']:,} tokens / RSS at {rows[0]['tokens']:,}: {summary['rss_growth']:.3f}"
          + (f" (stopped by {summary['stopped']} of {args.tokens:,} tokens)" if summary["stopped"] else ""))


def save_checkpoint(path: Path, args, model, g, state, seen: int, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # write then rename: a run killed mid-save keeps the previous one
    torch.save({"preset": args.preset, "variant": args.variant, "piece": args.piece,
                "config": model.config.to_dict(), "model": model.state_dict(), "generator": g.get_state(),
                "state": state, "seen": seen, "rows": rows}, tmp)
    tmp.replace(path)


def save(args, rows: list[dict], stopped: str | None) -> dict:
    summary = {
        "preset": args.preset,
        "variant": args.variant,
        "piece": args.piece,
        "tokens_asked": args.tokens,
        "stopped": stopped,
        "rows": rows,
        "rss_growth": rows[-1]["rss_gb"] / rows[0]["rss_gb"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    out.with_suffix(".md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    rss = [r["rss_gb"] for r in rows]
    lines = ["| tokens | tokens/s (cumulative) | RSS GB |", "|---:|---:|---:|"]
    lines += [f"| {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['rss_gb']:.3f} |" for r in rows]
    first, last = rows[0]["tokens"], rows[-1]["tokens"]
    lines.append(f"\n{summary['preset']} {summary['variant']}, pieces of {summary['piece']}, no gradients. "
                 f"RSS at {last:,} / RSS at {first:,}: {summary['rss_growth']:.3f}; "
                 f"RSS range over the run {min(rss):.3f}-{max(rss):.3f} GB."
                 + (f" Run in {rows[-1]['leg'] + 1} legs (processes) resumed from checkpoints; RSS is "
                    "each leg's own." if rows[-1].get("leg") else "")
                 + (f" Stopped by {summary['stopped']} of {summary['tokens_asked']:,} tokens asked."
                    if summary.get("stopped") else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
