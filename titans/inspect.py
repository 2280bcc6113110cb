"""The memory at work on a real document (`titans inspect --checkpoint PATH --text FILE`).

A trained model reads one document with a needle sentence inserted; for every neural memory in the
model (one per block) and every token t this measures, with the semantics of SPEC.md §2:

1. surprise: ||grad_W 1/2 ||M_W(k_t) - v_t||^2|| at the weights the recurrence uses for t (the start
   weights of t's chunk), per head, over all memory layers' weights together, before the gradient
   clamp. High: the memory could not predict v_t from k_t.
2. gates: alpha_t (forgetting), eta_t (momentum decay), theta_t (inner learning rate), per head.
3. recall: at checkpoints along the stream, ||M_{W_t}(k_s) - v_s||^2 / ||v_s||^2 for keys s written
   earlier (the needle's tokens, and a sample of earlier positions): how much of what was written
   the memory still returns.
4. needle: surprise on the needle's tokens against the document's median.

The k, v and gates are those the model's memory layers actually received (captured with forward
hooks on `NeuralMemory`; for MAC that is the attention output, segment by segment). The memory
stream is then replayed with the layer's own inner loop, stopping at chunk starts and checkpoints,
to read the weights W_t there. Outputs: inspect.png, inspect.html (the text coloured by surprise,
with per-token hover data) and inspect.json (every number).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TitansError
from .memory import NeuralMemory, memory_apply
from .memory.chunked import run_memory
from .memory.layer import NeuralMemoryState

DEFAULT_NEEDLE = "The secret pass key is 48213. Remember it."
RECALL_EVERY = 256  # tokens between recall checkpoints
RECALL_KEYS = 64  # earlier positions sampled at each checkpoint
SNAP = 64  # the needle goes to a whitespace boundary at most this many tokens from the target
PNG_NAME, HTML_NAME, JSON_NAME = "inspect.png", "inspect.html", "inspect.json"


# ----------------------------------------------------------------------------- the token stream

def token_pieces(tokenizer, ids: list[int], context: int = 8) -> list[str]:
    """The text each token adds to the stream (decoded with `context` tokens before it, so multi-byte
    characters and word-initial spaces come out right; a token inside a character gives "")."""
    def text(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b]).rstrip("\ufffd")  # an unfinished character is not text yet

    out = []
    for i in range(len(ids)):
        j = max(0, i - context)
        before, after = text(j, i), text(j, i + 1)
        out.append(after[len(before):] if after.startswith(before) else tokenizer.decode(ids[i:i + 1]))
    return out


def build_stream(tokenizer, text: str, needle: str, depth: float, max_tokens: int
                 ) -> tuple[list[int], tuple[int, int] | None]:
    """Token ids of `text` (truncated to max_tokens in all) with `needle` inserted at fraction `depth`
    of the document, at the nearest whitespace boundary; and the needle's token span [start, end)
    (None without a needle)."""
    if not 0 <= depth <= 1:
        raise TitansError(f"--depth must lie in [0, 1], got {depth}")
    if max_tokens < 1:
        raise TitansError(f"--max-tokens must be >= 1, got {max_tokens}")
    doc = tokenizer.encode(text)
    needle = needle.strip()
    if not needle:
        if not doc:
            raise TitansError("the text is empty")
        return doc[:max_tokens], None
    budget = max_tokens - len(tokenizer.encode(f" {needle} "))
    if budget < 0:
        raise TitansError(f"--max-tokens {max_tokens} leaves no room for the needle "
                          f"({len(tokenizer.encode(needle))} tokens)")
    full, doc = doc, doc[:budget]
    target = round(depth * len(doc))
    lo, hi = max(0, target - SNAP - 1), min(len(doc), target + SNAP + 1)
    window = token_pieces(tokenizer, doc[lo:hi])
    piece = lambda i: window[i - lo] if lo <= i < hi else ""  # noqa: E731

    def clean(i: int) -> bool:  # a boundary between words
        return i in (0, len(doc)) or piece(i - 1)[-1:].isspace() or piece(i)[:1].isspace()

    order = sorted(range(max(0, target - SNAP), min(len(doc), target + SNAP) + 1),
                   key=lambda i: abs(i - target))
    at = next((i for i in order if clean(i)), target)
    lead = "" if at == 0 or piece(at - 1)[-1:].isspace() else " "
    trail = "" if at == len(doc) or piece(at)[:1].isspace() else " "
    mid = tokenizer.encode(lead + needle + trail)
    before, after = doc[:at], doc[at:]
    excess = len(before) + len(mid) + len(after) - max_tokens
    if excess < 0:  # the needle took fewer tokens than the probe: fill up with the document
        after += full[budget:budget - excess]
    elif excess > 0:  # or more
        cut = min(excess, len(after))
        after = after[:len(after) - cut]
        before = before[excess - cut:]
    return before + mid + after, (len(before), len(before) + len(mid))


# ----------------------------------------------------------------------------- capture

def memory_layers(model) -> list[tuple[int, NeuralMemory]]:
    """(block index, NeuralMemory) for every block whose mixer holds a neural memory."""
    found = [(i, m) for i, block in enumerate(model.blocks) for m in block.mixer.modules()
             if isinstance(m, NeuralMemory)]
    if not found:
        variant = getattr(getattr(model, "config", None), "variant", type(model).__name__)
        raise TitansError(f"this model (variant {variant!r}) has no neural memory to inspect; "
                          "inspect works on the variants lmm, mac, mag, mal and ttt_mlp")
    return found


def _capture(model, tokens: Tensor, memories: list[tuple[int, NeuralMemory]]):
    """Run the model on tokens (1, T); return the logits and, per memory, its calls [(x, state)] and
    the state after its last call."""
    records = {i: {"calls": [], "final": None} for i, _ in memories}
    handles = []
    for i, mem in memories:
        def pre(module, args, kwargs, rec=records[i]):
            x = args[0] if args else kwargs["x"]
            state = args[1] if len(args) > 1 else kwargs.get("state")
            rec["calls"].append((x, state))

        def post(module, args, kwargs, output, rec=records[i]):
            rec["final"] = output[1]

        handles += [mem.register_forward_pre_hook(pre, with_kwargs=True),
                    mem.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            logits, _ = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return logits, records


def memory_inputs(mem: NeuralMemory, calls: list[tuple[Tensor, NeuralMemoryState | None]]) -> dict:
    """k, v (1, H, T, D) and alpha, eta, theta ((1, H, T) or (1, H, T, L)) of a memory's stream, from
    its calls: the same projections, convolution and gates its forward computes (layer.py `_memory`)."""
    parts: dict[str, list[Tensor]] = {n: [] for n in ("k", "v", "alpha", "eta", "theta")}
    with torch.no_grad():
        for x, state in calls:
            _, k, v, _ = mem._qkv(x, None if state is None else state.conv)
            alpha, eta, theta, _ = mem._gates(x, state)
            for name, t in zip(parts, (k, v, alpha, eta, theta)):
                parts[name].append(t)
    return {name: torch.cat(ts, dim=2) for name, ts in parts.items()}


# ----------------------------------------------------------------------------- measurement

def inner_grad_norm(weights: tuple[Tensor, ...], k: Tensor, v: Tensor, ln) -> Tensor:
    """||grad_W 1/2 ||M_W(k_i) - v_i||^2|| per head and key, over all memory layers' weights, in float64.

    weights: layer tensors (1, H, ., .) (one state for every key); k, v: (H, n, D) -> (H, n)."""
    n = k.shape[1]
    W = tuple(w.detach().double().expand(n, *w.shape[1:]).clone().requires_grad_() for w in weights)
    ln = None if ln is None else tuple(t.detach().double() for t in ln)
    with torch.enable_grad():  # batch = keys: each key gets its own copy of W, hence its own gradient
        pred = memory_apply(k.double().transpose(0, 1).unsqueeze(2), W, ln)[:, :, 0]
        loss = 0.5 * (pred - v.double().transpose(0, 1)).pow(2).sum()
        grads = torch.autograd.grad(loss, W)
    return torch.sqrt(sum(g.pow(2).sum((-2, -1)) for g in grads)).T


def recall_error(weights: tuple[Tensor, ...], k: Tensor, v: Tensor, ln) -> Tensor:
    """||M_W(k_i) - v_i||^2 / ||v_i||^2 per head and key. weights: (1, H, ., .); k, v: (H, n, D) -> (H, n)."""
    dt = weights[0].dtype
    ln = None if ln is None else tuple(t.detach().to(dt) for t in ln)
    pred = memory_apply(k.to(dt).unsqueeze(0), weights, ln)[0]
    v = v.to(dt)
    return (pred - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-12)


def recall_checkpoints(T: int, b: int, needle: tuple[int, int] | None, every: int) -> list[int]:
    """Stream positions t (tokens written) where recall is measured: every `every` tokens, the end,
    and around the needle: just before it, right after it, then b, 2b, 4b, ... tokens after it."""
    points = set(range(every, T + 1, every)) | {T}
    if needle is not None:
        start, end = needle
        points |= {start, end}
        step = b
        while end + step < T:
            points.add(end + step)
            step *= 2
    return sorted(points)


def _sample_positions(t: int, needle: tuple[int, int] | None, n: int) -> np.ndarray:
    """Up to n positions evenly spread over [0, t), outside the needle."""
    s = np.unique(np.linspace(0, t - 1, min(n, t)).round().astype(int)) if t > 0 else np.zeros(0, int)
    if needle is not None:
        s = s[(s < needle[0]) | (s >= needle[1])]
    return s


def measure_memory(mem: NeuralMemory, inputs: dict, needle: tuple[int, int] | None, *,
                   recall_every: int = RECALL_EVERY, recall_keys: int = RECALL_KEYS) -> dict:
    """Surprise, gates and recall for one memory stream (see the module docstring).

    inputs: from memory_inputs (batch 1). The stream is replayed with the layer's inner loop
    (`run_memory`, what NeuralMemory.forward runs), stopping at every chunk start (the weights all
    gradients of that chunk are taken at) and at every recall checkpoint (W_t there)."""
    k, v = inputs["k"][0], inputs["v"][0]  # (H, T, D)
    H, T, _ = k.shape
    b, ln = mem.chunk_size, mem.ln
    gates = {n: inputs[n][0] for n in ("alpha", "eta", "theta")}  # (H, T) or (H, T, L)
    checkpoints = recall_checkpoints(T, b, needle, recall_every)
    bins = np.arange(max(1, math.ceil(math.log2(max(T, 2)))) + 1)  # ages [2^i, 2^(i+1))
    age_sum, age_n = np.zeros((H, len(bins))), np.zeros(len(bins))
    surprise = torch.zeros(H, T, dtype=torch.float64)
    out_norm = torch.zeros(H, T, dtype=torch.float64)  # ||M_W(k_t)|| at t's chunk-start weights
    needle_err = np.full((H, len(checkpoints)), np.nan)
    sample_err = np.full((H, len(checkpoints)), np.nan)
    stops = sorted(set(range(0, T, b)) | set(checkpoints) | {0, T})
    W = tuple(w.detach().unsqueeze(0) for w in mem.weights)  # W_0, (1, H, ., .)
    ln_w = None if ln is None else tuple(t.detach().to(W[0].dtype) for t in ln)  # in W's dtype, once
    state = None
    with torch.no_grad():
        for p, nxt in zip(stops, stops[1:] + [None]):
            if p % b == 0 and p < T:  # a chunk starts: its gradients are all taken at W_p
                surprise[:, p:p + b] = inner_grad_norm(W, k[:, p:p + b], v[:, p:p + b], ln)
                out_norm[:, p:p + b] = memory_apply(k[:, p:p + b].to(W[0].dtype).unsqueeze(0), W,
                                                    ln_w)[0].norm(dim=-1)
            if p in checkpoints:
                c = checkpoints.index(p)
                if needle is not None and (p == needle[0] or p >= needle[1]):
                    sl = slice(*needle)
                    needle_err[:, c] = recall_error(W, k[:, sl], v[:, sl], ln).mean(1).cpu().numpy()
                s = _sample_positions(p, needle, recall_keys)
                if len(s):
                    err = recall_error(W, k[:, s], v[:, s], ln).double().cpu().numpy()  # (H, n)
                    sample_err[:, c] = err.mean(1)
                    idx = np.minimum(np.floor(np.log2(p - s)).astype(int), len(bins) - 1)
                    np.add.at(age_sum.T, idx, err.T)
                    np.add.at(age_n, idx, 1)
            if nxt is None:
                break
            g = {n: t[None, :, p:nxt] for n, t in gates.items()}
            kk, vv = inputs["k"][:, :, p:nxt], inputs["v"][:, :, p:nxt]
            _, state = run_memory(kk, kk, vv, g["alpha"], g["eta"], g["theta"], tuple(mem.weights),
                                  chunk_size=b, ln=ln, state=state, grad_clip=mem.grad_clip, read=False,
                                  forget_to=mem.forget_to)
            W = state.weights
    with np.errstate(invalid="ignore"):
        age_err = np.where(age_n > 0, age_sum / np.maximum(age_n, 1), np.nan)
    surprise = surprise.numpy()
    return {
        "surprise": surprise,
        **{n: g.double().cpu().numpy() for n, g in gates.items()},
        "clipped": None if mem.grad_clip is None else float((surprise > mem.grad_clip).mean()),
        # the scale of what the memory is asked to store against the scale it outputs: a deep
        # memory's M(k) - k = gamma LN(h) + beta has a norm fixed by the outer LN parameters, so
        # values far larger (or smaller) than that can never be fitted (recall error ~1)
        "value_norm": float(v.double().norm(dim=-1).median()),
        "output_norm": float(out_norm.median()),
        "recall_at": np.array(checkpoints),
        "recall_needle": needle_err,
        "recall_sample": sample_err,
        "recall_age_bins": 2 ** bins,
        "recall_age": age_err,
        "final_weights": W,
    }


def inspect_memory(model, tokenizer, text: str, *, needle: str | None = None, depth: float = 0.5,
                   max_tokens: int = 4096, layers: list[int] | None = None,
                   recall_every: int = RECALL_EVERY, recall_keys: int = RECALL_KEYS) -> dict:
    """Measure every neural memory of `model` (a TitansLM) reading `text` with a needle inserted.

    needle: the sentence to insert (None: DEFAULT_NEEDLE; "" inserts none); depth: where, as a
    fraction of the document; max_tokens: the stream is cut to this many tokens (needle included);
    layers: block indices to measure (None: all with a memory).
    Returns a dict: tokens, pieces (text per token), needle {text, start, end} or None, loss (next-
    token loss per token, nats), and `layers`, one dict per memory with arrays
    surprise (H, T); alpha, eta, theta (H, T) or (H, T, L) with per-layer gates; recall_at (C,) the
    checkpoints (tokens written); recall_needle / recall_sample (H, C) the mean recall error of the
    needle's pairs / of sampled earlier pairs there (NaN where not measured); recall_age (H, A) the
    error by age t - s, ages in [recall_age_bins[i], 2 recall_age_bins[i]); plus summary numbers.
    """
    t0 = time.perf_counter()
    memories = memory_layers(model)
    if layers is not None:
        unknown = sorted(set(layers) - {i for i, _ in memories})
        if unknown:
            raise TitansError(f"--layer {unknown}: the blocks with a neural memory are "
                              f"{[i for i, _ in memories]}")
        memories = [(i, m) for i, m in memories if i in layers]
    needle = DEFAULT_NEEDLE if needle is None else needle
    ids, span = build_stream(tokenizer, text, needle, depth, max_tokens)
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    logits, records = _capture(model, tokens, memories)
    loss = torch.full((len(ids),), float("nan"), dtype=torch.float64)
    if len(ids) > 1:
        loss[1:] = F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="none").cpu()
    out_layers = []
    for i, mem in memories:
        rec = records[i]
        inputs = memory_inputs(mem, rec["calls"])
        if inputs["k"].shape[2] != len(ids):
            raise RuntimeError(f"inspect: block {i}'s memory saw {inputs['k'].shape[2]} tokens, "
                               f"the stream has {len(ids)}")
        m = measure_memory(mem, inputs, span, recall_every=recall_every, recall_keys=recall_keys)
        final = rec["final"].memory.weights  # what the model itself ended with: the replay must agree
        W = m.pop("final_weights")
        m["replay_error"] = max(float((a - c).abs().max() / c.abs().max().clamp_min(1e-30))
                                for a, c in zip(W, final))
        m.update(layer=i, mixer=type(model.blocks[i].mixer).__name__, heads=mem.heads,
                 chunk_size=mem.chunk_size, grad_clip=mem.grad_clip, theta_max=mem.theta_max,
                 **_needle_stats(layer_series(m)["surprise"], span))
        out_layers.append(m)
    cfg = getattr(model, "config", None)
    return {
        "config": cfg.to_dict() if cfg is not None else None,
        "tokens": ids,
        "pieces": token_pieces(tokenizer, ids),
        "needle": None if span is None else {"text": needle.strip(), "start": span[0], "end": span[1],
                                             "depth": depth},
        "loss": loss.numpy(),
        "layers": out_layers,
        "seconds": time.perf_counter() - t0,
    }


def layer_series(m: dict, head: int | None = None) -> dict:
    """One curve per quantity for a measured layer: surprise over all heads' weights together (the
    root sum of squares; or one head's), gates averaged over heads (and memory layers)."""
    def pick(a: np.ndarray) -> np.ndarray:
        a = a if head is None else a[head:head + 1]
        return a.mean(axis=tuple(d for d in range(a.ndim) if d != 1))

    s = m["surprise"]
    s = np.sqrt((s ** 2).sum(0)) if head is None else s[head]
    return {"surprise": s, **{n: pick(m[n]) for n in ("alpha", "eta", "theta")},
            **{n: pick(m[n]) for n in ("recall_needle", "recall_sample", "recall_age")}}


