"""The gated delta rule (titans.ops.gated_delta): the chunk-wise form against the token loop, both
against a scalar loop written by hand and against the Titans linear memory (an independent path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from titans.memory import MemoryState, memory_chunked, memory_recurrent
from titans.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent

FUNCS = {"recurrent": gated_delta_recurrent, "chunked": gated_delta_chunked}
TOL = 1e-10
NAMES = ("q", "k", "v", "alpha", "beta", "state")


def call(fn: str, *args, chunk_size: int = 4, **kw):
    if fn == "chunked":
        kw["chunk_size"] = chunk_size
    return FUNCS[fn](*args, **kw)


def make_inputs(B=2, H=3, T=70, Dk=5, Dv=7, *, seed=0, dtype=torch.float64, edges=True):
    """q, k L2-normalised (as the layer makes them), v, gates in [0, 1] with exact 0 and 1 for alpha
    (and beta) at a few positions; the initial state S_0."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(randn(B, H, T, Dk), dim=-1)
    k = F.normalize(randn(B, H, T, Dk), dim=-1)
    v = randn(B, H, T, Dv)
    alpha, beta = 0.5 + 0.5 * rand(B, H, T), rand(B, H, T)
    if edges:
        alpha[:, :, 1::7] = 0.0  # forget everything
        alpha[:, :, 3::5] = 1.0  # forget nothing
        beta[:, :, 4::11] = 0.0
        beta[:, :, 6::13] = 1.0
    S0 = randn(B, H, Dv, Dk)
    return q, k, v, alpha, beta, S0


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb, diff = b.norm(), (a - b).norm()
    return float(diff / nb) if nb > 0 else float(diff)


