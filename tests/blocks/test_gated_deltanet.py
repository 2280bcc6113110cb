"""The Gated DeltaNet layer (titans.blocks.gated_deltanet): streaming, causality, gates, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from titans.blocks.gated_deltanet import GatedDeltaNet, GatedDeltaNetState
from titans.ops.gated_delta import gated_delta_recurrent

DIM, HEADS = 16, 4


def make_layer(seed: int = 0, dtype=torch.float64, **kw) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(DIM, HEADS, **kw).to(dtype)
    with torch.no_grad():  # livelier gates than at init, so every path matters
        layer.gates.weight.normal_(0, 0.5)
    return layer


def make_x(B=2, T=37, seed=1, dtype=torch.float64):
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


OPTIONS = [dict(chunk_size=8), dict(chunk_size=5, conv=False), dict(chunk_size=64, conv_kernel=3)]
IDS = ["conv", "no-conv", "kernel3"]


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_shapes_and_state(opts):
    layer = make_layer(**opts)
    x = make_x()
    out, st = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert isinstance(st, GatedDeltaNetState)
    assert st.S.shape == (2, HEADS, DIM // HEADS, DIM // HEADS)
    assert (st.conv is None) == (not opts.get("conv", True))
    init = layer.init_state(2)
    out2, st2 = layer(x, init)
    assert torch.equal(out, out2) and torch.equal(st.S, st2.S)


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_streaming_equals_one_call(opts):
    """Pieces of arbitrary sizes (shorter than the conv kernel, longer than a chunk) with the state."""
    layer = make_layer(**opts)
    x = make_x(T=41)
    with torch.no_grad():
        full, st_full = layer(x)
        for splits in ([1, 1, 2, 17, 3, 9, 8], [41], [20, 21], [1] * 5 + [36]):
            st, outs, start = None, [], 0
            for n in splits:
                out, st = layer(x[:, start:start + n], st)
                outs.append(out)
                start += n
            assert rel_err(torch.cat(outs, dim=1), full) <= 1e-12, splits
            assert rel_err(st.S, st_full.S) <= 1e-12, splits


def test_chunk_size_does_not_change_results():
    x = make_x(T=30)
    outs = []
    for chunk in (1, 7, 64):
        layer = make_layer(chunk_size=chunk)
        with torch.no_grad():
            outs.append(layer(x)[0])
    assert rel_err(outs[0], outs[2]) <= 1e-12 and rel_err(outs[1], outs[2]) <= 1e-12


@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_layer_is_causal(opts):
    layer = make_layer(**opts)
    x = make_x(T=29)
    with torch.no_grad():
        out, _ = layer(x)
        for t in (0, 4, 15, 27):
            x2 = x.clone()
            x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
            out2, _ = layer(x2)
            assert (out2[:, :t + 1] - out[:, :t + 1]).abs().max() <= 1e-13, t
            assert (out2[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-3, t


def test_matches_the_reference_loop():
    """The layer's recurrence is the gated delta rule on its q, k, v, alpha, beta."""
    layer = make_layer(chunk_size=8)
    x = make_x(T=21)
    with torch.no_grad():
        out, st = layer(x)
        q, k, v, _ = layer._qkv(x, None)
        alpha, beta = layer._gates(x)
        o_ref, S_ref = gated_delta_recurrent(q, k, v, alpha, beta)
        assert rel_err(layer._output(o_ref, x), out) <= 1e-12
        assert rel_err(st.S, S_ref) <= 1e-12


def test_gate_initialisation():
    torch.manual_seed(0)
    layer = GatedDeltaNet(DIM, HEADS)
    alpha, beta = layer._gates(make_x(dtype=torch.float32))
    assert alpha.shape == beta.shape == (2, HEADS, 37)
    assert torch.allclose(torch.sigmoid(layer.gates.bias), torch.tensor([0.99] * HEADS + [0.5] * HEADS))
    assert (alpha - 0.99).abs().max() < 0.01 and (beta - 0.5).abs().max() < 0.1
    assert alpha.dtype == torch.float32


def test_gradients_reach_every_parameter_and_the_state():
    layer = make_layer(chunk_size=4)
    x = make_x(T=11).requires_grad_()
    st0 = layer.init_state(2)
    st0 = GatedDeltaNetState(torch.randn_like(st0.S).requires_grad_(), torch.randn_like(st0.conv))
    out, st = layer(x, st0)
    (out.square().sum() + st.S.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and st0.S.grad.abs().sum() > 0
    assert st.detach().S.grad_fn is None


def test_gradcheck_tiny_layer():
    torch.manual_seed(3)
    layer = GatedDeltaNet(4, 2, chunk_size=2, conv_kernel=2).double()
    x = make_x(1, 5, seed=4)[..., :4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,))


def test_bf16_autocast():
    layer = make_layer(dtype=torch.float32, chunk_size=8)
    x = make_x(T=20, dtype=torch.float32)
    ref, st_ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, st = layer(x)
    assert st.S.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 5e-2
    assert rel_err(st.S, st_ref.S) < 5e-2


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("args,kwargs,match", [
    ((16, 3), {}, "must divide"),
    ((0, 1), {}, "dim must be a positive int"),
    ((16, 4), dict(chunk_size=0), "chunk_size must be a positive int"),
    ((16, 4), dict(conv_kernel=0), "conv_kernel must be a positive int"),
])
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNet(*args, **kwargs)


@pytest.mark.parametrize("x,match", [
    (torch.randn(37, DIM, dtype=torch.float64), r"x must be \(B, T, 16\), got shape \(37, 16\)"),
    (torch.randn(2, 37, DIM + 1, dtype=torch.float64), r"x must be \(B, T, 16\), got shape \(2, 37, 17\)"),
    (torch.ones(2, 37, DIM, dtype=torch.long), "floating-point"),
    (torch.ones(2, 0, DIM, dtype=torch.float64), "at least one token"),
])
def test_bad_input_raises(x, match):
    with pytest.raises(ValueError, match=match):
        make_layer()(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bad):
    x = make_x()
    x[1, 5, 3] = bad
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        make_layer()(x)


def test_bad_state_raises():
    layer = make_layer()
    x = make_x()
    with pytest.raises(ValueError, match=r"state.S must have shape \(2, 4, 4, 4\)"):
        layer(x, layer.init_state(3))
    with pytest.raises(ValueError, match="state.conv must have shape"):
        layer(x, GatedDeltaNetState(layer.init_state(2).S, None))
    with pytest.raises(ValueError, match="GatedDeltaNetState or None"):
        layer(x, layer.init_state(2).S)
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_state(0)
