"""Streaming (SPEC.md §2, "State for streaming"): feeding a sequence in pieces, split anywhere, and
carrying the state gives the same outputs, final state and gradients as one call on the whole."""

from __future__ import annotations

import random

import pytest
import torch
from memory_testlib import (
    FUNCS,
    LAYER_OPTIONS,
    assert_rel_close,
    assert_states_close,
    grads,
    make_inputs,
    make_layer,
    random_functional,
    run,
)

from titans.memory import NeuralMemory, NeuralMemoryState

TOL = 1e-10
TRIALS = 4


def random_cuts(T: int, rng: random.Random) -> list[int]:
    """Sorted interior cut points: 1 to 5 pieces."""
    return sorted(rng.sample(range(1, T), rng.randint(0, 4)))


def split_plans(T: int, seed: int) -> list[list[int]]:
    """TRIALS random plans (seeded), plus one token at a time (the decoding case)."""
    rng = random.Random(seed)
    return [random_cuts(T, rng) for _ in range(TRIALS)] + [list(range(1, T))]


def pieces(T: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *cuts, T]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def chain(fns, inp, chunk, cuts, grad_clip=None):
    """Run the pieces in order, carrying the state; fns[i % len(fns)] runs piece i."""
    ys, state = [], None
    for i, (a, b) in enumerate(pieces(inp.T, cuts)):
        y, state = run(fns[i % len(fns)], inp.tokens(a, b), chunk, state, grad_clip)
        assert state.position == b
        ys.append(y)
    return torch.cat(ys, dim=2), state


# ----------------------------------------------------------------------------- functions

@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_chained_states_equal_one_call(fn, L, chunk, loops):
    T = 23
    inp = make_inputs(2, 2, T, 5, L, per_layer=L == 2 and chunk == 3, seed=40 + 3 * L + chunk)
    with torch.no_grad():
        y_full, st_full = run(fn, inp, chunk)
        for cuts in split_plans(T, seed=L * 10 + chunk):
            y, st = chain([fn], inp, chunk, cuts)
            assert st.position == T
            assert_rel_close(y, y_full, TOL, f"y, cuts {cuts}")
            assert_states_close(st, st_full, TOL, f"state, cuts {cuts}")


@pytest.mark.parametrize("chunk", [1, 4])
def test_states_are_interchangeable_between_functions(chunk):
    """A state written by one function continues in the other."""
    T = 21
    inp = make_inputs(2, 2, T, 4, 2, seed=50 + chunk)
    with torch.no_grad():
        y_full, st_full = run("recurrent", inp, chunk)
        for cuts in split_plans(T, seed=chunk)[:-1]:
            for order in (["chunked", "recurrent"], ["recurrent", "chunked"]):
                y, st = chain(order, inp, chunk, cuts)
                assert_rel_close(y, y_full, 1e-9, f"y, {order}, cuts {cuts}")
                assert_states_close(st, st_full, 1e-9, f"state, {order}, cuts {cuts}")


@pytest.mark.parametrize("grad_clip", [None, 0.1])
@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_chained_gradients_equal_one_call(fn, chunk, grad_clip, loops):
    """Backward through the carried states (including the open chunk's gradient base)."""
    T = 17
    inp = make_inputs(2, 2, T, 4, 2, seed=60 + chunk).leaves()
    wrt = [t for _, t in inp.tensors()]
    y_full, st_full = run(fn, inp, chunk, grad_clip=grad_clip)
    g_full = grads(random_functional(y_full, st_full, 0), wrt)
    for cuts in ([2, 9], [4, 5, 13]):
        y, st = chain([fn], inp, chunk, cuts, grad_clip)
        g = grads(random_functional(y, st, 0), wrt)
        for (name, _), a, b in zip(inp.tensors(), g, g_full, strict=True):
            assert_rel_close(a, b, 1e-9, f"d/d {name}, cuts {cuts}")


# ----------------------------------------------------------------------------- the layer

def layer_chain(mod: NeuralMemory, x: torch.Tensor, cuts: list[int], state=None):
    outs = []
    for a, b in pieces(x.shape[1], cuts):
        out, state = mod(x[:, a:b], state)
        assert isinstance(state, NeuralMemoryState)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def assert_layer_states_close(a: NeuralMemoryState, b: NeuralMemoryState, tol: float, what: str):
    assert_states_close(a.memory, b.memory, tol, f"{what} memory")
    for name in ("conv", "gate"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), f"{what} {name}: {ta is None} vs {tb is None}"
        if ta is not None:
            assert_rel_close(ta, tb, tol, f"{what} {name}")


@pytest.mark.parametrize("option", sorted(LAYER_OPTIONS))
def test_layer_streaming(option):
    T = 19
    mod = make_layer(seed=1, **LAYER_OPTIONS[option])
    x = torch.randn(2, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_full, st_full = mod(x)
        assert st_full.memory.position == T
        out_init, st_init = mod(x, mod.init_state(2))  # an explicit initial state == None
        assert_rel_close(out_init, out_full, 1e-12, "init_state output")
        for cuts in split_plans(T, seed=sum(map(ord, option))):
            out, st = layer_chain(mod, x, cuts)
            assert st.memory.position == T
            assert_rel_close(out, out_full, 1e-9, f"out, cuts {cuts}")
            assert_layer_states_close(st, st_full, 1e-9, f"cuts {cuts}")


@pytest.mark.parametrize("option", ["default", "chunk_gates", "grad_clip", "forget_to_init"])
def test_layer_streaming_gradients(option, loops):
    """Parameter gradients through a chained state equal those of one call."""
    T = 14
    mod = make_layer(seed=3, **LAYER_OPTIONS[option])
    x = torch.randn(2, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [p for _, p in mod.named_parameters()]
    r = torch.randn(2, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out_full, st_full = mod(x)
    g_full = grads((r * out_full).sum() + st_full.memory.weights[0].sum(), params)
    out, st = layer_chain(mod, x, [3, 6, 11])
    g = grads((r * out).sum() + st.memory.weights[0].sum(), params)
    for (name, _), a, b in zip(mod.named_parameters(), g, g_full, strict=True):
        assert_rel_close(a, b, 1e-9, f"d/d {name}")
