"""The NeuralMemory layer (SPEC.md §2): causality, retrieve/update, training step, gate ranges, input
checks, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from memory_testlib import LAYER_OPTIONS, assert_rel_close, make_layer

import titans.memory.layer as layer_mod
from titans.memory import NeuralMemory, NeuralMemoryState


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def snapshot(state: NeuralMemoryState) -> dict:
    mem = state.memory
    out = {f"{f}[{i}]": t.detach().clone() for f in ("weights", "momentum", "chunk_start")
           for i, t in enumerate(getattr(mem, f))}
    out.update(conv=None if state.conv is None else state.conv.detach().clone(),
               gate=None if state.gate is None else state.gate.detach().clone(),
               position=mem.position, chunk_size=mem.chunk_size)
    return out


def assert_snapshots_equal(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), key
            assert x.shape == y.shape, key
            err = (x - y).abs().max().item() if x.numel() else 0.0
            assert err <= tol * max(1.0, y.abs().max().item()), f"{key}: max difference {err:.3e}"
        else:
            assert x == y, f"{key}: {x} != {y}"


# ----------------------------------------------------------------------------- causality

CAUSAL_OPTIONS = ["default", "depth1", "per_layer_gates_depth3", "chunk_gates", "no_conv", "grad_clip",
                  "first_order"]


@pytest.mark.parametrize("option", CAUSAL_OPTIONS)
def test_layer_is_causal(option):
    """Changing x after position t changes no output at positions <= t, and changes every later one."""
    T, chunk = 15, 4
    mod = make_layer(seed=7, chunk_size=chunk, **LAYER_OPTIONS[option])
    x = randn(2, T, 8, seed=1)
    with torch.no_grad():
        out = mod(x)[0]
        for t in (0, 2, 3, 9, 13):  # inside a chunk, at a chunk's end, near the sequence end
            x2 = x.clone()
            x2[:, t + 1:] = randn(2, T - t - 1, 8, seed=100 + t)
            out2 = mod(x2)[0]
            before = (out2[:, :t + 1] - out[:, :t + 1]).abs().max().item()
            assert before <= 1e-13, f"t={t}: output at <= t moved by {before:.3e}"
            after = (out2[:, t + 1:] - out[:, t + 1:]).abs().amax(dim=(0, 2))
            assert (after > 1e-6).all(), f"t={t}: a later output did not change: {after.tolist()}"


@pytest.mark.parametrize("option", ["default", "chunk_gates", "per_layer_gates_depth3"])
def test_layer_gradient_is_causal(option):
    """d out_t / d x_s = 0 for s > t, through the hand-written backward as well."""
    T, t = 13, 5
    mod = make_layer(seed=8, chunk_size=4, **LAYER_OPTIONS[option])
    x = randn(2, T, 8, seed=2).requires_grad_()
    out = mod(x)[0]
    (g,) = torch.autograd.grad(out[:, : t + 1].sum(), x)
    assert g[:, t + 1:].abs().max().item() <= 1e-13 * g.abs().max().item()
    assert (g[:, : t + 1].abs().amax(dim=(0, 2)) > 0).all()


# ----------------------------------------------------------------------------- retrieve / update

def read_by_hand(mod: NeuralMemory, x, weights, conv_cache=None):
    """out = W_o(RMSNorm(M_W(q)) * SiLU(x W_g)) with q from x (linear, causal depthwise conv, SiLU,
    L2 norm), written out from the layer's parameters."""
    B, T, dim = x.shape
    H, D = mod.heads, mod.head_dim
    h = x @ mod.qkv.weight.T
    if mod.conv is not None:
        K = mod.conv.shape[1]
        past = torch.zeros(B, K - 1, 3 * dim, dtype=x.dtype) if conv_cache is None else conv_cache
        hp = torch.cat([past, h], dim=1)
        h = sum(mod.conv[:, j] * hp[:, j:j + T] for j in range(K))
    h = F.silu(h)
    q = h[..., :dim].reshape(B, T, H, D).transpose(1, 2)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if len(weights) == 1:
        y = q @ weights[0]
    else:
        z = q
        for i, w in enumerate(weights):
            z = z @ w
            if i < len(weights) - 1:
                z = F.gelu(z)
        z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
        y = q + mod.ln_gamma[:, None] * z + mod.ln_beta[:, None]
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * mod.out_norm.weight
    y = y.transpose(1, 2).reshape(B, T, dim)
    return mod.out_proj(y * F.silu(mod.gate_proj(x)))


