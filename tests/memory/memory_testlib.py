"""Shared helpers for the neural-memory tests: random inputs, error measures, state handling.

Imported by the test modules of this folder as `from memory_testlib import ...` (pytest puts the
folder of a test file without __init__.py on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.memory import MemoryState, NeuralMemory, memory_chunked, memory_recurrent

FUNCS = {"recurrent": memory_recurrent, "chunked": memory_chunked}


@dataclass
class MemInputs:
    """The arguments of memory_recurrent / memory_chunked (without the keyword options)."""

    q: Tensor
    k: Tensor
    v: Tensor
    alpha: Tensor
    eta: Tensor
    theta: Tensor
    weights: tuple[Tensor, ...]
    ln: tuple[Tensor, Tensor] | None

    @property
    def T(self) -> int:
        return self.q.shape[2]

    def tensors(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) for every tensor argument, in a fixed order."""
        out = [(n, getattr(self, n)) for n in ("q", "k", "v", "alpha", "eta", "theta")]
        out += [(f"weights[{i}]", w) for i, w in enumerate(self.weights)]
        if self.ln is not None:
            out += [("gamma", self.ln[0]), ("beta", self.ln[1])]
        return out

    def leaves(self) -> MemInputs:
        """A copy whose tensors are fresh autograd leaves."""
        leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
        return MemInputs(*(leaf(getattr(self, n)) for n in ("q", "k", "v", "alpha", "eta", "theta")),
                         tuple(leaf(w) for w in self.weights),
                         None if self.ln is None else (leaf(self.ln[0]), leaf(self.ln[1])))

    def tokens(self, start: int, stop: int) -> MemInputs:
        """Tokens [start, stop) of the sequence (same weights and ln)."""
        cut = lambda t: t[:, :, start:stop]  # noqa: E731
        return replace(self, q=cut(self.q), k=cut(self.k), v=cut(self.v), alpha=cut(self.alpha),
                       eta=cut(self.eta), theta=cut(self.theta))


