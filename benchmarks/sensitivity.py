"""How much the neural memory's forward pass amplifies small differences, against stream position.

Two measurements on one NeuralMemory layer at the issue-2 settings (dim 384, 4 heads, chunk 64,
default gate initialisation, random inputs), batch 1, per window of --window tokens:

- rounding: relative difference of the output between float32 and float64 runs of the same layer;
- amplification: in float64, the output change caused by a relative change of 1e-8 in the input
  of token 0 alone, divided by 1e-8 (a finite-difference estimate of how a perturbation at the
  start of the stream grows; a stable recurrence forgets it, an expanding one amplifies it).

An expanding forward map is the other face of the outer gradients that grow exponentially with T
(benchmarks/grad_norm_vs_length.py): the gradient of a late output with respect to an early token
is this same amplification.

    python benchmarks/sensitivity.py                     # four memory configurations, T = 32768
    python benchmarks/sensitivity.py --length 4096 --configs default
    python benchmarks/sensitivity.py --out benchmarks/results/sensitivity_theta_eps \
        --configs theta_x0.01,theta_x0.1,theta_x3,ln_eps_0.01,ln_eps_1,ln_eps_100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from memory_speed import CHUNK, DIM, EXPANSION, HEADS  # benchmarks/memory_speed.py: the issue-2 settings

CONFIGS = {
    "default": {},                       # depth 2, momentum, forgetting
    "depth1": {"depth": 1},
    "no_forgetting": {"forgetting": False},
    "no_momentum": {"momentum": False},
}
# More, by name (--configs): the inner step size and the memory's LayerNorm epsilon
EXTRA = {
    "theta_x0.01": {"theta_max": 0.01}, "theta_x0.1": {"theta_max": 0.1}, "theta_x3": {"theta_max": 3.0},
    "ln_eps_0.01": {"ln_eps": 1e-2}, "ln_eps_1": {"ln_eps": 1.0}, "ln_eps_100": {"ln_eps": 100.0},
    "grad_clip_1": {"grad_clip": 1.0}, "grad_clip_0.1": {"grad_clip": 0.1},
    "forget_to_init": {"forget_to": "init"},
}


def window_rel(a: torch.Tensor, b: torch.Tensor, window: int) -> list[float]:
    """Relative difference of (1, T, D) outputs per window of tokens."""
    out = []
    for s in range(0, a.shape[1], window):
        x, y = a[:, s:s + window].double(), b[:, s:s + window].double()
        out.append(((x - y).norm() / y.norm().clamp(min=1e-300)).item())
    return out


@torch.no_grad()
def measure(name: str, T: int, window: int, seed: int = 0) -> dict:
    import titans.memory.functional as functional

    opts = {"depth": 2, "expansion": EXPANSION, "chunk_size": CHUNK, **{**CONFIGS, **EXTRA}[name]}
    eps_default = functional.LN_EPS
    functional.LN_EPS = opts.pop("ln_eps", eps_default)  # the memory's LayerNorm epsilon (a constant)
    try:
        return _measure(name, opts, T, window, seed) | {"ln_eps": functional.LN_EPS}
    finally:
        functional.LN_EPS = eps_default


@torch.no_grad()
def _measure(name: str, opts: dict, T: int, window: int, seed: int) -> dict:
    from titans.memory import NeuralMemory

    torch.manual_seed(seed)
    layer = NeuralMemory(DIM, HEADS, **opts).double()
    x = torch.randn(1, T, DIM, dtype=torch.float64)
    y64 = layer(x)[0]
    y32 = layer.float()(x.float())[0]
    layer.double()
    eps = 1e-8
    x2 = x.clone()
    x2[:, 0] *= 1 + eps
    y2 = layer(x2)[0]
    rounding = window_rel(y32, y64, window)
    amplification = [d / eps for d in window_rel(y2, y64, window)]
    weight_norms = [w[0].norm().item() for w in layer(x)[1].memory.weights]  # per layer, batch 0, at T
    return {"config": name, "options": opts, "T": T, "window": window, "rounding": rounding,
            "amplification": amplification, "final_weight_norms": weight_norms}


def to_markdown(rows: list[dict]) -> str:
    window, T = rows[0]["window"], rows[0]["T"]
    starts = list(range(0, T, window))
    pick = sorted({0, *(i for i in range(len(starts)) if (i & (i - 1)) == 0), len(starts) - 1})
    label = lambda n: f"{n // 1024}K" if n and n % 1024 == 0 else str(n)  # noqa: E731
    head = " | ".join(f"{label(starts[i])}–{label(min(starts[i] + window, T))}" for i in pick)
    lines = [f"Tokens {T}, windows of {window}; each cell is the value in that window of the stream.", "",
             f"| config | measure | {head} |", "|---|---|" + "---:|" * len(pick)]
    for r in rows:
        for key in ("rounding", "amplification"):
            lines.append(f"| {r['config']} | {key} | " + " | ".join(f"{r[key][i]:.2g}" for i in pick) + " |")
    lines += ["", "Memory weight norms per layer at the end of the stream (Frobenius norm over all heads, "
              "float64):", ""]
    lines += [f"- {r['config']}: " + ", ".join(f"{n:.3g}" for n in r["final_weight_norms"]) for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="benchmarks/results/sensitivity")
    args = p.parse_args()
    names = args.configs.split(",")
    bad = [n for n in names if n not in CONFIGS and n not in EXTRA]
    if bad or args.length < 1 or args.window < 1:
        p.error(f"--configs from {', '.join([*CONFIGS, *EXTRA])} (got {bad}); --length and --window >= 1")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(measure(name, args.length, args.window))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        text = to_markdown(rows)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