@pytest.mark.parametrize("option", ["default", "depth1", "no_conv", "chunk_gates"])
def test_retrieve_reads_state_weights_and_changes_nothing(option):
    mod = make_layer(seed=9, chunk_size=4, **LAYER_OPTIONS[option])
    x, x2 = randn(2, 7, 8, seed=3), randn(2, 5, 8, seed=4)
    with torch.no_grad():
        _, state = mod(x)
        before = snapshot(state)
        r = mod.retrieve(x2, state)
        r_again = mod.retrieve(x2, state)
        r_cache = mod.retrieve(x2, state, conv_cache=state.conv)
        r_none = mod.retrieve(x2)
        assert_snapshots_equal(snapshot(state), before)  # nothing written
        assert torch.equal(r, r_again)
        assert_rel_close(r, read_by_hand(mod, x2, state.memory.weights), 1e-12, "retrieve(x, state)")
        assert_rel_close(r_none, read_by_hand(mod, x2, tuple(mod.weights)), 1e-12, "retrieve(x)")
        assert_rel_close(r_cache, read_by_hand(mod, x2, state.memory.weights, state.conv), 1e-12,
                         "retrieve(x, state, conv_cache)")
        # the read does depend on the memory: a written state reads differently from W_0
        assert (r - r_none).abs().max() > 1e-6


@pytest.mark.parametrize("option", ["default", "no_conv"])
def test_read_inputs_once_then_read_with_per_piece_equals_read_per_piece(option):
    """MAC computes the x-only half of its reads for a whole piece and reads its segments with
    different weights: the result equals `read` per segment with the conv cache chained."""
    mod = make_layer(seed=11, chunk_size=4, **LAYER_OPTIONS[option])
    x = randn(2, 13, 8, seed=7)
    with torch.no_grad():
        _, state = mod(randn(2, 6, 8, seed=8))
        weights = [tuple(mod.weights), state.memory.weights, tuple(mod.weights)]
        sizes = [5, 4, 4]
        q, gate, cache = mod.read_inputs(x, state.conv)
        conv = state.conv
        for qs, gs, xs, w in zip(q.split(sizes, 2), gate.split(sizes, 1), x.split(sizes, 1), weights):
            expected, conv = mod.read(xs, w, conv)
            assert_rel_close(mod.read_with(qs, gs, w), expected, 1e-12, "read_with")
        assert (cache is None) == (conv is None)
        if cache is not None:
            assert torch.equal(cache, conv)
        with pytest.raises(ValueError, match=r"read_with: expected q \(B, 2, T, 4\) and gate \(B, T, 8\)"):
            mod.read_with(q.transpose(1, 2), gate, weights[0])
        with pytest.raises(ValueError, match=r"read_with: expected q"):
            mod.read_with(q, gate[:, :3], weights[0])


@pytest.mark.parametrize("option", sorted(LAYER_OPTIONS))
def test_update_gives_the_state_of_forward(option):
    mod = make_layer(seed=10, chunk_size=4, **LAYER_OPTIONS[option])
    x1, x2 = randn(2, 6, 8, seed=5), randn(2, 9, 8, seed=6)
    with torch.no_grad():
        for prev in (None, mod(x1)[1]):
            _, st_fwd = mod(x2, prev)
            st_upd = mod.update(x2, prev)
            assert st_upd.memory.position == (0 if prev is None else 6) + 9
            assert_snapshots_equal(snapshot(st_upd), snapshot(st_fwd), tol=1e-13)


