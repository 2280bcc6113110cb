"""The neural memory in action (`titans memory-demo`).

A stream of key -> value pairs is written into the long-term memory one token at a time, with the
memory's own inner loop (`memory_chunked`, the function `NeuralMemory` runs) and constant gates.
The projections are fixed: the keys and values are given directly (random unit-norm keys, random
Gaussian values), so what you see is the test-time learning alone. Every number is measured:

1. Recall error while writing: after each token, how well the memory returns the value of each
   pair, ||M_W(k_i) - v_i||^2 / ||v_i||^2 (1 ~ knows nothing, 0 = perfect). It drops for a pair when
   that pair is written and keeps falling as the pairs are shown again.
2. Surprise per token: the norm of the inner gradient grad_W 1/2 ||M_W(k_t) - v_t||^2 at the weights
   before the token (the "momentary surprise" of the paper). High when a pair is new, low when the
   memory has already stored it.
3. Forgetting: the same stream with a larger forget gate alpha; the pairs written longest ago are
   recalled worse as alpha rises (W_t = (1 - alpha) W_{t-1} + S_t decays what is not rewritten).

The memory is linear (depth L_M = 1, M_W(k) = k W), the setting where these effects are cleanest;
its initial weights W_0 are those a fresh `NeuralMemory(depth=1)` starts from.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import MemoryState, NeuralMemory, memory_apply, memory_chunked

# The demo's set-up; recorded in memory_demo.json next to the numbers.
DIM = 64  # head dimension D (one head)
PAIRS = 16  # key -> value pairs in the stream
PASSES = 3  # the pairs are shown PASSES times, in the same order (pass 1: novel, then repeats)
THETA = 0.5  # inner learning rate
ETA = 0.5  # momentum decay (past surprise)
ALPHA = 0.0  # forget gate of the main run
ALPHA_SWEEP = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
GROUP = PAIRS // 4  # "earliest" / "latest" pairs in the alpha sweep: the first / last quarter

PNG_NAME = "memory_demo.png"
JSON_NAME = "memory_demo.json"


def _gates(T: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    full = lambda x: torch.full((1, 1, T), float(x))  # noqa: E731
    return full(alpha), full(ETA), full(THETA)


def _recall_errors(W, keys: Tensor, values: Tensor) -> Tensor:
    """||M_W(k_i) - v_i||^2 / ||v_i||^2 for every pair, (P,)."""
    pred = memory_apply(keys.view(1, 1, -1, DIM), W, None)[0, 0]
    return (pred - values).pow(2).sum(-1) / values.pow(2).sum(-1)


def _surprise(W, key: Tensor, value: Tensor) -> tuple[float, tuple[Tensor, ...]]:
    """Norm of grad_W 1/2 ||M_W(k) - v||^2 at W (autograd on a copy of W), and the gradient."""
    Wc = tuple(w.detach().clone().requires_grad_() for w in W)
    pred = memory_apply(key.view(1, 1, 1, DIM), Wc, None)[0, 0, 0]
    grads = torch.autograd.grad(0.5 * (pred - value).pow(2).sum(), Wc)
    return math.sqrt(sum(g.pow(2).sum().item() for g in grads)), grads


def _initial_weights(seed: int) -> tuple[Tensor, ...]:
    """W_0 of a freshly initialised NeuralMemory(depth=1), one head of width DIM."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = NeuralMemory(DIM, heads=1, depth=1)
    return tuple(w.detach().clone() for w in layer.weights)


def _write_stream(W0, k: Tensor, v: Tensor, alpha: float) -> MemoryState:
    """All tokens in one call (chunk size 1: the exact per-token recurrence)."""
    T = k.shape[2]
    return memory_chunked(k, k, v, *_gates(T, alpha), W0, chunk_size=1)[1]


