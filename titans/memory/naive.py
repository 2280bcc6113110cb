"""The reference neural memory: a token loop, inner gradients from autograd (SPEC.md §2).

Slow and obviously right; tests hold the fast path (`chunked.py`) to it. Not for users.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import (
    MemoryState,
    Weights,
    check_inputs,
    memory_apply,
    no_autocast,
    per_layer_gate,
    second_order_scale,
    start_state,
)


def memory_recurrent(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                     weights: Weights, *, chunk_size: int = 1, ln: tuple[Tensor, Tensor] | None = None,
                     state: MemoryState | None = None, grad_clip: float | None = None,
                     forget_to: str = "zero", first_order: bool = False,
                     second_order: float = 1.0) -> tuple[Tensor, MemoryState]:
    """Run the memory token by token.

    q, k, v: (B, H, T, D); alpha, eta, theta: (B, H, T) or (B, H, T, L);
    weights: L tensors (H, D_{l-1}, D_l), the initial memory W_0; ln: (gamma, beta) for L >= 2.
    For every token t (chunk = positions [cb, (c+1)b) of the stream):
        g_t = grad_W 0.5 ||M_W(k_t) - v_t||^2 at W = W at the start of t's chunk
        S_t = eta_t S_{t-1} - theta_t g_t
        W_t = (1 - alpha_t) W_{t-1} + S_t                 (forget_to="zero": the paper's rule)
        W_t = (1 - alpha_t) W_{t-1} + alpha_t W_0 + S_t   (forget_to="init": forget towards W_0,
                                                           the `weights` argument, also with a state)
        y_t = M_{W_t}(q_t)
    first_order=True changes only gradients: each g_t is taken at a detached copy of the chunk-start
    weights, so the outer gradient reaches k_t, v_t and ln through g_t but not the weights it was
    taken at (as first-order MAML drops the inner loop's second derivatives). second_order=s in
    [0, 1] keeps that share of it: g_t is taken at G' = G.detach() + s (G - G.detach()), equal to G
    in value, whose gradient is s times G's (s = 0 is first_order, 1 the exact gradient).
    Returns y: (B, H, T, D) and the state after the last token.
    """
    spec = check_inputs(q, k, v, alpha, eta, theta, weights, chunk_size, ln, state, grad_clip, forget_to,
                        first_order, second_order)
    scale = second_order_scale(first_order, second_order)
    dtype = spec.dtype
    with no_autocast(q.device.type):
        q, k, v = (t.to(dtype) for t in (q, k, v))
        alpha, eta, theta = (per_layer_gate(g.to(dtype), spec.L) for g in (alpha, eta, theta))
        ln = None if ln is None else tuple(t.to(dtype) for t in ln)
        W, S, G, pos = start_state(weights, state, spec, dtype)
        ys = []
        for t in range(spec.T):
            if (pos + t) % chunk_size == 0:
                G = W
            grads = _inner_grad(G, k[:, :, t], v[:, :, t], ln, grad_clip, scale)
            a_t, e_t, th_t = (g[:, :, t, :, None, None] for g in (alpha, eta, theta))  # (B, H, L, 1, 1)
            S = tuple(e_t[:, :, i] * s - th_t[:, :, i] * g for i, (s, g) in enumerate(zip(S, grads)))
            W = tuple((1 - a_t[:, :, i]) * w + s for i, (w, s) in enumerate(zip(W, S)))
            if forget_to == "init":
                W = tuple(w + a_t[:, :, i] * w0.to(dtype) for i, (w, w0) in enumerate(zip(W, weights)))
            ys.append(memory_apply(q[:, :, t, None], W, ln)[:, :, 0])
        y = torch.stack(ys, dim=2)
        G = W if (pos + spec.T) % chunk_size == 0 else G
        return y, MemoryState(W, S, G, pos + spec.T, chunk_size)


def _inner_grad(G: Weights, k_t: Tensor, v_t: Tensor, ln, grad_clip: float | None,
                scale: float = 1.0) -> Weights:
    """grad_W 0.5 ||M_W(k_t) - v_t||^2 at W = G, per batch element and head, kept in the graph
    (scale: the share of its gradient into G that is kept; 0: a function of k_t, v_t and ln only)."""
    outer = torch.is_grad_enabled()  # keep the inner gradient in the outer graph only if there is one

    def at(g):
        if not (outer and g.requires_grad) or scale == 0.0:
            return g.detach().requires_grad_()
        return g if scale == 1.0 else g.detach() + scale * (g - g.detach())  # g in value, s x its gradient

    with torch.enable_grad():
        G = tuple(at(g) for g in G)
        loss = 0.5 * (memory_apply(k_t[:, :, None], G, ln)[:, :, 0] - v_t).pow(2).sum()
        grads = torch.autograd.grad(loss, G, create_graph=outer)
    if grad_clip is not None:
        norm = torch.sqrt(sum(g.pow(2).sum((-2, -1)) for g in grads))
        scale = grad_clip / torch.maximum(norm, torch.full_like(norm, grad_clip))
        grads = tuple(g * scale[..., None, None] for g in grads)
    return grads