def test_update_is_differentiable():
    mod = make_layer(seed=11)
    st = mod.update(randn(2, 9, 8, seed=7))
    st.memory.weights[0].sum().backward()
    assert mod.qkv.weight.grad is not None and mod.qkv.weight.grad.abs().sum() > 0
    assert mod.weights[0].grad is not None


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("heads", [1, 2, 3, 4])
def test_adamw_step(heads):
    torch.manual_seed(heads)
    mod = NeuralMemory(12, heads, chunk_size=4, expansion=2)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    x = torch.randn(2, 10, 12)
    before = {n: p.detach().clone() for n, p in mod.named_parameters()}
    out, state = mod(x)
    assert out.shape == x.shape
    loss = out.pow(2).mean() + state.memory.weights[-1].pow(2).mean()
    loss.backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    opt.step()
    for name, p in mod.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} did not move"
    out2, _ = mod(x)
    assert torch.isfinite(out2).all()


@pytest.fixture
def captured_gates(monkeypatch):
    """The (alpha, eta, theta) the layer hands to the memory recurrence, per call."""
    calls = []
    real = layer_mod.run_memory

    def spy(q, k, v, alpha, eta, theta, weights, **kw):
        calls.append((alpha.detach(), eta.detach(), theta.detach()))
        return real(q, k, v, alpha, eta, theta, weights, **kw)

    monkeypatch.setattr(layer_mod, "run_memory", spy)
    return calls


@pytest.mark.parametrize("option", ["default", "per_layer_gates_depth3", "chunk_gates"])
def test_gates_stay_in_range(captured_gates, option):
    theta_max = 0.3
    mod = make_layer(seed=12, theta_max=theta_max, **LAYER_OPTIONS[option])
    with torch.no_grad():
        for scale in (1.0, 30.0):
            mod(scale * randn(2, 9, 8, seed=8))
    L = mod.depth if mod.per_layer_gates else None
    for alpha, eta, theta in captured_gates:
        assert theta.shape == ((2, 2, 9, L) if L else (2, 2, 9))
        assert ((theta > 0) & (theta < theta_max)).all()
        assert ((alpha > 0) & (alpha < 1)).all() and ((eta > 0) & (eta < 1)).all()
    # saturated logits: never outside the closed range
    captured_gates.clear()
    with torch.no_grad():
        for bias in (-1e4, 1e4):
            mod.gates.bias.fill_(bias)
            mod(randn(2, 9, 8, seed=9))
    for alpha, eta, theta in captured_gates:
        assert ((theta >= 0) & (theta <= theta_max)).all()
        assert ((alpha >= 0) & (alpha <= 1)).all() and ((eta >= 0) & (eta <= 1)).all()


def test_ablations_switch_gates_off(captured_gates):
    """momentum=False: eta = 0; forgetting=False: alpha = 0."""
    mod = make_layer(seed=13, momentum=False, forgetting=False)
    with torch.no_grad():
        mod(randn(2, 6, 8, seed=10))
    (alpha, eta, theta), = captured_gates
    assert (alpha == 0).all() and (eta == 0).all() and (theta > 0).all()