def _needle_stats(surprise: np.ndarray, span: tuple[int, int] | None) -> dict:
    inside = np.zeros(len(surprise), bool)
    if span is not None:
        inside[span[0]:span[1]] = True
    doc = surprise[~inside] if (~inside).any() else surprise
    out = {"median_surprise": float(np.median(doc))}
    if span is not None:
        nd = surprise[inside]
        out.update(needle_surprise=float(nd.mean()), needle_surprise_max=float(nd.max()),
                   needle_ratio=float(nd.mean() / max(np.median(doc), 1e-30)),
                   needle_percentile=float((doc < nd.mean()).mean() * 100))
    return out


# ----------------------------------------------------------------------------- report

def _needle_recall_points(r: dict, series: dict) -> tuple[float, float, float]:
    """Needle recall error just before it, right after it and at the end of the stream."""
    if r["needle"] is None:
        return (math.nan,) * 3
    at = list(r["layers"][0]["recall_at"])
    e = series["recall_needle"]
    return e[at.index(r["needle"]["start"])], e[at.index(r["needle"]["end"])], e[-1]


def format_table(r: dict, head: int | None = None) -> str:
    """The terminal summary: one row per memory layer."""
    nd = r["needle"]
    who = "all heads" if head is None else f"head {head}"
    where = f", needle at tokens [{nd['start']}, {nd['end']}): {nd['text']!r}" if nd else ", no needle"
    lines = [f"{len(r['tokens'])} tokens{where}  ({who})", ""]
    head_row = (f"{'block':>5} {'mixer':>5} {'surprise':>9} {'needle':>9} {'ratio':>6} {'pct':>5} "
                f"{'alpha':>7} {'eta':>6} {'theta':>6} {'clip%':>6} {'|v|':>7} {'|M(k)|':>7}  "
                "needle recall err before/after/end")
    lines += [head_row, "-" * len(head_row)]
    for m in r["layers"]:
        s = layer_series(m, head)
        st = _needle_stats(s["surprise"], None if nd is None else (nd["start"], nd["end"]))
        before, after, end = _needle_recall_points(r, s)
        clip = "-" if m["clipped"] is None else f"{100 * m['clipped']:.1f}"
        lines.append(f"{m['layer']:>5} {m['mixer']:>5} {st['median_surprise']:>9.3g} "
                     f"{st.get('needle_surprise', math.nan):>9.3g} {st.get('needle_ratio', math.nan):>6.2f} "
                     f"{st.get('needle_percentile', math.nan):>5.0f} {s['alpha'].mean():>7.4f} "
                     f"{s['eta'].mean():>6.3f} {s['theta'].mean():>6.3f} {clip:>6} "
                     f"{m['value_norm']:>7.3g} {m['output_norm']:>7.3g}  "
                     f"{before:.3f} / {after:.3f} / {end:.3f}")
    lines += ["", "surprise: median over the document; needle: mean over the needle's tokens; "
              "ratio = needle / median; pct: percentile of the needle's mean among document tokens; "
              "|v|, |M(k)|: median norms of the values written and of the memory's outputs for their keys "
              "(far apart: the memory cannot fit its values); recall err = ||M(k)-v||^2/||v||^2"]
    return "\n".join(lines)