def assert_close(a: Tensor, b: Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(fn: str, inputs, chunk_size: int, with_state: bool, seed: int = 1):
    """o, S and the gradients of a random linear functional of (o, S) w.r.t. every input."""
    q, k, v, alpha, beta, S0 = leaves(inputs)
    o, S = call(fn, q, k, v, alpha, beta, state=S0 if with_state else None, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    loss = ((torch.randn(o.shape, generator=g, dtype=o.dtype) * o).sum()
            + (torch.randn(S.shape, generator=g, dtype=S.dtype) * S).sum())
    ins = [q, k, v, alpha, beta] + ([S0] if with_state else [])
    return o, S, torch.autograd.grad(loss, ins)


# ----------------------------------------------------------------------------- chunked == recurrent

@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_matches_recurrent(chunk, with_state):
    """T = 70 is a multiple of none of the chunk sizes; Dk != Dv; alpha and beta hit 0 and 1 exactly."""
    inputs = make_inputs(seed=chunk + 10 * with_state)
    o_r, S_r, g_r = grads("recurrent", inputs, chunk, with_state)
    o_c, S_c, g_c = grads("chunked", inputs, chunk, with_state)
    assert o_c.dtype == S_c.dtype == torch.float64
    assert_close(o_c, o_r, TOL, "o")
    assert_close(S_c, S_r, TOL, "S")
    for name, a, b in zip(NAMES, g_c, g_r):
        assert_close(a, b, TOL, f"d{name}")


def test_chunked_matches_recurrent_float32():
    inputs = make_inputs(2, 2, 150, 16, 16, seed=3, dtype=torch.float32)
    o_r, S_r = gated_delta_recurrent(*inputs[:5], state=inputs[5])
    o_c, S_c = gated_delta_chunked(*inputs[:5], state=inputs[5], chunk_size=64)
    assert o_c.dtype == S_c.dtype == torch.float32
    assert_close(o_c, o_r, 1e-5, "o")
    assert_close(S_c, S_r, 1e-5, "S")


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_autocast_computes_in_float32(fn):
    """Under bf16 autocast (and with bf16 inputs) the recurrence still runs in float32."""
    inputs = make_inputs(1, 2, 20, 8, 8, seed=4, dtype=torch.float32)
    ref_o, ref_S = call(fn, *inputs[:5], state=inputs[5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = call(fn, *inputs[:5], state=inputs[5])
    assert o.dtype == S.dtype == torch.float32
    assert_close(o, ref_o, 1e-6, "o under autocast")
    assert_close(S, ref_S, 1e-6, "S under autocast")
    o16, S16 = call(fn, *(t.bfloat16() for t in inputs[:5]), state=inputs[5].bfloat16())
    assert o16.dtype == S16.dtype == torch.float32
    assert_close(o16, ref_o, 3e-2, "o from bf16 inputs")


# ----------------------------------------------------------------------------- by hand

def scalar_loop(q, k, v, alpha, beta, S0):
    """B = H = 1, with Python floats: S <- alpha S (I - beta k k^T) + beta v k^T, o = S q."""
    T, Dk, Dv = len(q), len(q[0]), len(v[0])
    S = [row[:] for row in S0]
    outs = []
    for t in range(T):
        kt, qt, vt, a, b = k[t], q[t], v[t], alpha[t], beta[t]
        M = [[(1.0 if i == j else 0.0) - b * kt[i] * kt[j] for j in range(Dk)] for i in range(Dk)]
        S = [[a * sum(S[r][i] * M[i][c] for i in range(Dk)) + b * vt[r] * kt[c] for c in range(Dk)]
             for r in range(Dv)]
        outs.append([sum(S[r][c] * qt[c] for c in range(Dk)) for r in range(Dv)])
    return outs, S


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_matches_scalar_loop(fn):
    q, k, v, alpha, beta, S0 = make_inputs(1, 1, 9, 3, 2, seed=5)
    o_hand, S_hand = scalar_loop(q[0, 0].tolist(), k[0, 0].tolist(), v[0, 0].tolist(),
                                 alpha[0, 0].tolist(), beta[0, 0].tolist(), S0[0, 0].tolist())
    o, S = call(fn, q, k, v, alpha, beta, state=S0, chunk_size=4)
    assert_close(o[0, 0], torch.tensor(o_hand, dtype=torch.float64), 1e-13, "o")
    assert_close(S[0, 0], torch.tensor(S_hand, dtype=torch.float64), 1e-13, "S")


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_delta_rule_stores_exactly(fn):
    """alpha = beta = 1, ||k|| = 1: after writing (k, v), reading with q = k gives v exactly."""
    q, k, v, alpha, beta, S0 = make_inputs(2, 2, 6, 4, 3, seed=6, edges=False)
    o, _ = call(fn, k, k, v, torch.ones_like(alpha), torch.ones_like(beta), state=S0, chunk_size=4)
    assert_close(o, v, 1e-13, "read-back")


# ----------------------------------------------------------------------------- streaming

def random_splits(T: int, gen: torch.Generator) -> list[int]:
    cuts = sorted(set(torch.randint(1, T, (5,), generator=gen).tolist()))
    return [b - a for a, b in zip([0, *cuts], [*cuts, T])]


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_streaming_equals_one_call(fn):
    q, k, v, alpha, beta, S0 = make_inputs(2, 2, 53, 4, 6, seed=7)
    o_full, S_full = call(fn, q, k, v, alpha, beta, state=S0, chunk_size=8)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        S, outs, start = S0, [], 0
        for n in random_splits(53, gen):
            sl = slice(start, start + n)
            o, S = call(fn, q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], beta[:, :, sl],
                        state=S, chunk_size=8)
            outs.append(o)
            start += n
        assert_close(torch.cat(outs, dim=2), o_full, TOL, "streamed o")
        assert_close(S, S_full, TOL, "streamed S")


def test_zero_state_is_default():
    q, k, v, alpha, beta, S0 = make_inputs(1, 2, 10, 3, 3, seed=9)
    for fn in FUNCS:
        a = call(fn, q, k, v, alpha, beta)
        b = call(fn, q, k, v, alpha, beta, state=torch.zeros_like(S0))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_gradcheck(fn):
    q, k, v, alpha, beta, S0 = leaves(make_inputs(1, 2, 5, 3, 2, seed=10))
    f = lambda *a: call(fn, *a[:5], state=a[5], chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, alpha, beta, S0))


# ----------------------------------------------------------------------------- the Titans memory

@pytest.mark.parametrize("memory_fn", [memory_chunked, memory_recurrent])
def test_matches_titans_linear_memory(memory_fn):
    """A one-layer Titans memory M(x) = x W with chunk size 1, no momentum (eta = 0) and no forgetting
    (alpha_m = 0) makes W_t = W_{t-1} - theta_t k_t^T (k_t W_{t-1} - v_t), y_t = q_t W_t. With
    W = S^T that is the gated delta rule with alpha = 1 and beta = theta, and y_t = o_t.

    With forgetting the two rules differ at second order: Titans decays W_{t-1} and takes the
    gradient at W_{t-1} ((1 - a) W - theta k^T (k W - v)), Gated DeltaNet takes it at the decayed
    state (alpha W - beta k^T (k alpha W - v)); so the exact cross-check holds for alpha_m = 0 only."""
    B, H, T, D = 2, 3, 29, 5
    q, k, v, _, beta, S0 = make_inputs(B, H, T, D, D, seed=11)
    alpha = torch.ones_like(beta)
    o, S = gated_delta_chunked(q, k, v, alpha, beta, state=S0, chunk_size=8)
    W0 = S0.transpose(-1, -2).contiguous()  # (B, H, D, D): row-vector memory x -> x W
    zeros = torch.zeros_like(beta)
    mem = MemoryState((W0,), (torch.zeros_like(W0),), (W0,), 0, 1)
    y, st = memory_fn(q, k, v, zeros, zeros, beta, (W0[0],), chunk_size=1, state=mem)
    assert_close(y, o, TOL, "memory y vs o")
    assert_close(st.weights[0], S.transpose(-1, -2), TOL, "memory W_T vs S_T^T")
    # with forgetting the rules really differ (a check that the comparison above is not vacuous)
    alpha_m = torch.full_like(beta, 0.2)
    y_f, _ = memory_fn(q, k, v, alpha_m, zeros, beta, (W0[0],), chunk_size=1, state=mem)
    o_f, _ = gated_delta_chunked(q, k, v, 1 - alpha_m, beta, state=S0, chunk_size=8)
    assert rel_err(y_f, o_f) > 1e-3


# ----------------------------------------------------------------------------- bad inputs

def _bad_cases():
    q, k, v, alpha, beta, S0 = make_inputs(2, 3, 10, 4, 5, seed=12)
    ok = dict(q=q, k=k, v=v, alpha=alpha, beta=beta, state=S0)
    cases = [
        ("q", dict(q=q[0]), "4-D"),
        ("k", dict(k=k[..., :3]), "the shape of q"),
        ("v", dict(v=v[:, :, :9]), "shape (2, 3, 10, Dv)"),
        ("v", dict(v=v[:, :2]), "shape (2, 3, 10, Dv)"),
        ("q", dict(q=q.long(), k=k.long()), "floating-point"),
        ("v", dict(v=v.int()), "floating-point"),
        ("alpha", dict(alpha=alpha.unsqueeze(-1)), "shape (2, 3, 10)"),
        ("beta", dict(beta=beta[:, :, :5]), "shape (2, 3, 10)"),
        ("beta", dict(beta=beta.int()), "floating-point"),
        ("alpha", dict(alpha=0.9), "torch.Tensor"),
        ("state", dict(state=S0.transpose(-1, -2)), "shape (2, 3, 5, 4)"),
        ("state", dict(state=S0[0]), "shape (2, 3, 5, 4)"),
        ("state", dict(state=S0.int()), "floating-point"),
        ("q", dict(q=q[:, :, :0], k=k[:, :, :0], v=v[:, :, :0], alpha=alpha[:, :, :0],
                   beta=beta[:, :, :0]), "T >= 1"),
    ]
    return ok, cases


_OK, _CASES = _bad_cases()


@pytest.mark.parametrize("fn", sorted(FUNCS))
@pytest.mark.parametrize("name,change,expected", _CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(_CASES)])
def test_bad_inputs_raise(fn, name, change, expected):
    args = {**_OK, **change}
    state = args.pop("state")
    with pytest.raises(ValueError) as info:
        call(fn, *args.values(), state=state)
    msg = str(info.value)
    assert msg.startswith(f"{name}:"), msg
    assert expected in msg and "got" in msg, msg


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0, True, None, "8"])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size: expected a positive int, got"):
        gated_delta_chunked(*list(_OK.values())[:5], chunk_size=chunk_size)