def make_inputs(B: int = 2, H: int = 2, T: int = 22, D: int = 5, L: int = 2, *, per_layer: bool = False,
                expansion: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64,
                theta_max: float | None = None) -> MemInputs:
    """Random, well-conditioned inputs: q, k L2-normalised (as the layer makes them), gates in
    moderate ranges, W_0 scaled by 1/sqrt(fan-in), LayerNorm affine near identity.

    Conditioning matters for the 1e-9 float64 comparisons: the inner loop of a deep memory amplifies
    rounding (perturbing q, k by 1e-15 moves a 3-layer recurrent run by up to ~1e-9 with theta ~ 0.1:
    LayerNorm of a hidden output with a small spread). So a 3-layer memory gets a smaller inner
    learning rate, larger W_0 and smaller targets by default."""
    deep = L >= 3
    if theta_max is None:
        theta_max = 0.045 if deep else 0.15
    w_scale, v_scale = (1.5, 0.5) if deep else (1.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    rand = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(randn(B, H, T, D), dim=-1)
    k = F.normalize(randn(B, H, T, D), dim=-1)
    v = v_scale * randn(B, H, T, D)
    gshape = (B, H, T, L) if per_layer else (B, H, T)
    alpha, eta = rand(0.0, 0.3, *gshape), rand(0.0, 0.95, *gshape)
    theta = rand(theta_max / 15, theta_max, *gshape)
    dims = [D] + [D * expansion] * (L - 1) + [D]
    weights = tuple(w_scale * randn(H, dims[i], dims[i + 1]) / dims[i] ** 0.5 for i in range(L))
    ln = None if L == 1 else (1.0 + 0.2 * randn(H, D), 0.1 * randn(H, D))
    return MemInputs(q, k, v, alpha, eta, theta, weights, ln)


def run(fn, inp: MemInputs, chunk_size: int, state: MemoryState | None = None,
        grad_clip: float | None = None, forget_to: str = "zero", **options):
    """fn(...) on the inputs; fn is memory_recurrent, memory_chunked or a FUNCS key."""
    fn = FUNCS.get(fn, fn) if isinstance(fn, str) else fn
    return fn(inp.q, inp.k, inp.v, inp.alpha, inp.eta, inp.theta, inp.weights, chunk_size=chunk_size,
              ln=inp.ln, state=state, grad_clip=grad_clip, forget_to=forget_to, **options)


# ----------------------------------------------------------------------------- comparisons

def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||  (or ||a|| when b is exactly zero)."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    diff = (a - b).norm()
    return float(diff / nb) if nb > 0 else float(diff)


def assert_rel_close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


STATE_FIELDS = ("weights", "momentum", "chunk_start")


def state_tensors(state: MemoryState) -> list[tuple[str, Tensor]]:
    return [(f"{f}[{i}]", t) for f in STATE_FIELDS for i, t in enumerate(getattr(state, f))]


def assert_states_close(a: MemoryState, b: MemoryState, tol: float, what: str = "state") -> None:
    assert a.position == b.position, f"{what}: position {a.position} != {b.position}"
    assert a.chunk_size == b.chunk_size, f"{what}: chunk_size {a.chunk_size} != {b.chunk_size}"
    for (name, ta), (_, tb) in zip(state_tensors(a), state_tensors(b), strict=True):
        assert_rel_close(ta, tb, tol, f"{what}.{name}")


def leaf_state(state: MemoryState) -> MemoryState:
    """The state with every tensor a fresh autograd leaf (so gradients into it can be compared)."""
    leaf = lambda ts: tuple(t.detach().clone().requires_grad_() for t in ts)  # noqa: E731
    kw = {f.name: getattr(state, f.name) for f in fields(state)}
    kw.update({f: leaf(getattr(state, f)) for f in STATE_FIELDS})
    return MemoryState(**kw)


def random_functional(y: Tensor, state: MemoryState, seed: int) -> Tensor:
    """A random linear functional of y and of every tensor of the final state (so gradients flow
    through the output path and through the state path)."""
    g = torch.Generator().manual_seed(seed)
    terms = [y, *(t for _, t in state_tensors(state))]
    return sum((torch.randn(t.shape, generator=g, dtype=t.dtype) * t).sum() for t in terms)


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """d loss / d tensors; a tensor the loss does not depend on gets zeros."""
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if gd is None else gd for gd, t in zip(gs, tensors, strict=True)]


# ----------------------------------------------------------------------------- the layer

LAYER_OPTIONS = {
    "default": {},
    "depth1": {"depth": 1},
    "per_layer_gates_depth3": {"depth": 3, "per_layer_gates": True},
    "chunk_gates": {"chunk_gates": True},
    "chunk_gates_depth1": {"chunk_gates": True, "depth": 1},
    "no_momentum": {"momentum": False},
    "no_forgetting": {"forgetting": False},
    "no_conv": {"conv": False},
    "all_off": {"momentum": False, "forgetting": False, "conv": False},
    "grad_clip": {"grad_clip": 0.05},
    "forget_to_init": {"forget_to": "init"},
    "first_order": {"first_order": True},
    "second_order_half": {"second_order": 0.5},
}


def make_layer(seed: int = 0, dim: int = 8, heads: int = 2, chunk_size: int = 4, dtype=torch.float64,
               **opts) -> NeuralMemory:
    """A small NeuralMemory (expansion 2 unless given), seeded, in `dtype`."""
    torch.manual_seed(seed)
    opts.setdefault("expansion", 2)
    return NeuralMemory(dim, heads, chunk_size=chunk_size, **opts).to(dtype)


def require_native() -> None:
    """Skip where no C++ compiler exists; elsewhere the native chunk loops must have built."""
    import shutil

    import pytest

    from titans.memory import native

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native chunk loops cannot be built here")
    assert native.chunks_native(), f"the native chunk loops did not build: {native._STATE['error']}"


class ExtensionSpy:
    """Stands in for the built extension (`native._STATE["module"]`, after `require_native`): records
    the name of every entry point looked up in `calls` and hands out the real one."""

    def __init__(self):
        from titans.memory import native

        require_native()
        self.ext, self.calls = native.module(), []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.ext, name)
