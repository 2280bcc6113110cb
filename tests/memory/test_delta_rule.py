"""A linear memory (L = 1) is the gated delta rule (with momentum): both memory functions against the
recurrence written out by hand with plain tensor ops, no autograd (SPEC.md §2)."""

from __future__ import annotations

import pytest
import torch
from memory_testlib import FUNCS, assert_rel_close, make_inputs, run

TOL = 1e-12


def linear_memory_by_hand(q, k, v, alpha, eta, theta, W0, chunk_size):
    """Per batch element and head, row vectors x -> x W:
        G      = W at the start of t's chunk (chunks at 0, b, 2b, ...)
        g_t    = k_t^T (k_t G - v_t)                (grad of 0.5 ||k_t G - v_t||^2 at G)
        S_t    = eta_t S_{t-1} - theta_t g_t
        W_t    = (1 - alpha_t) W_{t-1} + S_t
        y_t    = q_t W_t
    """
    B, H, T, D = q.shape
    y = torch.empty_like(q)
    W_final = torch.empty(B, H, D, D, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            W = W0[h].clone()
            S = torch.zeros_like(W)
            G = W
            for t in range(T):
                if t % chunk_size == 0:
                    G = W.clone()
                kt, vt = k[b, h, t], v[b, h, t]
                g = torch.outer(kt, kt @ G - vt)
                S = eta[b, h, t] * S - theta[b, h, t] * g
                W = (1 - alpha[b, h, t]) * W + S
                y[b, h, t] = q[b, h, t] @ W
            W_final[b, h] = W
    return y, W_final


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_gated_delta_rule(fn):
    """chunk 1, eta = 0: W_t = (1 - alpha_t) W_{t-1} - theta_t k_t^T (k_t W_{t-1} - v_t)."""
    inp = make_inputs(2, 3, 23, 6, 1, seed=11)
    inp.eta = torch.zeros_like(inp.eta)
    inp.theta = 0.5 + 0.5 * inp.theta  # a real delta-rule step size
    y_hand, W_hand = linear_memory_by_hand(inp.q, inp.k, inp.v, inp.alpha, inp.eta, inp.theta,
                                           inp.weights[0], 1)
    # the same loop, written directly as the delta rule (no momentum variable at all)
    W = inp.weights[0].expand(2, 3, 6, 6).clone()
    y_delta = torch.empty_like(inp.q)
    for t in range(inp.T):
        kt, vt = inp.k[:, :, t, :, None], inp.v[:, :, t, None, :]  # column k_t, row v_t
        a, th = inp.alpha[:, :, t, None, None], inp.theta[:, :, t, None, None]
        W = (1 - a) * W - th * kt @ (kt.transpose(-1, -2) @ W - vt)
        y_delta[:, :, t] = (inp.q[:, :, t, None, :] @ W)[:, :, 0]
    assert_rel_close(y_hand, y_delta, 1e-14, "hand loops")
    with torch.no_grad():
        y, st = run(fn, inp, 1)
    assert_rel_close(y, y_hand, TOL, f"{fn} y")
    assert_rel_close(st.weights[0], W_hand, TOL, f"{fn} W_T")


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_linear_memory_with_momentum_and_chunks(fn, chunk):
    """The full linear recurrence (momentum on, gradients at the chunk start) by hand."""
    inp = make_inputs(2, 2, 19, 5, 1, seed=12 + chunk)
    y_hand, W_hand = linear_memory_by_hand(inp.q, inp.k, inp.v, inp.alpha, inp.eta, inp.theta,
                                           inp.weights[0], chunk)
    with torch.no_grad():
        y, st = run(fn, inp, chunk)
    assert_rel_close(y, y_hand, TOL, f"{fn} y")
    assert_rel_close(st.weights[0], W_hand, TOL, f"{fn} W_T")


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_delta_rule_stores_exactly(fn):
    """alpha = 0, eta = 0, theta = 1, ||k|| = 1: one write of (k, v) makes q = k read back v exactly,
    whatever the memory held before (k W_new = k W - (k k^T)(k W - v) = v)."""
    inp = make_inputs(1, 2, 2, 4, 1, seed=13)
    inp.alpha, inp.eta = torch.zeros_like(inp.alpha), torch.zeros_like(inp.eta)
    inp.theta = torch.ones_like(inp.theta)
    inp.q = inp.k.clone()
    with torch.no_grad():
        y, _ = run(fn, inp, 1)
    assert_rel_close(y, inp.v, 1e-13, f"{fn} recall")
