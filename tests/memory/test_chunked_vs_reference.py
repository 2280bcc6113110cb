"""memory_chunked (fast dual form) == memory_recurrent (token loop, autograd inner gradients), in
float64: outputs, final state and the gradients of every input (SPEC.md §2)."""

from __future__ import annotations

import pytest
import torch
from memory_testlib import (
    MemInputs,
    assert_rel_close,
    assert_states_close,
    grads,
    leaf_state,
    make_inputs,
    random_functional,
    run,
    state_tensors,
)

TOL = 1e-9
PREFIX_SEED = 1000


def _initial_state(inp: MemInputs, prefix: int, chunk: int, seed: int, forget_to: str = "zero"):
    """A state after `prefix` tokens (run with the reference), as fresh autograd leaves."""
    if prefix == 0:
        return None
    pre = make_inputs(inp.q.shape[0], inp.q.shape[1], prefix, inp.q.shape[3], len(inp.weights),
                      per_layer=inp.alpha.dim() == 4, seed=seed + PREFIX_SEED)
    pre.weights, pre.ln = inp.weights, inp.ln
    # not under no_grad: see test_properties (known bug)
    _, state = run("recurrent", pre, chunk, forget_to=forget_to)
    return leaf_state(state)


def _compare(inp: MemInputs, chunk: int, prefix: int, seed: int, grad_clip=None, check_grads=True,
             forget_to="zero", **options):
    """Run both functions on the same leaves; compare y, the final state and all gradients."""
    inp = inp.leaves()
    state = _initial_state(inp, prefix, chunk, seed, forget_to)
    y_ref, st_ref = run("recurrent", inp, chunk, state, grad_clip, forget_to, **options)
    y, st = run("chunked", inp, chunk, state, grad_clip, forget_to, **options)
    assert_rel_close(y, y_ref, TOL, "y")
    assert_states_close(st, st_ref, TOL)
    assert st.position == prefix + inp.T
    if not check_grads:
        return y_ref
    wrt = [("input " + n, t) for n, t in inp.tensors()]
    if state is not None:
        wrt += [("initial state." + n, t) for n, t in state_tensors(state)]
    names, tensors = zip(*wrt, strict=True)
    g_ref = grads(random_functional(y_ref, st_ref, seed), list(tensors))
    g = grads(random_functional(y, st, seed), list(tensors))
    for name, a, b in zip(names, g, g_ref, strict=True):
        assert_rel_close(a, b, TOL, f"d/d {name}")
    return y_ref


@pytest.mark.parametrize("with_state", [0, 5, 16], ids=lambda p: f"prefix{p}")
@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_chunked_matches_reference(L, chunk, per_layer, with_state, loops):
    T = 37 if chunk == 16 else 22  # never a multiple of the chunk size
    seed = 100 * L + 10 * chunk + per_layer + with_state
    inp = make_inputs(2, 2, T, 4 if L == 3 else 5, L, per_layer=per_layer, seed=seed)
    _compare(inp, chunk, with_state, seed)


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("L", [1, 2])
def test_grad_clip_matches_reference(L, chunk, per_layer):
    seed = 7 + L + chunk
    inp = make_inputs(2, 2, 19, 6, L, per_layer=per_layer, seed=seed)
    inp.v = 3.0 * inp.v  # large errors: the inner-gradient norms are well above the clip
    clip = 0.05
    y_clip = _compare(inp, chunk, 6, seed, grad_clip=clip)
    with torch.no_grad():
        y_free, _ = run("recurrent", inp, chunk)
    # the clip is active: the result differs clearly from the unclipped one
    assert (y_clip - y_free).norm() > 1e-2 * y_free.norm()


def test_grad_clip_larger_than_all_norms_is_identity():
    """Both runs on the eager loops: the clamp is not in the C++ loops, whose sums round differently."""
    from titans.memory import native

    inp = make_inputs(1, 2, 13, 4, 2, seed=3)
    native.native_chunks(False)
    try:
        for fn in ("recurrent", "chunked"):
            with torch.no_grad():
                y0, s0 = run(fn, inp, 4)
                y1, s1 = run(fn, inp, 4, grad_clip=1e6)
            assert_rel_close(y1, y0, 1e-14, f"{fn} y")
            assert_states_close(s1, s0, 1e-14, f"{fn} state")
    finally:
        native.native_chunks(True)