@pytest.mark.parametrize("option", ["default", "per_layer_gates_depth3", "forget_to_init"])
def test_forget_scale_scales_alpha_and_nothing_else(captured_gates, option):
    """forget_scale s hands s * alpha to the recurrence, with the same eta and theta, for the same
    weights; s = 1 is the layer as built."""
    x = randn(2, 9, 8, seed=11)
    for s in (1.0, 0.25, 0.0):
        mod = make_layer(seed=14, forget_scale=s, **LAYER_OPTIONS[option])
        with torch.no_grad():
            mod(x)
    (a1, e1, t1), (a25, e25, t25), (a0, e0, t0) = captured_gates
    assert (a1 > 0).all()
    torch.testing.assert_close(a25, 0.25 * a1, rtol=0, atol=0)
    assert (a0 == 0).all()
    for e, t in ((e25, t25), (e0, t0)):
        torch.testing.assert_close(e, e1, rtol=0, atol=0)
        torch.testing.assert_close(t, t1, rtol=0, atol=0)


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("args, kwargs, match", [
    ((12, 5), {}, "heads"),
    ((12, 0), {}, "heads"),
    ((12, 2), {"depth": 0}, "depth"),
    ((12, 2), {"chunk_size": 0}, "chunk_size"),
    ((12, 2), {"expansion": 0}, "expansion"),
    ((12, 2), {"theta_max": 0.0}, "theta_max"),
    ((12, 2), {"grad_clip": -1.0}, "grad_clip"),
    ((12, 2), {"forget_scale": 1.5}, "forget_scale"),
    ((12, 2), {"forget_scale": -0.5}, "forget_scale"),
])
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(*args, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad):
    mod = make_layer(seed=14)
    x = randn(2, 6, 8, seed=11)
    x[1, 3, 2] = bad
    says = r"NeuralMemory: the input x contains NaN or Inf \(it came from the layers before this one\)"
    for call in (mod, mod.update, mod.retrieve):  # named as the input's fault, not the weights'
        with pytest.raises(FloatingPointError, match=says):
            call(x)


def test_diverged_memory_weights_raise_with_the_positions_and_the_remedy(monkeypatch):
    """Finite input, memory weights that blew up inside the recurrence: named as a divergence, with
    the positions of the piece and the options that tame it (checked in the same host read as the
    input, so it costs one synchronisation per call on a GPU)."""
    import dataclasses

    real = layer_mod.run_memory

    def diverging(*args, **kwargs):
        y, mem = real(*args, **kwargs)
        return y, dataclasses.replace(mem, weights=(mem.weights[0] * float("inf"), *mem.weights[1:]))

    monkeypatch.setattr(layer_mod, "run_memory", diverging)
    mod = make_layer(seed=16)
    with pytest.raises(FloatingPointError, match=r"memory weights became NaN/Inf within positions \[0, 6\); "
                                                 r"the inner updates diverged\. Lower theta_max"):
        mod(randn(2, 6, 8, seed=15))


def test_state_from_another_batch_size_raises():
    mod = make_layer(seed=15)
    _, state = mod(randn(3, 5, 8, seed=12))
    with pytest.raises(ValueError, match="batch"):
        mod(randn(2, 5, 8, seed=13), state)
    with pytest.raises(ValueError, match="batch"):
        mod.update(randn(2, 5, 8, seed=13), state)


@pytest.mark.parametrize("x", [torch.zeros(2, 5, 7), torch.zeros(5, 8), torch.zeros(2, 0, 8),
                               torch.zeros(2, 5, 8, dtype=torch.long)])
def test_bad_input_shape_or_dtype_raises(x):
    mod = make_layer(seed=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="x must"):
        mod(x)


# ----------------------------------------------------------------------------- autocast

def test_bf16_autocast_keeps_memory_in_float32(monkeypatch):
    seen = []
    real = layer_mod.run_memory

    def spy(*args, **kw):
        y, state = real(*args, **kw)
        seen.append((y.dtype, {t.dtype for f in ("weights", "momentum", "chunk_start")
                               for t in getattr(state, f)}))
        return y, state

    monkeypatch.setattr(layer_mod, "run_memory", spy)
    mod = make_layer(seed=17, dim=16, heads=2, dtype=torch.float32)
    x = randn(2, 21, 16, seed=14, dtype=torch.float32)
    ref, _ = mod(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = mod(x)
        loss = out.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters())
    assert seen[-1] == (torch.float32, {torch.float32})
    assert all(t.dtype == torch.float32 for t in state.memory.weights + state.memory.momentum)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 5e-2, f"bf16 autocast output differs from float32 by {err:.3e}"


# ----------------------------------------------------------------------------- end to end

