"""Does the memory's expansion come from forgetting *towards zero*? A token-level probe.

Takes the memory inputs (q, k, v, alpha, eta, theta, initial weights, LayerNorm) that one default
NeuralMemory layer (the issue-2 settings, float64, random inputs) hands to its inner loop, and runs
the inner loop token by token (chunk 1, autograd inner gradients, float64) with three forgetting
rules:

  zero:  W_t = (1 - alpha_t) W_{t-1} + S_t                    (the paper's, what titans implements)
  init:  W_t = (1 - alpha_t) W_{t-1} + alpha_t W_0 + S_t      (forget towards the initial weights)
  none:  W_t = W_{t-1} + S_t                                  (no forgetting)

For each it reports, per window, the amplification of a relative 1e-8 change of token 0's key
(output change / 1e-8) and the weight norm at the end. Not a model option (yet): a probe for
docs/training.md, "The same instability in the forward pass".

    python benchmarks/forgetting_probe.py                 # T = 8192, windows of 1024, about a minute
"""

from __future__ import annotations

import argparse
import sys

import torch
from memory_speed import CHUNK, DIM, EXPANSION, HEADS

import titans.memory.layer as layer_module
from titans.memory import NeuralMemory, memory_apply


def capture(T: int, seed: int = 0) -> dict:
    """The inputs of the layer's inner loop on random x (B = 1)."""
    got = {}
    original = layer_module.run_memory

    def grab(q, k, v, alpha, eta, theta, weights, **kw):
        got.update(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta, weights=weights, ln=kw["ln"])
        return original(q, k, v, alpha, eta, theta, weights, **kw)

    torch.manual_seed(seed)
    layer = NeuralMemory(DIM, HEADS, depth=2, expansion=EXPANSION, chunk_size=CHUNK).double()
    layer_module.run_memory = grab
    try:
        with torch.no_grad():
            layer(torch.randn(1, T, DIM, dtype=torch.float64))
    finally:
        layer_module.run_memory = original
    return {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in got.items()}


def token_loop(c: dict, rule: str, k: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """y (H, T, D) of the chunk-1 recurrence with the given forgetting rule."""
    W0 = [w.clone() for w in c["weights"]]
    W = [w.clone() for w in W0]
    S = [torch.zeros_like(w) for w in W0]
    q, v = c["q"][0], c["v"][0]          # (H, T, D)
    a, e, th = (c[n][0] for n in ("alpha", "eta", "theta"))  # (H, T)
    T = q.shape[1]
    ys = []
    for t in range(T):
        Ws = [w.requires_grad_() for w in W]
        with torch.enable_grad():
            pred = memory_apply(k[:, t:t + 1][None], Ws, c["ln"])[0]
            loss = 0.5 * (pred - v[:, t:t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, Ws)
        with torch.no_grad():
            at, et, tt = (x[:, t, None, None] for x in (a, e, th))
            S = [et * s - tt * g for s, g in zip(S, grads)]
            if rule == "zero":
                W = [(1 - at) * w + s for w, s in zip(W, S)]
            elif rule == "init":
                W = [(1 - at) * w + at * w0 + s for w, s, w0 in zip(W, S, W0)]
            else:
                W = [w + s for w, s in zip(W, S)]
            ys.append(memory_apply(q[:, t:t + 1][None], W, c["ln"])[0])
    return torch.cat(ys, dim=1), [w.norm().item() for w in W]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--rules", default="zero,init,none")
    args = p.parse_args()
    c = capture(args.length)
    starts = range(0, args.length, args.window)
    label = (lambda s: f"{s // 1024}K–{(s + args.window) // 1024}K") if args.window % 1024 == 0 else (  # noqa: E731
        lambda s: f"{s}–{s + args.window}")
    print("| forgetting | " + " | ".join(label(s) for s in starts) + " | weight norms at the end |")
    print("|---|" + "---:|" * (len(range(0, args.length, args.window)) + 1))
    for rule in args.rules.split(","):
        if rule not in ("zero", "init", "none"):
            p.error(f"--rules: zero, init or none, got {rule!r}")
        y0, norms = token_loop(c, rule, c["k"][0])
        k = c["k"][0].clone()
        k[:, 0] *= 1 + 1e-8
        y1, _ = token_loop(c, rule, k)
        amp = [((y1[:, s:s + args.window] - y0[:, s:s + args.window]).norm()
                / y0[:, s:s + args.window].norm() / 1e-8).item() for s in range(0, args.length, args.window)]
        print(f"| {rule} | " + " | ".join(f"{x:.2g}" for x in amp) + " | "
              + ", ".join(f"{n:.3g}" for n in norms) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