@pytest.mark.parametrize("alpha_mode", ["zeros", "zeros_and_ones"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("L", [1, 2])
def test_exact_zero_gates_stay_finite(L, chunk, per_layer, alpha_mode, loops):
    """eta = 0 everywhere, alpha with exact zeros (and ones: full wipe), theta with exact zeros:
    no NaN/Inf in outputs or gradients (the decay products must not go through log(0))."""
    seed = 31 + L + chunk + per_layer
    inp = make_inputs(2, 2, 17, 4, L, per_layer=per_layer, seed=seed)
    inp.eta = torch.zeros_like(inp.eta)
    inp.alpha = inp.alpha.clone()
    inp.alpha[:, :, ::2] = 0.0
    if alpha_mode == "zeros_and_ones":
        inp.alpha[:, :, 3::4] = 1.0
    inp.theta = inp.theta.clone()
    inp.theta[:, :, 5] = 0.0
    leaves = inp.leaves()
    for fn in ("recurrent", "chunked"):
        y, st = run(fn, leaves, chunk)
        assert torch.isfinite(y).all(), fn
        assert all(torch.isfinite(t).all() for _, t in state_tensors(st)), fn
        gs = grads(random_functional(y, st, seed), [t for _, t in leaves.tensors()])
        for (name, _), gd in zip(leaves.tensors(), gs, strict=True):
            assert torch.isfinite(gd).all(), f"{fn}: d/d {name} not finite"
    _compare(inp, chunk, 0, seed)


@pytest.mark.parametrize("with_state", [0, 5], ids=lambda p: f"prefix{p}")
@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_forgetting_towards_the_initial_weights_matches_reference(L, chunk, per_layer, with_state):
    """forget_to="init": W_t = (1 - alpha_t) W_{t-1} + alpha_t W_0 + S_t, chunked (on the offset
    W - W_0) against the token loop; outputs, state and every gradient (W_0 enters through the
    start, the anchor and the read)."""
    T = 37 if chunk == 16 else 22
    seed = 7000 + 100 * L + 10 * chunk + per_layer + with_state
    inp = make_inputs(2, 2, T, 4 if L == 3 else 5, L, per_layer=per_layer, seed=seed)
    y = _compare(inp, chunk, with_state, seed, forget_to="init")
    y_zero, _ = run("recurrent", inp, chunk)  # the rule changes the result (alpha > 0 here)
    assert (y - y_zero).abs().max() > 1e-8


@pytest.mark.parametrize("order", [{"first_order": True}, {"second_order": 0.5}],
                         ids=["first_order", "second_order_half"])
@pytest.mark.parametrize("forget_to", ["zero", "init"])
@pytest.mark.parametrize("with_state", [0, 5], ids=lambda p: f"prefix{p}")
@pytest.mark.parametrize("chunk", [3, 16])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_first_order_gradients_match_reference(L, chunk, with_state, forget_to, order, loops):
    """first_order=True: the token loop takes each inner gradient at a detached copy of its chunk-start
    weights; the chunked backward drops the same path. second_order=0.5: the token loop takes it at
    G.detach() + 0.5 (G - G.detach()); the chunked backward halves the same path. Outputs are
    unchanged, every gradient agrees with the reference, and it differs from the full gradient (the
    option does something)."""
    T = 37 if chunk == 16 else 22
    seed = 9000 + 100 * L + 10 * chunk + with_state + (forget_to == "init")
    inp = make_inputs(2, 2, T, 4 if L == 3 else 5, L, per_layer=L == 2, seed=seed)
    _compare(inp, chunk, with_state, seed, grad_clip=0.5 if L == 2 else None, forget_to=forget_to, **order)
    leaves = inp.leaves()
    wrt = [t for _, t in leaves.tensors()]
    outs = {}
    for changed in (False, True):
        y, st = run("chunked", leaves, chunk, forget_to=forget_to, **(order if changed else {}))
        outs[changed] = (y.detach(), grads(random_functional(y, st, seed), wrt))
    assert torch.equal(outs[False][0], outs[True][0])  # the forward pass is the same
    names = [n for n, _ in leaves.tensors()]
    diff = {n: (a - b).norm() / b.norm()
            for n, a, b in zip(names, outs[True][1], outs[False][1], strict=True)}
    assert max(diff.values()) > 1e-3, diff


@pytest.mark.parametrize("kw, match", [
    ({"second_order": 1.5}, r"second_order: expected a number in \[0, 1\], got 1.5"),
    ({"second_order": True}, r"second_order: expected a number in \[0, 1\], got True"),
    ({"first_order": True, "second_order": 0.5}, r"second_order: expected 1.0 with first_order=True"),
])
def test_second_order_is_validated(kw, match):
    inp = make_inputs(1, 1, 4, 3, 1, seed=1)
    for fn in ("recurrent", "chunked"):
        with pytest.raises(ValueError, match=match):
            run(fn, inp, 2, **kw)


def test_forget_to_is_validated():
    inp = make_inputs(1, 1, 4, 3, 1, seed=1)
    for fn in ("recurrent", "chunked"):
        with pytest.raises(ValueError, match="forget_to"):
            run(fn, inp, 2, forget_to="init_weights")


@pytest.mark.parametrize("forget_to", ["zero", "init"])
def test_compiled_chunk_step_matches_reference(forget_to):
    """titans.memory.compile_chunks: the torch.compile'd chunk step (its functional state update
    instead of the in-place one) against the float64 token loop, outputs, state and gradients,
    with an initial state and T not a multiple of the chunk, for both forgetting rules (the
    "init" rule runs the anchored path: the offset U = W - W_0 and the W_0 read). Compiling takes
    about a minute on 2 cores."""
    from titans.memory import chunks_compiled, compile_chunks

    compile_chunks()
    try:
        assert chunks_compiled()
        inp = make_inputs(2, 2, 37, 5, 2, per_layer=True, seed=7)
        _compare(inp, 16, 5, 7, forget_to=forget_to)
    finally:
        compile_chunks(False)
    assert not chunks_compiled()


class _ReplayGraph:
    """A CPU stand-in for a CUDA graph: `replay` re-runs the captured function on the static
    inputs and writes into the static outputs in place, as a graph replay does. A caller that read
    stale inputs or kept the static outputs (instead of copies) would see wrong values."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.replays = fn, inputs, 0
        self.out = fn(*inputs)

    def replay(self):
        from torch.utils._pytree import tree_flatten

        self.replays += 1
        for dst, src in zip(tree_flatten(self.out)[0], tree_flatten(self.fn(*self.inputs))[0], strict=True):
            dst.copy_(src)


@pytest.mark.parametrize("forget_to", ["zero", "init"])
def test_graphed_chunk_loops_match_reference(monkeypatch, forget_to):
    """titans.memory.graph_chunks: the chunk loops run as captured graphs (static inputs copied in,
    outputs copied out, one graph per configuration), here with a CPU stand-in for the capture.
    Two layers' worth of calls of one configuration with different data (the second forward
    replays the first's graphs before either backward runs, as in a model) both match the float64
    token loop, values and gradients, over several stretches of chunks; another length reuses them."""
    from titans.memory import chunked, chunks_graphed, graph_chunks

    graphs = []

    def capture(fn, inputs):
        graphs.append(_ReplayGraph(fn, inputs))
        return graphs[-1], graphs[-1].out

    monkeypatch.setitem(chunked._GRAPHS, "capture", capture)
    graph_chunks()
    try:
        assert chunks_graphed()
        # chunk 4, T = 37: 10 chunks, stretches of 4, 4 and 2 (CHECKPOINT_EVERY = 4)
        inps = [make_inputs(2, 2, 37, 5, 2, per_layer=True, seed=seed).leaves() for seed in (7, 8)]
        outs = [run("chunked", inp, 4, forget_to=forget_to) for inp in inps]
        assert len(graphs) == 2  # forward: a whole stretch and the short last one
        assert sum(g.replays for g in graphs) == 6  # 3 stretches per call, each a replay
        loss = sum(random_functional(y, st, seed) for (y, st), seed in zip(outs, (7, 8)))
        tensors = [t for inp in inps for _, t in inp.tensors()]
        got = grads(loss, tensors)
        assert len(graphs) == 5  # backward: the last stretch, a middle one and the first one
        expected = []
        for inp, (y, _), seed in zip(inps, outs, (7, 8)):
            y_ref, st_ref = run("recurrent", inp, 4, forget_to=forget_to)
            assert_rel_close(y, y_ref, TOL, "y")
            expected += grads(random_functional(y_ref, st_ref, seed), [t for _, t in inp.tensors()])
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_rel_close(a, b, TOL, f"gradient {i}")
        # another length, starting mid-chunk from a state: 6 chunks, stretches of 4 and 2
        _compare(make_inputs(2, 2, 21, 5, 2, per_layer=True, seed=3), 4, 5, 3, forget_to=forget_to)
        assert len(graphs) == 5  # the same stretch shapes: the graphs serve every length
    finally:
        graph_chunks(False)
    assert not chunks_graphed() and not chunked._GRAPHS["cache"]


def _coefficient_inputs(exact_zeros: bool, dtype=torch.float64):
    """Gates (3, 2, 2, 2, 7) with padding tokens at both ends, optionally with exact zeros of 1 - alpha
    and of eta (where a division-based formula fails)."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 2, 7)
    alpha, eta, theta = (torch.rand(shape, dtype=torch.float64, generator=g) for _ in range(3))
    if exact_zeros:
        alpha[0, 0, 0, 0, 3] = alpha[2, 1, 1, 1, 6] = 1.0
        eta[1, 0, 1, 1, 2] = eta[2, 1, 0, 0, 0] = 0.0
    valid = torch.ones(3, 1, 1, 1, 7, dtype=torch.float64)
    valid[0, ..., :2] = 0  # an open chunk's earlier tokens
    valid[-1, ..., 5:] = 0  # padding at the end
    return [t.to(dtype) for t in (alpha, eta, theta, valid)], g


@pytest.mark.parametrize("exact_zeros", [False, True])
def test_chunk_coefficients_backward_matches_autograd(exact_zeros, loops):
    """The hand-written gradient of the chunk coefficients (used inside the checkpoint stretches, so
    they stay free of autograd; in C++ or eager, `loops`) == autograd through the eager
    `chunk_coefficients`, in float64, with padding tokens and exact zeros."""
    from titans.memory.chunked import chunk_coefficients, chunk_coefficients_backward

    (alpha, eta, theta, valid), g = _coefficient_inputs(exact_zeros)
    inputs = [t.clone().requires_grad_() for t in (alpha, eta, theta)]
    outputs = chunk_coefficients(*inputs, valid)  # with autograd: always the eager code
    grads = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outputs]
    expected = torch.autograd.grad(outputs, inputs, grads)
    got = chunk_coefficients_backward(alpha, eta, theta, valid, *grads)
    for name, e, r in zip(("alpha", "eta", "theta"), expected, got):
        assert torch.allclose(r, e, rtol=1e-12, atol=1e-14), f"d {name}: max error {(r - e).abs().max():.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exact_zeros", [False, True])
