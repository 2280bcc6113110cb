"""The fused causal depthwise conv + SiLU against torch's conv1d, and its streaming cache; each case
with the C++ loops (csrc/conv_silu.cpp, the default on the CPU) and with the eager code (`loops`)."""

import pytest
import torch
import torch.nn.functional as F

from titans.memory.conv import causal_conv_silu, conv_tail


def _reference(x, cache, w):
    xp = torch.cat([cache, x], dim=1).transpose(1, 2)
    return F.silu(F.conv1d(xp, w.unsqueeze(1), groups=w.shape[0])).transpose(1, 2)


@pytest.mark.parametrize("T", [1, 2, 9, 600])  # shorter than the cache, longer, several dot blocks
def test_matches_conv1d_values_and_gradients(T, loops):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 5, dtype=torch.float64, generator=g, requires_grad=True)
    cache = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y, y_ref = causal_conv_silu(x, cache, w), _reference(x, cache, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(y, (x, cache, w), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, cache, w), dy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck(loops):
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in ((1, 4, 3), (1, 2, 3), (3, 3))]
    assert torch.autograd.gradcheck(causal_conv_silu, args)


def test_streaming_cache_short_and_long_pieces(loops):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 4, dtype=torch.float64, generator=g)
    w = torch.randn(4, 4, dtype=torch.float64, generator=g)
    whole = causal_conv_silu(x, torch.zeros(2, 3, 4, dtype=torch.float64), w)
    cache, parts = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for a, b in ((0, 1), (1, 3), (3, 9), (9, 11)):  # pieces shorter and longer than the cache
        parts.append(causal_conv_silu(x[:, a:b], cache, w))
        cache = conv_tail(x[:, a:b], cache)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-14)


@pytest.mark.parametrize("T, block", [(2, 512), (9, 512), (9, 4), (9, 3), (10, 3), (9, 2)])
def test_projection_conv_matches_autograd_of_the_plain_ops(T, block, monkeypatch, loops):
    """conv_silu(x, proj, ...) works in blocks of time and recomputes the projection x @ proj^T in
    its backward instead of saving it: values, the cache after x, and gradients of x, proj, cache
    and conv weight -- through the output and through the returned cache -- equal plain autograd of
    linear + conv1d + SiLU. Cases: a piece shorter than the cache (its tail mixes cache and h), one
    block, and several blocks, the last one shorter than the cache (9 in blocks of 4) or of one row,
    and a block size below the conv's reach (2 < K-1 = 3: blocks of K-1 are used)."""
    from titans.memory import conv
    from titans.memory.conv import conv_silu

    monkeypatch.setattr(conv, "BLOCK", block)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, 6, dtype=torch.float64, generator=g, requires_grad=True)
    proj = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    cache = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y, tail = conv_silu(x, proj, w, cache)
    h = x @ proj.t()
    y_ref, tail_ref = _reference(h, cache, w), torch.cat([cache, h], dim=1)[:, -3:]
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    # the tail is the last rows of h, computed block by block: equal up to the matmul's rounding, which
    # can differ by the last bit between a block and the whole (BLAS picks its kernel by shape and load)
    torch.testing.assert_close(tail, tail_ref, rtol=1e-14, atol=1e-14)
    dy, dt = (torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (y, tail))
    inputs = (x, proj, cache, w)
    grads = torch.autograd.grad((y, tail), inputs, (dy, dt))
    grads_ref = torch.autograd.grad((y_ref, tail_ref), inputs, (dy, dt))
    for name, a, b in zip(("x", "proj", "cache", "weight"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    assert torch.autograd.gradcheck(lambda *a: conv_silu(a[0], a[1], a[3], a[2]), inputs)


def test_the_cpp_convolution_runs_by_default_and_not_when_disabled(monkeypatch):
    """float32 and float64 CPU tensors reach the C++ loops, forward and backward, and agree with the
    eager code (to rounding in float32); with native_chunks(False) they are not called."""
    from memory_testlib import ExtensionSpy

    from titans.memory import native
    from titans.memory.conv import conv_silu

    spy = ExtensionSpy()
    calls = spy.calls

    g = torch.Generator().manual_seed(4)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-12)):  # float32: sums in another order
        x = torch.randn(2, 150, 8, dtype=dtype, generator=g, requires_grad=True)
        proj = torch.randn(12, 8, dtype=dtype, generator=g, requires_grad=True)
        w = torch.randn(12, 4, dtype=dtype, generator=g, requires_grad=True)
        results = {}
        for mode in ("native", "eager"):
            calls.clear()
            native.native_chunks(mode == "native")
            monkeypatch.setitem(native._STATE, "module", spy if mode == "native" else spy.ext)
            try:
                y, tail = conv_silu(x, proj, w, None)
                grads = torch.autograd.grad((y * y).sum() + tail.sum(), (x, proj, w))
            finally:
                native.native_chunks(True)
            results[mode] = (y, tail, *grads)
            expected = ["conv_silu_backward", "conv_silu_forward"] if mode == "native" else []
            assert sorted(set(calls)) == expected, (mode, calls)
        for a, b in zip(results["native"], results["eager"]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