def memory_demo(out_dir: Path, seed: int = 0) -> dict:
    """Run the demo, write `memory_demo.png` and `memory_demo.json` into out_dir, return the numbers.

    Returned keys: settings; recall_all / recall_written / surprise (one value per token);
    recall_per_pair (tokens x pairs); recall_before / recall_after_pass / surprise_mean_pass (the
    table); alpha_sweep (final recall error of the earliest, latest and all pairs per alpha);
    checks (consistency of the measurements with the memory's own state); png, json, seconds.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(PAIRS, DIM, generator=gen), dim=-1)
    values = torch.randn(PAIRS, DIM, generator=gen)
    W0 = _initial_weights(seed)
    order = [i for _ in range(PASSES) for i in range(PAIRS)]
    T = len(order)
    k = keys[order].view(1, 1, T, DIM)
    v = values[order].view(1, 1, T, DIM)

    # --- main run: one token per call, the state carried from call to call
    alpha1, eta1, theta1 = _gates(1, ALPHA)
    state: MemoryState | None = None
    W = tuple(w.unsqueeze(0) for w in W0)  # (B=1, H, D, D)
    with torch.no_grad():
        recall_before = _recall_errors(W, keys, values)
    per_pair, surprise, grad_check = [], [], 0.0
    for t, i in enumerate(order):
        s, g = _surprise(W, keys[i], values[i])
        surprise.append(s)
        S_prev = (torch.zeros_like(W[0]),) if state is None else state.momentum
        with torch.no_grad():
            _, state = memory_chunked(k[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                      alpha1, eta1, theta1, W0, chunk_size=1, state=state)
            W = state.weights
            per_pair.append(_recall_errors(W, keys, values))
            # the gradient the memory applied, read back from S_t = eta S_{t-1} - theta g_t
            applied = (ETA * S_prev[0] - state.momentum[0]) / THETA
            grad_check = max(grad_check, ((applied - g[0]).norm() / g[0].norm()).item())
    per_pair_t = torch.stack(per_pair)  # (T, P)
    written = [min(t + 1, PAIRS) for t in range(T)]
    recall_written = [per_pair_t[t, :n].mean().item() for t, n in enumerate(written)]
    recall_all = per_pair_t.mean(1).tolist()

    # --- forgetting: the same stream, whole-sequence calls, for several alphas
    with torch.no_grad():
        one_call = _write_stream(W0, k, v, ALPHA)
        stream_check = (one_call.weights[0] - W[0]).abs().max().item()
        sweep = []
        for a in ALPHA_SWEEP:
            err = _recall_errors(_write_stream(W0, k, v, a).weights, keys, values)
            sweep.append({"alpha": a, "earliest": err[:GROUP].mean().item(),
                          "latest": err[-GROUP:].mean().item(), "all": err.mean().item()})

    ends = [PAIRS * (p + 1) - 1 for p in range(PASSES)]
    result = {
        "settings": {
            "seed": seed, "memory": "linear (depth L_M = 1): M_W(k) = k W", "dim": DIM, "heads": 1,
            "pairs": PAIRS, "passes": PASSES, "tokens": T, "theta": THETA, "eta": ETA, "alpha": ALPHA,
            "chunk_size": 1, "earliest_latest_group": GROUP,
            "keys": "random, unit norm", "values": "random N(0, 1) per component",
        },
        "recall_before": recall_before.mean().item(),
        "recall_before_per_pair": recall_before.tolist(),
        "recall_after_pass": [recall_all[e] for e in ends],
        "surprise_mean_pass": [sum(surprise[p * PAIRS:(p + 1) * PAIRS]) / PAIRS for p in range(PASSES)],
        "alpha_sweep": sweep,
        "recall_all": recall_all,
        "recall_written": recall_written,
        "recall_per_pair": per_pair_t.tolist(),
        "surprise": surprise,
        "checks": {
            "surprise_vs_applied_gradient_max_rel_err": grad_check,
            "token_by_token_vs_one_call_max_abs_diff": stream_check,
        },
    }
    png, js = out_dir / PNG_NAME, out_dir / JSON_NAME
    _plot(result, png)
    result["png"], result["json"] = str(png), str(js)
    result["seconds"] = time.perf_counter() - t0
    js.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, passes = r["settings"]["pairs"], r["settings"]["passes"]
    T = P * passes
    x = list(range(1, T + 1))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    fig.suptitle(f"Titans neural memory in action: {P} key→value pairs written token by token, "
                 f"shown {passes}× (linear memory, D={r['settings']['dim']}, θ={THETA}, η={ETA})")

    ax = axes[0]
    per_pair = list(zip(*r["recall_per_pair"], strict=True))
    for i, curve in enumerate(per_pair):
        ax.plot([0, *x], [r["recall_before_per_pair"][i], *curve],
                color="0.75", lw=0.8, label="each pair" if i == 0 else None)
    ax.plot([0, *x], [r["recall_before"], *r["recall_all"]], color="C0", lw=2.2, label="mean, all pairs")
    ax.plot(x, r["recall_written"], color="C1", lw=1.6, ls="--", label="mean, pairs written so far")
    ax.set_yscale("log")
    ax.set_xlabel("tokens written")
    ax.set_ylabel("recall error  ‖M(k)−v‖² / ‖v‖²")
    ax.set_title("1. Recall error falls as pairs are written")
    ax.legend(fontsize=8, loc="lower left")

    ax = axes[1]
    colors = ["C3" if t < P else "C2" for t in range(T)]
    ax.bar(x, r["surprise"], color=colors, width=0.9)
    ax.set_ylim(0, 1.12 * max(r["surprise"]))  # room for the pass labels
    ax.bar([0], [0], color="C3", label="novel pair (pass 1)")
    ax.bar([0], [0], color="C2", label="repeat (passes 2+)")
    ax.set_xlabel("token")
    ax.set_ylabel("surprise  ‖∇_W ½‖M(k)−v‖²‖")
    ax.set_title("2. Surprise: high on novel pairs, low on repeats")
    ax.legend(fontsize=8)

    ax = axes[2]
    sw = r["alpha_sweep"]
    pos = list(range(len(sw)))
    g = r["settings"]["earliest_latest_group"]
    ax.plot(pos, [s["earliest"] for s in sw], "o-", color="C3", label=f"earliest {g} pairs")
    ax.plot(pos, [s["all"] for s in sw], "s-", color="C0", label="all pairs")
    ax.plot(pos, [s["latest"] for s in sw], "^-", color="C2", label=f"latest {g} pairs")
    ax.set_xticks(pos, [f"{s['alpha']:g}" for s in sw])
    ax.set_yscale("log")
    ax.set_xlabel("forget gate α")
    ax.set_ylabel("recall error at the end of the stream")
    ax.set_title("3. Forgetting: recall decays as α rises")
    ax.legend(fontsize=8)

    for ax in axes[:2]:
        for p in range(passes):
            if p:
                ax.axvline(P * p + 0.5, color="k", lw=0.6, ls=":")
            ax.text(P * (p + 0.5) + 0.5, 0.99, f"pass {p + 1}", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8, color="0.3")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(r: dict) -> str:
    """The terminal summary of a memory_demo result."""
    s = r["settings"]
    P, g = s["pairs"], s["earliest_latest_group"]
    lines = [
        f"Neural memory in action: {P} key->value pairs (D={s['dim']}, random unit-norm keys), "
        f"shown {s['passes']} times, one token at a time.",
        f"Memory: {s['memory']}; gates theta={s['theta']:g} (learning rate), eta={s['eta']:g} "
        f"(momentum), alpha={s['alpha']:g} (forgetting); seed {s['seed']}.",
        "Recall error = ||M(k)-v||^2/||v||^2 (1 ~ nothing stored, 0 = perfect); "
        "surprise = ||inner gradient|| at that token.",
        "",
        f"  {'':<24}{'recall error, all pairs':>25}{'mean surprise':>16}",
        f"  {'before writing':<24}{r['recall_before']:>25.4f}{'-':>16}",
    ]
    for p, (rec, sur) in enumerate(zip(r["recall_after_pass"], r["surprise_mean_pass"], strict=True)):
        label = f"after pass {p + 1} " + ("(novel)" if p == 0 else "(repeat)")
        lines.append(f"  {label:<24}{rec:>25.4f}{sur:>16.3f}")
    lines += [
        "",
        "Forgetting: the same stream with forget gate alpha; recall error at the end of the stream",
        f"  {'alpha':<10}{f'earliest {g} pairs':>18}{f'latest {g} pairs':>18}{'all pairs':>12}",
    ]
    for row in r["alpha_sweep"]:
        lines.append(f"  {row['alpha']:<10g}{row['earliest']:>18.4f}{row['latest']:>18.4f}"
                     f"{row['all']:>12.4f}")
    c = r["checks"]
    lines += [
        "",
        f"Checks: surprise vs the gradient the memory applied (from its momentum S_t): max rel. diff "
        f"{c['surprise_vs_applied_gradient_max_rel_err']:.1e}; token-by-token vs one call: max diff "
        f"{c['token_by_token_vs_one_call_max_abs_diff']:.1e}.",
    ]
    return "\n".join(lines)
