"""Shared pieces of the neural memory: the memory function M_W, its state, input checks.

Symbols follow SPEC.md §2: W (memory weights), S (surprise / momentum), alpha (forgetting),
eta (momentum decay), theta (inner learning rate), b (chunk size).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5

Weights = tuple[Tensor, ...]


@dataclass
class MemoryState:
    """Where a memory stream stands after some tokens.

    weights:     W_t, one tensor per layer, (B, H, D_{l-1}, D_l)
    momentum:    S_t, same shapes
    chunk_start: W at the start of the open chunk (every gradient of that chunk is taken there)
    position:    number of tokens seen so far (chunks are aligned to 0, b, 2b, ...)
    chunk_size:  b, recorded so that a state is never continued with another chunking
    """

    weights: Weights
    momentum: Weights
    chunk_start: Weights
    position: int
    chunk_size: int

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (truncated backprop through time)."""
        cut = lambda ts: tuple(t.detach() for t in ts)  # noqa: E731
        return MemoryState(cut(self.weights), cut(self.momentum), cut(self.chunk_start),
                           self.position, self.chunk_size)

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]


# ----------------------------------------------------------------------------- memory function

def layer_norm(z: Tensor) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim without affine parameters; returns (normalised, 1/std)."""
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    return zc * rstd, rstd


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """1 / RMS(x) over the last dim: x * rms_scale(x, eps) is RMSNorm(x) without its weight."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_backward(n: Tensor, r: Tensor, dn: Tensor) -> Tensor:
    """Gradient at x of n = x * r, r = rms_scale(x) (no weight), given dn."""
    return r * (dn - n * (dn * n).mean(-1, keepdim=True))


def silu_grad(x: Tensor, sig: Tensor) -> Tensor:
    """d/dx of SiLU(x) = x sigmoid(x), given sig = sigmoid(x): sig (1 + x (1 - sig))."""
    return sig * (1 + x * (1 - sig))