def _layer_reference(mem: NeuralMemory, x):
    """NeuralMemory.forward from plain torch ops and the token-loop reference: linear projection,
    conv1d + SiLU, F.normalize, the gate maps, memory_recurrent, RMSNorm, SiLU gate, projection."""
    from titans.memory import memory_recurrent

    B, T, dim = x.shape
    h = x @ mem.qkv.weight.t()
    if mem.conv is not None:
        hp = torch.cat([h.new_zeros(B, mem.kernel - 1, h.shape[-1]), h], dim=1).transpose(1, 2)
        h = F.conv1d(hp, mem.conv.unsqueeze(1), groups=h.shape[-1]).transpose(1, 2)
    q, k, v = F.silu(h).view(B, T, 3, mem.heads, -1).permute(2, 0, 3, 1, 4)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    alpha, eta, theta, _ = mem._gates(x, None)
    y, _ = memory_recurrent(q, k, v, alpha, eta, theta, tuple(mem.weights), chunk_size=mem.chunk_size,
                            ln=mem.ln, grad_clip=mem.grad_clip, forget_to=mem.forget_to,
                            first_order=mem.first_order, second_order=mem.second_order)
    y = mem.out_norm(y).permute(0, 2, 1, 3).reshape(B, T, dim)
    return mem.out_proj(y * F.silu(mem.gate_proj(x)))


@pytest.mark.parametrize("option", ["default", "no_conv", "per_layer_gates_depth3", "forget_to_init",
                                    "first_order", "second_order_half"])
def test_layer_matches_plain_ops_and_the_token_loop(option, monkeypatch, loops):
    """The whole layer, output and every parameter's gradient, against `_layer_reference` in float64
    (T = 11: chunks and blocks end mid-sequence; the projection + conv and the gated output run in
    blocks of 4)."""
    from titans.memory import conv

    monkeypatch.setattr(conv, "BLOCK", 4)
    monkeypatch.setattr(layer_mod, "OUT_BLOCK", 4)
    mem = make_layer(**LAYER_OPTIONS[option])
    x = randn(2, 11, mem.dim, seed=5)
    out, _ = mem(x)
    ref = _layer_reference(mem, x)
    assert_rel_close(out, ref, 1e-9, f"{option}: output")
    dout = randn(*out.shape, seed=6)
    params = [p for p in mem.parameters()]
    grads = torch.autograd.grad(out, params, dout, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, params, dout, allow_unused=True)
    for (name, _), g, r in zip(mem.named_parameters(), grads, grads_ref):
        assert (g is None) == (r is None), name
        if g is not None:
            assert_rel_close(g, r, 1e-9, f"{option}: gradient of {name}")


@pytest.mark.parametrize("depth, batched", [(2, False), (2, True), (3, True), (1, True)])
def test_memory_read_matches_memory_apply(depth, batched):
    """memory_read (keeps only its inputs, recomputes the MLP in the backward) == memory_apply by
    plain autograd, value and gradients of x, the weights and (gamma, beta), in float64; weights
    shared over the batch (H, ., .) or per batch element (B, H, ., .)."""
    from titans.memory import memory_apply
    from titans.memory.chunked import memory_read

    g = torch.Generator().manual_seed(7)
    B, H, N, D, E = 2, 3, 5, 4, 6
    dims = [D] + [E] * (depth - 1) + [D]
    lead = (B, H) if batched else (H,)
    W = [torch.randn(*lead, dims[i], dims[i + 1], dtype=torch.float64, generator=g, requires_grad=True)
         for i in range(depth)]
    ln = None if depth == 1 else tuple(torch.randn(H, D, dtype=torch.float64, generator=g, requires_grad=True)
                                       for _ in range(2))
    x = torch.randn(B, H, N, D, dtype=torch.float64, generator=g, requires_grad=True)
    y, ref = memory_read(x, tuple(W), ln), memory_apply(x, tuple(W), ln)
    assert_rel_close(y, ref, 1e-12, "value")
    inputs = [x, *W, *(ln or ())]
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(ref, inputs, dy))):
        assert_rel_close(a, b, 1e-12, f"gradient of input {i}")