def _shade(ax, r: dict, x0: float = 0) -> None:
    if r["needle"] is not None:
        ax.axvspan(r["needle"]["start"] - x0, r["needle"]["end"] - x0, color="gold", alpha=0.35, lw=0,
                   label="needle")


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    n = max(1, min(n, len(x)))
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = (c[n:] - c[:-n]) / n
    return np.concatenate([np.full(n - 1, np.nan), out])


def _plot(r: dict, path: Path, head: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(r["tokens"])
    x = np.arange(T)
    series = [(m["layer"], layer_series(m, head)) for m in r["layers"]]
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(series), 1)))
    fig = plt.figure(figsize=(15, 11), constrained_layout=True)
    gs = fig.add_gridspec(3, 3)
    variant = (r.get("config") or {}).get("variant", "?")
    who = "all heads" if head is None else f"head {head}"
    fig.suptitle(f"Titans neural memory on a document: {variant}, {T} tokens, {who}"
                 + (f"; needle: {r['needle']['text']!r}" if r["needle"] else ""))

    ax = fig.add_subplot(gs[0, :])
    win = max(1, T // 128)
    for (i, s), c in zip(series, colors):
        ax.plot(x, s["surprise"], color=c, lw=0.5, alpha=0.35)
        ax.plot(x, _smooth(s["surprise"], win), color=c, lw=1.6, label=f"block {i} (mean of {win})")
    _shade(ax, r)
    ax.set_yscale("log")
    ax.set_xlabel("token")
    ax.set_ylabel("surprise  ‖∇_W ½‖M_W(k_t)−v_t‖²‖")
    ax.set_title("1. Surprise per token (inner gradient at the chunk-start weights)")
    ax.legend(fontsize=8, ncol=min(6, len(series) + 1), loc="upper right")

    names = {"alpha": "α (forget)", "eta": "η (momentum decay)", "theta": "θ (inner learning rate)"}
    for j, (g, label) in enumerate(names.items()):
        ax = fig.add_subplot(gs[1, j])
        for (i, s), c in zip(series, colors):
            ax.plot(x, s[g], color=c, lw=0.4, alpha=0.25)
            ax.plot(x, _smooth(s[g], win), color=c, lw=1.4, label=f"block {i}")
        _shade(ax, r)
        ax.set_xlabel("token")
        ax.set_title(f"2. Gate {label}, mean of {win} tokens")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(gs[2, :2])
    if r["needle"] is not None:
        at = r["layers"][0]["recall_at"]
        end, length = r["needle"]["end"], r["needle"]["end"] - r["needle"]["start"]
        for (i, s), c in zip(series, colors):
            ok = ~np.isnan(s["recall_needle"])
            ax.plot(at[ok] - end, s["recall_needle"][ok], "o-", color=c, ms=3, label=f"block {i}")
        ax.axvspan(-length, 0, color="gold", alpha=0.35, lw=0, label="needle written")
        ax.set_xscale("symlog", linthresh=max(1, r["layers"][0]["chunk_size"]))
        ax.set_yscale("log")
        ax.axhline(1, color="0.4", lw=0.8, ls=":", label="= predicting 0")
        ax.set_xlabel("tokens since the needle's end (left point: just before the needle)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no needle", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("recall error  ‖M_{W_t}(k_s)−v_s‖² / ‖v_s‖²")
    ax.set_title("3. Recall of the needle's key→value pairs as the stream goes on")

    ax = fig.add_subplot(gs[2, 2])
    for (i, s), c in zip(series, colors):
        ages = r["layers"][0]["recall_age_bins"]
        ok = ~np.isnan(s["recall_age"])
        ax.plot(ages[ok], s["recall_age"][ok], "o-", color=c, ms=3, label=f"block {i}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1, color="0.4", lw=0.8, ls=":")
    ax.set_xlabel("age t − s of the pair (tokens, bin start)")
    ax.set_ylabel("recall error")
    ax.set_title("4. Recall of document pairs by age")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percentile(a: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(a))
    ranks[np.argsort(a, kind="stable")] = np.arange(len(a))
    return ranks / max(len(a) - 1, 1)


def _colour(p: float) -> str:
    a = max(0.0, 2 * p - 1) ** 1.5 * 0.85  # below the median: no tint
    return f"rgba(230,60,20,{a:.2f})"


_SCRIPT = """
const P = JSON.parse(document.getElementById('pct').textContent);
const spans = document.querySelectorAll('#text span');
function col(p) { const a = Math.pow(Math.max(0, 2 * p - 1), 1.5) * 0.85; return `rgba(230,60,20,${a})`; }
document.getElementById('by').addEventListener('change', e => {
  const p = P[e.target.value]; spans.forEach((s, i) => { s.style.background = col(p[i]); });
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
#text { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.6;
        border: 1px solid #ddd; padding: 1em; }
#text span:hover { outline: 1px solid #000; }
#text span.n { box-shadow: inset 0 -3px 0 #d4a000; }
img { max-width: 100%; }
"""


def _html(r: dict, png: Path, head: int | None) -> str:
    e = html.escape
    T = len(r["tokens"])
    series = [(m["layer"], layer_series(m, head)) for m in r["layers"]]
    pct = {f"block {i}": _percentile(s["surprise"]) for i, s in series}
    pct = {"all blocks": np.mean(list(pct.values()), axis=0), **pct}
    nd = r["needle"]
    in_needle = lambda t: nd is not None and nd["start"] <= t < nd["end"]  # noqa: E731
    spans = []
    for t, piece in enumerate(r["pieces"]):
        rows = [f"pos {t}  {json.dumps(piece, ensure_ascii=False)}  id {r['tokens'][t]}  "
                f"loss {r['loss'][t]:.3f}" + ("  [needle]" if in_needle(t) else "")]
        rows += [f"block {i}: surprise {s['surprise'][t]:.4g}  alpha {s['alpha'][t]:.4g}  "
                 f"eta {s['eta'][t]:.4g}  theta {s['theta'][t]:.4g}" for i, s in series]
        cls = ' class="n"' if in_needle(t) else ""
        spans.append(f'<span{cls} title="{e(chr(10).join(rows))}" '
                     f'style="background:{_colour(pct["all blocks"][t])}">{e(piece)}</span>')
    options = "".join(f'<option value="{e(k)}">{e(k)}</option>' for k in pct)
    table = ["<tr><th>block</th><th>mixer</th><th>median surprise</th><th>needle surprise</th><th>ratio</th>"
             "<th>percentile</th><th>mean α</th><th>mean η</th><th>mean θ</th><th>median |v|</th>"
             "<th>median |M(k)|</th><th>needle recall err before / after / end</th></tr>"]
    for m, (_, s) in zip(r["layers"], series):
        st = _needle_stats(s["surprise"], None if nd is None else (nd["start"], nd["end"]))
        rec = " / ".join(f"{v:.3f}" for v in _needle_recall_points(r, s))
        table.append(f"<tr><td>{m['layer']}</td><td>{e(m['mixer'])}</td><td>{st['median_surprise']:.4g}</td>"
                     f"<td>{st.get('needle_surprise', math.nan):.4g}</td>"
                     f"<td>{st.get('needle_ratio', math.nan):.2f}</td>"
                     f"<td>{st.get('needle_percentile', math.nan):.0f}</td><td>{s['alpha'].mean():.4f}</td>"
                     f"<td>{s['eta'].mean():.3f}</td><td>{s['theta'].mean():.3f}</td>"
                     f"<td>{m['value_norm']:.3g}</td><td>{m['output_norm']:.3g}</td><td>{rec}</td></tr>")
    img = base64.b64encode(png.read_bytes()).decode() if png.exists() else ""
    pct_json = json.dumps({k: [round(float(p), 3) for p in v] for k, v in pct.items()})
    variant = (r.get("config") or {}).get("variant", "?")
    needle_line = (f"Needle {e(repr(nd['text']))} at tokens [{nd['start']}, {nd['end']}) "
                   f"(underlined in the text)." if nd else "No needle.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>titans inspect: {e(variant)}, {T} tokens</title>
<style>{_STYLE}</style></head><body>
<h1>The neural memory at work: {e(variant)}, {T} tokens</h1>
<p>{needle_line} Surprise is the norm of the inner gradient
∇<sub>W</sub> ½‖M<sub>W</sub>(k<sub>t</sub>)−v<sub>t</sub>‖² at the weights the memory uses for token t
({"all heads together" if head is None else f"head {head}"});
α, η, θ are the forget, momentum-decay and inner-learning-rate gates (mean over heads).</p>
<table>{''.join(table)}</table>
<p><img alt="surprise, gates and recall plots" src="data:image/png;base64,{img}"></p>
<h2>The document, token by token</h2>
<p>Background: the token's surprise percentile within the document (no tint below the median, red = the
most surprising). Hover a token for its position, text, next-token loss, surprise and gates per block.
Colour by <select id="by">{options}</select></p>
<div id="text">{''.join(spans)}</div>
<script type="application/json" id="pct">{pct_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return None if not math.isfinite(f) else float(f"{f:.6g}")
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(result: dict, out_dir: str | Path, *, head: int | None = None) -> tuple[Path, Path]:
    """Write inspect.png, inspect.html and inspect.json into out_dir; return (png, html) paths.
    head: report one memory head instead of all heads together (the JSON always holds every head)."""
    if head is not None and not 0 <= head < result["layers"][0]["heads"]:
        raise TitansError(f"--head must lie in [0, {result['layers'][0]['heads']}), got {head}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, page, js = out / PNG_NAME, out / HTML_NAME, out / JSON_NAME
    _plot(result, png, head)
    page.write_text(_html(result, png, head), encoding="utf-8")
    js.write_text(json.dumps(_jsonable(result)) + "\n", encoding="utf-8")
    return png, page


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run folder (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("--text", required=True, type=Path, metavar="FILE", help="a UTF-8 text file to read")
    parser.add_argument("--needle", default=DEFAULT_NEEDLE, metavar="TEXT",
                        help=f"sentence inserted into the text ('' for none; default: {DEFAULT_NEEDLE!r})")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle goes, 0-1 (default: 0.5)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                        help="cut the stream to N tokens, needle included (default: 4096)")
    parser.add_argument("--out", type=Path, default=Path("out/inspect"), metavar="DIR",
                        help="where inspect.png/.html/.json go (default: out/inspect)")
    parser.add_argument("--layer", type=int, action="append", metavar="I",
                        help="measure only block I (repeatable; default: every block with a memory)")
    parser.add_argument("--head", type=int, default=None, metavar="H",
                        help="plot and colour one memory head (default: all heads together)")
    parser.add_argument("--recall-every", type=int, default=RECALL_EVERY, metavar="N",
                        help=f"tokens between recall checkpoints (default: {RECALL_EVERY})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load

    if args.recall_every < 1:
        raise TitansError(f"--recall-every must be >= 1, got {args.recall_every}")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TitansError(f"--text {args.text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TitansError(f"--text {args.text}: cannot read it ({e.strerror or e})") from None
    model, tokenizer = load(args.checkpoint, device=args.device)
    result = inspect_memory(model, tokenizer, text, needle=args.needle, depth=args.depth,
                            max_tokens=args.max_tokens, layers=args.layer, recall_every=args.recall_every)
    result["checkpoint"] = str(args.checkpoint)
    png, page = write_report(result, args.out, head=args.head)
    print(format_table(result, args.head))
    print()
    print(f"Plot:    {png}")
    print(f"Page:    {page}")
    print(f"Numbers: {Path(args.out) / JSON_NAME}")
    print(f"Done in {result['seconds']:.1f} s.")
    return 0