def test_cpp_chunk_coefficients_match_the_eager_ones(exact_zeros, dtype, monkeypatch):
    """The C++ coefficients (csrc/coefficients.cpp, run outside autograd on the CPU) == the eager
    ones, values and gradients, with padding and exact zeros; the extension is reached."""
    from memory_testlib import ExtensionSpy

    from titans.memory import chunked, native

    spy = ExtensionSpy()

    (alpha, eta, theta, valid), g = _coefficient_inputs(exact_zeros, dtype)
    grads = None
    results = {}
    for mode in ("native", "eager"):
        native.native_chunks(mode == "native")
        monkeypatch.setitem(native._STATE, "module", spy if mode == "native" else spy.ext)
        try:
            out = chunked.chunk_coefficients(alpha, eta, theta, valid)
            if grads is None:
                grads = [torch.randn(o.shape, dtype=torch.float64, generator=g).to(dtype) for o in out]
            results[mode] = (*out, *chunked.chunk_coefficients_backward(alpha, eta, theta, valid, *grads))
        finally:
            native.native_chunks(True)
    assert spy.calls == ["chunk_coefficients", "chunk_coefficients_backward"]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    names = ("a", "m", "C", "cS", "e", "d alpha", "d eta", "d theta")
    for name, got, expected in zip(names, results["native"], results["eager"]):
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=name)