def test_read_from_splits_the_gradient_between_write_and_read():
    """forward(x, read_from=r) with r equal to x in value: the same output and state, bit for bit,
    also when a stream is continued (the conv cache keeps r's query channels and x's key/value
    channels); the keys, values and gates' gradient goes to x, the queries' and output gate's to r."""
    mod = make_layer(seed=21)
    x0 = randn(2, 9, 8, seed=22)
    plain_out, plain_state = mod(x0)
    plain_out2, plain_state2 = mod(x0[:, :4], plain_state)
    x = x0.clone().requires_grad_()
    r = x0.clone().requires_grad_()
    out, state = mod(x, read_from=r)
    out2, state2 = mod(x[:, :4], state, read_from=r[:, :4])
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(out2, plain_out2, rtol=0, atol=0)
    assert_snapshots_equal(snapshot(state2), snapshot(plain_state2))
    # the written weights depend on x alone; the read-back depends on both
    gx, gr = torch.autograd.grad(sum(w.sum() for w in state.memory.weights), [x, r], allow_unused=True,
                                 retain_graph=True)
    assert gx.abs().sum() > 0 and (gr is None or gr.abs().sum() == 0)
    gx, gr = torch.autograd.grad(out.pow(2).sum(), [x, r], retain_graph=True)
    assert gx.abs().sum() > 0 and gr.abs().sum() > 0
    # the second piece's queries see r's first piece through the conv cache
    gr = torch.autograd.grad(out2[:, 0].pow(2).sum(), r)[0]
    assert gr[:, 8].abs().sum() > 0
    with pytest.raises(ValueError, match=r"read_from must be a tensor of x's shape \(2, 9, 8\), "
                                         r"got \(2, 8, 8\)"):
        mod(x0, read_from=x0[:, :8])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_output_cpp_passes_match_the_eager_ones(dtype, monkeypatch):
    """layer._GatedOutput with its elementwise passes in C++ (csrc/gated_output.cpp: taken when y is
    laid out (B, T, H, D), as the memory's read is) == the eager passes (y contiguous (B, H, T, D)),
    output and the gradients of y, the gate's logits, the norm weight and the projection; over
    several blocks, the last one partial. The C++ passes are reached, forward and backward."""
    from memory_testlib import ExtensionSpy

    from titans.memory import native

    monkeypatch.setattr(layer_mod, "OUT_BLOCK", 8)
    spy = ExtensionSpy()
    calls = spy.calls
    monkeypatch.setitem(native._STATE, "module", spy)
    g = torch.Generator().manual_seed(9)
    B, H, T, D = 2, 3, 21, 4
    y_rows = torch.randn(B, T, H, D, dtype=dtype, generator=g)
    gate = torch.randn(B, T, H * D, dtype=dtype, generator=g, requires_grad=True)
    w_norm = (1 + 0.1 * torch.randn(D, dtype=dtype, generator=g)).requires_grad_()
    w_out = torch.randn(H * D, H * D, dtype=dtype, generator=g, requires_grad=True)
    dout = torch.randn(B, T, H * D, dtype=dtype, generator=g)
    results = {}
    for name, y in (("cpp", y_rows.transpose(1, 2)), ("eager", y_rows.transpose(1, 2).contiguous())):
        y = y.detach().requires_grad_()
        out = layer_mod._GatedOutput.apply(y, gate, w_norm, w_out, 1e-6)
        results[name] = (out, *torch.autograd.grad(out, (y, gate, w_norm, w_out), dout))
        if name == "cpp":
            assert sorted(set(calls)) == ["gated_output_backward", "gated_output_forward"], calls
            calls.clear()
    assert not calls  # the contiguous (B, H, T, D) read takes the eager passes
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for what, a, b in zip(("out", "d y", "d gate", "d w_norm", "d w_out"), results["cpp"], results["eager"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=what)