def gelu_grad(z: Tensor) -> Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z * phi(z)."""
    return gelu_backward(z.new_ones(()).expand_as(z), z)


def gelu_backward(dy: Tensor, z: Tensor) -> Tensor:
    """dy * GELU'(z) for the exact (erf) GELU, in one fused kernel (PyTorch's own GELU backward);
    written out as Phi(z) + z phi(z) in eager ops it took about six times as long on the CPU."""
    return torch.ops.aten.gelu_backward(dy, z)


def memory_apply(x: Tensor, weights: Weights, ln: tuple[Tensor, Tensor] | None) -> Tensor:
    """M_W(x) per head.

    x: (B, H, N, D); weights: layer l is (H, D_{l-1}, D_l) or (B, H, D_{l-1}, D_l);
    ln: (gamma, beta), each (H, D), present iff there are two or more layers.
    L = 1: x W_1.  L >= 2: x + gamma * LN(MLP_W(x)) + beta, GELU between layers.
    """
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    if len(weights) == 1:
        return h
    gamma, beta = ln
    return x + gamma.unsqueeze(-2) * layer_norm(h)[0] + beta.unsqueeze(-2)


# ----------------------------------------------------------------------------- input checks

def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _require(cond: bool, name: str, expected: str, actual: object) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {actual}")


@dataclass
class Spec:
    """The sizes every argument was checked against."""

    B: int
    H: int
    T: int
    D: int
    L: int
    per_layer_gates: bool
    dtype: torch.dtype


def _check_float(name: str, t: object) -> None:
    _require(isinstance(t, Tensor), name, "a torch.Tensor", type(t).__name__)
    _require(t.is_floating_point(), name, "a floating-point tensor (float32 or float64)", t.dtype)


FORGET_TO = ("zero", "init")


def check_inputs(q, k, v, alpha, eta, theta, weights, chunk_size, ln, state,
                 grad_clip=None, forget_to="zero", first_order=False, second_order=1.0) -> Spec:
    """Validate the arguments of memory_recurrent / memory_chunked; raise ValueError naming the
    argument, what was expected and what was given."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        _require(t.dim() == 4, name, "a 4-D tensor (B, H, T, D)", f"shape {_shape(t)}")
    _require(k.shape == q.shape, "k", f"the shape of q {_shape(q)}", f"shape {_shape(k)}")
    _require(v.shape == q.shape, "v", f"the shape of q {_shape(q)}", f"shape {_shape(v)}")
    B, H, T, D = q.shape
    _require(T >= 1, "q", "at least one token (T >= 1)", f"T = {T}")
    _require(isinstance(weights, (tuple, list)) and len(weights) >= 1, "weights",
             "a non-empty tuple of tensors, layer l of shape (H, D_{l-1}, D_l)", type(weights).__name__)
    L = len(weights)
    d_in = D
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        _check_float(name, w)
        d_out = D if i == L - 1 else w.shape[-1]
        _require(w.dim() == 3 and w.shape[0] == H and w.shape[1] == d_in and w.shape[2] == d_out,
                 name, f"shape ({H}, {d_in}, {d_out if i == L - 1 else 'D_l'})", f"shape {_shape(w)}")
        d_in = w.shape[2]
    gate_shapes = f"({B}, {H}, {T}) or ({B}, {H}, {T}, {L})"
    per_layer = None
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        _check_float(name, g)
        ok = _shape(g) in ((B, H, T), (B, H, T, L))
        _require(ok, name, f"shape {gate_shapes}", f"shape {_shape(g)}")
        this = g.dim() == 4
        _require(per_layer is None or this == per_layer, name,
                 "the same layout as the other gates (all shared or all per-layer)", f"shape {_shape(g)}")
        per_layer = this
    _require(isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1,
             "chunk_size", "a positive int", repr(chunk_size))
    if L == 1:
        _require(ln is None, "ln", "None for a one-layer (linear) memory", "a value")
    else:
        _require(isinstance(ln, (tuple, list)) and len(ln) == 2, "ln",
                 f"(gamma, beta), each of shape ({H}, {D}), for a {L}-layer memory",
                 "None" if ln is None else type(ln).__name__)
        for name, t in (("ln[0] (gamma)", ln[0]), ("ln[1] (beta)", ln[1])):
            _check_float(name, t)
            _require(_shape(t) == (H, D), name, f"shape ({H}, {D})", f"shape {_shape(t)}")
    if grad_clip is not None:
        _require(isinstance(grad_clip, (int, float)) and grad_clip > 0, "grad_clip",
                 "None or a positive number", repr(grad_clip))
    if state is not None:
        _require(isinstance(state, MemoryState), "state", "a MemoryState or None", type(state).__name__)
        _require(state.chunk_size == chunk_size, "state",
                 f"a state made with chunk_size={chunk_size}", f"chunk_size={state.chunk_size}")
        for field in ("weights", "momentum", "chunk_start"):
            ts = getattr(state, field)
            _require(len(ts) == L, f"state.{field}", f"{L} layer tensors", f"{len(ts)}")
            for i, (t, w) in enumerate(zip(ts, weights)):
                want = (B, *w.shape)
                _require(_shape(t) == want, f"state.{field}[{i}]", f"shape {want}", f"shape {_shape(t)}")
    _require(forget_to in FORGET_TO, "forget_to", " or ".join(map(repr, FORGET_TO)), repr(forget_to))
    _require(isinstance(first_order, bool), "first_order", "True or False", repr(first_order))
    _require(isinstance(second_order, (int, float)) and not isinstance(second_order, bool)
             and 0.0 <= second_order <= 1.0, "second_order", "a number in [0, 1]", repr(second_order))
    _require(not (first_order and second_order != 1.0), "second_order",
             "1.0 with first_order=True (first_order is second_order=0; pass one of them)",
             repr(second_order))
    dtypes = {t.dtype for t in (q, k, v, alpha, eta, theta, *weights)}
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    return Spec(B, H, T, D, L, bool(per_layer), dtype)


# ----------------------------------------------------------------------------- shared set-up

def no_autocast(device_type: str):
    """Turn autocast off: the memory recurrence always runs in float32 or float64."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def start_state(weights: Weights, state: MemoryState | None, spec: Spec, dtype: torch.dtype):
    """(W, S, G, position): weights, momentum and gradient base to start from, all (B, H, ., .)."""
    if state is None:
        W = tuple(w.to(dtype).expand(spec.B, *w.shape) for w in weights)
        S = tuple(torch.zeros_like(w) for w in W)
        return W, S, W, 0
    cast = lambda ts: tuple(t.to(dtype) for t in ts)  # noqa: E731
    return cast(state.weights), cast(state.momentum), cast(state.chunk_start), state.position


def per_layer_gate(g: Tensor, L: int) -> Tensor:
    """Gates as (B, H, T, L): a shared gate is repeated for every memory layer."""
    return g.unsqueeze(-1).expand(*g.shape, L) if g.dim() == 3 else g


def second_order_scale(first_order: bool, second_order: float) -> float:
    """The share of the inner gradients' own gradient into their chunk-start weights that the
    backward pass keeps: 0 with first_order, else second_order (1: exact)."""
    return 0.0 if first_order else float(second_order)