def test_gelu_derivatives_match_autograd_of_the_exact_gelu():
    """The hand-written backward's GELU derivatives (first: PyTorch's fused GELU backward; second:
    phi(z) (2 - z^2), computed in place) against autograd of F.gelu, float64, tails included."""
    from titans.memory.chunked import _gelu_second
    from titans.memory.functional import gelu_backward, gelu_grad

    z = torch.cat([torch.linspace(-12, 12, 241, dtype=torch.float64), torch.randn(500, dtype=torch.float64)])
    z.requires_grad_(True)
    (first,) = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    z, dy = z.detach(), torch.randn(z.shape, dtype=torch.float64)
    assert torch.allclose(gelu_grad(z), first.detach(), rtol=1e-12, atol=1e-15)
    assert torch.allclose(gelu_backward(dy, z), dy * first.detach(), rtol=1e-12, atol=1e-15)
    z_before = z.clone()
    assert torch.allclose(_gelu_second(z), second, rtol=1e-12, atol=1e-15)
    assert torch.equal(z, z_before)  # the in-place steps work on its own buffers, not on z


def _small_momentum_inputs(dtype=torch.float64) -> MemInputs:
    """make_inputs with every momentum gate in [0.05, 0.25] (products of a chunk's gates, 0.2^64 = 2e-45,
    fall through float32's subnormal range), made in float64 and cast to dtype."""
    inp = make_inputs(B=1, H=2, T=150, D=6, L=2, seed=7)
    g = torch.Generator().manual_seed(8)
    inp.eta = 0.05 + 0.2 * torch.rand(inp.eta.shape, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return MemInputs(*(cast(getattr(inp, n)) for n in ("q", "k", "v", "alpha", "eta", "theta")),
                     tuple(cast(w) for w in inp.weights), tuple(cast(t) for t in inp.ln))


def test_tiny_chunk_coefficients_are_flushed_to_zero(loops):
    """Every chunk coefficient is 0 or at least sqrt(finfo.tiny): matrix products with subnormal
    operands or results run several times slower on x86 CPUs (benchmarks/subnormal_gates.py)."""
    import math

    from titans.memory.chunked import _decay_matrix, chunk_coefficients

    inp, b = _small_momentum_inputs(torch.float32), 64
    chunks = lambda t: t[..., :2 * b].reshape(1, 2, 2, b).permute(2, 0, 1, 3).unsqueeze(3)  # noqa: E731 (N, B, H, 1, b)
    alpha, eta, theta = (chunks(t) for t in (inp.alpha, inp.eta, inp.theta))
    floor = math.sqrt(torch.finfo(torch.float32).tiny)
    below = lambda t: ((t != 0) & (t.abs() < floor)).sum().item()  # noqa: E731
    assert below(_decay_matrix(eta)) > 0  # the gates' products do reach the range
    coefficients = chunk_coefficients(alpha, eta, theta, torch.ones(2, 1, 1, 1, b))
    assert [below(t) for t in coefficients] == [0] * 5


def test_flushed_coefficients_leave_float32_results_at_the_reference(loops):
    """With the flush, a float32 chunked run whose momentum gates are small still matches the float64
    token loop (outputs, final weights, and the gradients of every input) to float32 rounding."""
    ref, inp = _small_momentum_inputs().leaves(), _small_momentum_inputs(torch.float32).leaves()
    y64, s64 = run("recurrent", ref, 64)
    y32, s32 = run("chunked", inp, 64)
    assert_rel_close(y32, y64, 1e-4, "y")
    for w32, w64 in zip(s32.weights, s64.weights):
        assert_rel_close(w32, w64, 1e-4, "final weights")

    def loss(y, state):  # one random functional (float64 weights) of y and the final state
        g = torch.Generator().manual_seed(3)
        terms = [y, *(t for _, t in state_tensors(state))]
        return sum((torch.randn(t.shape, generator=g, dtype=torch.float64) * t.double()).sum() for t in terms)

    for (name, _), g32, g64 in zip(ref.tensors(), grads(loss(y32, s32), [t for _, t in inp.tensors()]),
                                   grads(loss(y64, s64), [t for _, t in ref.tensors()])):
        assert_rel_close(g32, g64, 1e-3, f"d {name}")


@pytest.mark.parametrize("start", [0, 3])  # a stream that starts at a chunk boundary, and one mid-chunk
def test_packed_projections_give_the_same_results_and_gradients(start, loops):
    """run_memory(packed=h), with q, k, v the slices of h (B, T, 3, H, D) as the layer makes them, ==
    run_memory on q, k, v alone: y, the state, and the gradient of h, float64; T not a multiple of
    the chunk, so the chunks are padded at one or both ends. A packed tensor that is not q, k and
    v's own is refused."""
    from titans.memory.chunked import run_memory

    inp = make_inputs(2, 2, 13, 4, 2, seed=12)
    state = None
    if start:
        _, state = run("chunked", make_inputs(2, 2, start, 4, 2, seed=13), 4)
    h = torch.stack([inp.q, inp.k, inp.v], dim=2).transpose(1, 3).contiguous()  # (B, T, 3, H, D)
    results = []
    for packed in (True, False):
        hh = h.clone().requires_grad_()
        q, k, v = hh.permute(2, 0, 3, 1, 4).unbind(0)
        y, s = run_memory(q, k, v, inp.alpha, inp.eta, inp.theta, inp.weights, chunk_size=4, ln=inp.ln,
                          state=state, grad_clip=None, read=True, packed=hh if packed else None)
        (dh,) = torch.autograd.grad((y * y).sum() + s.weights[0].sum(), hh)
        results.append((y, *s.weights, dh))
    for what, a, b in zip(("y", "W1", "W2", "d h"), *results):
        assert_rel_close(a, b, 1e-13, what)
    q, k, v = h.permute(2, 0, 3, 1, 4).unbind(0)
    with pytest.raises(ValueError, match="packed must be"):
        run_memory(q, k, v, inp.alpha, inp.eta, inp.theta, inp.weights, chunk_size=4, ln=inp.ln, state=None,
                   grad_clip=None, read=True, packed=h.clone())
