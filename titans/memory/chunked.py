"""The fast neural memory: chunk-wise dual form (SPEC.md §2, "How to compute it fast").

Inside a chunk every inner gradient is taken at the chunk's start weights G, so each is a sum of
rank-1 products x_s^T delta_s per layer (x: the layer's input on k_s, delta: the loss gradient at
the layer's output). Unrolling the two linear recurrences from the chunk's first token gives

    W_t = a_t W_0 + m_t S_0 - sum_{s <= t} C[t, s] x_s^T delta_s
    S_t = E_t S_0 - sum_{s <= t} theta_s Q[t, s] x_s^T delta_s

so reading M_{W_t}(q_t) needs only b x b masked matmuls per layer, and per-token weights or
gradients are never formed. An autograd.Function keeps only the chunk-boundary states in the
forward pass and recomputes each chunk in the backward pass. On the CPU the loops over a stretch's
chunks run in C++ (native.py: one (batch, head) memory per thread), the same equations as
`_forward_stretch` / `_backward_stretch` here, which run everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .functional import (
    MemoryState,
    Weights,
    check_inputs,
    gelu_backward,
    gelu_grad,
    layer_norm,
    memory_apply,
    no_autocast,
    second_order_scale,
    start_state,
)


def memory_chunked(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                   weights: Weights, *, chunk_size: int = 16, ln: tuple[Tensor, Tensor] | None = None,
                   state: MemoryState | None = None, grad_clip: float | None = None,
                   forget_to: str = "zero", first_order: bool = False,
                   second_order: float = 1.0) -> tuple[Tensor, MemoryState]:
    """Same arguments and results as `memory_recurrent`, computed chunk by chunk.

    q, k, v: (B, H, T, D); alpha, eta, theta: (B, H, T) or (B, H, T, L);
    weights: L tensors (H, D_{l-1}, D_l); ln: (gamma, beta), each (H, D), iff L >= 2.
    Returns y: (B, H, T, D) and the MemoryState after the last token.
    """
    return run_memory(q, k, v, alpha, eta, theta, weights, chunk_size=chunk_size, ln=ln,
                      state=state, grad_clip=grad_clip, read=True, forget_to=forget_to,
                      first_order=first_order, second_order=second_order)


def run_memory(q, k, v, alpha, eta, theta, weights, *, chunk_size, ln, state, grad_clip, read,
               forget_to: str = "zero", normalize_qk: bool = False,
               first_order: bool = False, second_order: float = 1.0,
               packed: Tensor | None = None) -> tuple[Tensor | None, MemoryState]:
    """memory_chunked, optionally without the read (write only: y is None).

    normalize_qk=True takes q and k before their L2 normalisation and normalises them inside, chunk
    by chunk (the layer's path): the memory then keeps only its chunk-layout copies of q, k and v
    for the backward pass, not also the tensor they were cut from.

    forget_to="init" runs the same chunk machinery on the offset U = W - W_0, which forgets towards
    zero exactly as W does under the paper's rule; the memory and its gradient base are W_0 + U.

    first_order=True drops, in the backward pass only, the gradient that flows from each inner
    gradient into the chunk-start weights it was taken at (see `memory_recurrent`); second_order=s
    keeps the share s of it.

    packed: the (B, T, 3, H, D) tensor whose slices q, k, v are (the layer's projections, side by
    side per token): they are then cut into chunks from it, and their gradients written back into
    one tensor of its layout (`_PackedChunks`)."""
    if packed is not None and (packed.dim() != 5 or packed.shape[2] != 3
                               or any(not _slice_of(t, packed, i) for i, t in enumerate((q, k, v)))):
        raise ValueError("run_memory: packed must be the (B, T, 3, H, D) tensor whose slices are q, k, v")
    spec = check_inputs(q, k, v, alpha, eta, theta, weights, chunk_size, ln, state, grad_clip, forget_to,
                        first_order, second_order)
    scale = second_order_scale(first_order, second_order)
    dtype, b, L = spec.dtype, chunk_size, spec.L
    with no_autocast(q.device.type):
        W, S, G, pos = start_state(weights, state, spec, dtype)
        r = pos % b  # tokens of the open chunk already seen
        if r == 0:
            G = W
        N = math.ceil((r + spec.T) / b)
        pad = (r, N * b - r - spec.T)
        if packed is not None:
            q_c, k_c, v_c = _PackedChunks.apply(packed, pad, b, dtype)
        else:
            q_c, k_c, v_c = (_chunk_tokens(t.to(dtype), pad, b) for t in (q, k, v))
        # padding tokens neither forget (alpha 0), decay momentum (eta 1) nor write (theta 0)
        a_c, e_c, t_c = (_chunk_gate(g.to(dtype), pad, b, fill)
                         for g, fill in ((alpha, 0.0), (eta, 1.0), (theta, 0.0)))
        valid = torch.zeros(N * b, dtype=dtype, device=q.device)
        valid[r:r + spec.T] = 1
        gamma, beta = (None, None) if ln is None else (ln[0].to(dtype), ln[1].to(dtype))
        W0 = tuple(w.to(dtype) for w in weights) if forget_to == "init" else ()
        if W0:
            W = tuple(w - w0 for w, w0 in zip(W, W0))  # the offset U
        WS = tuple(torch.cat([w, s], dim=-2) for w, s in zip(W, S))
        out = _MemoryChunks.apply(L, grad_clip, read, bool(W0), normalize_qk, scale, q_c, k_c, v_c,
                                  a_c, e_c, t_c,
                                  valid.view(N, 1, 1, 1, b), gamma, beta, *G, *WS, *W0)
        y_c, WS_T, G_T = out[0], out[1:1 + L], out[1 + L:]
        W_T = _w_part(WS_T)
        # W apart from S: a later read that keeps W for its backward (MAC's next segment) would
        # otherwise keep the whole [W; S] buffer alive
        W_T = tuple(w0 + u for w0, u in zip(W0, W_T)) if W0 else tuple(w.contiguous() for w in W_T)
        S_T = tuple(ws[:, :, ws.shape[2] // 2:] for ws in WS_T)
        y = None
        if read:
            # (B, H, T, D) laid out as (B, T, H, D): the layer's output norm reads it by time steps
            y = y_c.permute(1, 0, 3, 2, 4).reshape(spec.B, N * b, spec.H, spec.D)
            y = y[:, r:r + spec.T].transpose(1, 2)
        aligned = (pos + spec.T) % b == 0
        return y, MemoryState(W_T, S_T, W_T if aligned else G_T, pos + spec.T, b)


def _chunk_tokens(x: Tensor, pad: tuple[int, int], b: int) -> Tensor:
    """(B, H, T, D) -> (N, B, H, b, D), zero-padded at the front/back to whole chunks."""
    if any(pad):  # F.pad copies even when it pads nothing
        x = F.pad(x, (0, 0, *pad))
    # one copy from any layout (the layer's q, k, v are strided views of the convolution's output)
    return x.unflatten(2, (-1, b)).permute(2, 0, 1, 3, 4).contiguous()


def _slice_of(x: Tensor, packed: Tensor, i: int) -> bool:
    """Whether x (B, H, T, D) is packed[:, :, i] (B, T, H, D) with its head and time dims swapped."""
    view = packed[:, :, i].transpose(1, 2)
    return x.shape == view.shape and x.stride() == view.stride() and x.data_ptr() == view.data_ptr()


class _PackedChunks(torch.autograd.Function):
    """q, k, v in the chunk layout (N, B, H, b, D), zero-padded, from the packed projections h
    (B, T, 3, H, D): one copy each, as `_chunk_tokens`. The backward writes their three gradients
    straight into one tensor of h's layout (one strided copy each), where autograd's way back
    through unbind, permute and reshape makes three full copies."""

    @staticmethod
    def forward(ctx, h, pad, b, dtype):
        ctx.shape, ctx.pad, ctx.h_dtype = h.shape, pad, h.dtype
        return tuple(_chunk_tokens(h[:, :, i].transpose(1, 2).to(dtype), pad, b) for i in range(3))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        B, T, _, H, D = ctx.shape
        (r, _), ref = ctx.pad, next(g for g in grads if g is not None)
        N, b = ref.shape[0], ref.shape[3]
        dh = ref.new_empty(B, N * b, 3, H, D, dtype=ctx.h_dtype)  # padded in time; handed out as a slice
        for i, g in enumerate(grads):
            target = dh[:, :, i].unflatten(1, (N, b))  # (B, N, b, H, D), a view
            if g is None:
                target.zero_()
            else:
                target.copy_(g.permute(1, 0, 3, 2, 4))
        return dh[:, r:r + T], None, None, None


def _chunk_gate(g: Tensor, pad: tuple[int, int], b: int, fill: float) -> Tensor:
    """(B, H, T) or (B, H, T, L) -> (N, B, H, Lg, b), padded with `fill`."""
    if g.dim() == 3:
        g = g.unsqueeze(-1)
    if any(pad):
        g = F.pad(g, (0, 0, *pad), value=fill)
    return g.unflatten(2, (-1, b)).permute(2, 0, 1, 4, 3).contiguous()


def _decay_matrix(x: Tensor) -> Tensor:
    """P[..., t, u] = prod_{u < r <= t} x_r for t >= u, 0 above the diagonal. x: (..., b).

    A cumulative product down masked columns: no logarithms, so exact zeros (eta = 0, alpha = 1)
    and long products stay finite."""
    b = x.shape[-1]
    below = torch.ones(b, b, dtype=torch.bool, device=x.device).tril(-1)
    M = torch.where(below, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.cumprod(M, dim=-2).tril()


def chunk_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, valid: Tensor):
    """Scalars of the unrolled recurrence, per chunk, head and gate layer.

    alpha, eta, theta: (N, B, H, Lg, b); valid: 1 for real tokens, 0 for padding.
    Returns a, m: (N, B, H, Lg, b); C: (N, B, H, Lg, b, b); cS: (N, B, H, Lg, b); e: (N, B, H, Lg)
    with  W_t = a_t W_0 + m_t S_0 - sum_s C[t, s] g_s  and  S_end = e S_0 - sum_s cS[s] g_s.
    On the CPU, outside autograd, the same in C++ (csrc/coefficients.cpp), one gate row per loop.
    """
    ext = _native_coefficients(alpha, eta, theta, valid)
    if ext is not None:
        b = alpha.shape[-1]
        a, m, C, cS, e = ext.chunk_coefficients(*_gate_rows(alpha, eta, theta, valid))
        return (a.view(alpha.shape), m.view(alpha.shape), C.view(*alpha.shape, b), cS.view(alpha.shape),
                e.view(alpha.shape[:-1]))
    keep = 1 - alpha
    P = _decay_matrix(keep) * valid.unsqueeze(-2)  # W_t picks up S_u only at real steps u
    Q = _decay_matrix(eta)
    E = torch.cumprod(eta, dim=-1)
    a = torch.cumprod(keep, dim=-1)
    m = (P @ E.unsqueeze(-1)).squeeze(-1)
    C = (P @ Q) * theta.unsqueeze(-2)
    cS = theta * Q[..., -1, :]
    return tuple(_flush_subnormal(t) for t in (a, m, C, cS, E[..., -1]))


def _flush_subnormal(t: Tensor) -> Tensor:
    """t with its entries below sqrt(finfo.tiny) in magnitude (1.1e-19 in float32) set to 0.

    Products of many small gates (eta^64 at eta = 0.2 is 2e-45) pass through the subnormal range,
    and so do their products with the keys and errors in the chunk's matrix products; on x86 CPUs
    a matrix product with subnormal operands or results runs several times slower (a memory step
    whose momentum gates sat near 0.2 took twice as long: benchmarks/subnormal_gates.py). A
    coefficient that is either 0 or at least sqrt(tiny) keeps every product with a normal number
    of at least sqrt(tiny) normal. The dropped terms scale a state by less than 1.1e-19 (float32;
    1.5e-154 in float64), far below the rounding of the state itself."""
    floor = math.sqrt(torch.finfo(t.dtype).tiny)
    tiny = (t.abs() < floor) & (t != 0)  # exact zeros pass through t (and autograd through it)
    return torch.where(tiny, torch.zeros((), dtype=t.dtype, device=t.device), t)


def chunk_coefficients_backward(alpha: Tensor, eta: Tensor, theta: Tensor, valid: Tensor,
                                da: Tensor, dm: Tensor, dC: Tensor, dcS: Tensor, de: Tensor):
    """Gradients of `chunk_coefficients` with respect to alpha, eta and theta, given those of its
    outputs (a, m, C, cS, e). Written out, without divisions, so exact zeros (alpha = 1, eta = 0)
    need no special case: a product's derivative by one of its factors is the product of the
    others, which for the decay matrices is D[r-1, u] D[t, r] and for the cumulative products
    c[r-1] D[t, r]."""
    ext = _native_coefficients(alpha, eta, theta, valid)
    if ext is not None:
        b = alpha.shape[-1]
        rows = lambda t, *shape: t.reshape(-1, *shape).contiguous()  # noqa: E731
        grads = [rows(da, b), rows(dm, b), rows(dC, b, b), rows(dcS, b), rows(de)]
        return tuple(d.view(alpha.shape) for d in ext.chunk_coefficients_backward(
            *_gate_rows(alpha, eta, theta, valid), *grads))
    keep = 1 - alpha
    Pk = _decay_matrix(keep)
    mask = valid.unsqueeze(-2)
    P, Q = Pk * mask, _decay_matrix(eta)
    E, a = torch.cumprod(eta, dim=-1), torch.cumprod(keep, dim=-1)
    # C = (P @ Q) * theta (columns); cS = theta * Q[-1]; m = P @ E; e = E[-1]
    d_theta = (dC * (P @ Q)).sum(-2) + dcS * Q[..., -1, :]
    dPQ = dC * theta.unsqueeze(-2)
    dP = dPQ @ Q.transpose(-1, -2) + dm.unsqueeze(-1) * E.unsqueeze(-2)
    dQ = P.transpose(-1, -2) @ dPQ
    dQ[..., -1, :] += dcS * theta
    dE = (P.transpose(-1, -2) @ dm.unsqueeze(-1)).squeeze(-1)
    dE[..., -1] += de
    d_keep = _decay_matrix_grad(Pk, dP * mask) + _cumprod_grad(a, Pk, da)
    d_eta = _decay_matrix_grad(Q, dQ) + _cumprod_grad(E, Q, dE)
    return -d_keep, d_eta, d_theta


def _native_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, valid: Tensor):
    """The C++ coefficients when they can run: native.for_tensor, no autograd through the gates, and
    valid (N, 1, ..., 1, b) for gates (N, ..., b)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (alpha, eta, theta)):
        return None
    if valid.dim() != alpha.dim() or any(n != 1 for n in valid.shape[1:-1]) or valid.dtype != alpha.dtype:
        return None
    return native.for_tensor(alpha)


def _gate_rows(alpha: Tensor, eta: Tensor, theta: Tensor, valid: Tensor) -> list[Tensor]:
    """The gates as (rows, b) and valid as (N, b), contiguous: the C++ coefficients' layout."""
    b = alpha.shape[-1]
    return [t.reshape(-1, b).contiguous() for t in (alpha, eta, theta)] + [valid.reshape(-1, b).contiguous()]


def _decay_matrix_grad(D: Tensor, dD: Tensor) -> Tensor:
    """d x_r for D = _decay_matrix(x), D[t, u] = prod_{u < s <= t} x_s: the sum over u < r <= t of
    dD[t, u] D[r-1, u] D[t, r] = sum_u D[r-1, u] (D^T dD)[r, u] (D[r-1, u] is 0 for u >= r)."""
    below = F.pad(D[..., :-1, :], (0, 0, 1, 0))  # row r holds D[r-1, :]; row 0 is 0
    return (below * (D.transpose(-1, -2) @ dD)).sum(-1)


def _cumprod_grad(c: Tensor, D: Tensor, dc: Tensor) -> Tensor:
    """d x_r for c = cumprod(x), given D = _decay_matrix(x): c[r-1] sum_{t >= r} dc_t D[t, r]."""
    c_before = F.pad(c[..., :-1], (1, 0), value=1.0)
    return c_before * (D.transpose(-1, -2) @ dc.unsqueeze(-1)).squeeze(-1)


L2_EPS = 1e-12  # F.normalize's default


def _l2_normalize_backward(x: Tensor, dy: Tensor) -> Tensor:
    """The gradient at x of F.normalize(x, dim=-1, eps=L2_EPS), given dy: (dy - y (y . dy)) / |x|
    where |x| > eps, and dy / eps where the norm was clamped (a zero vector: padding)."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    y = x / n.clamp_min(L2_EPS)
    proj = torch.where(n > L2_EPS, (y * dy).sum(-1, keepdim=True), 0.0)
    return (dy - y * proj) / n.clamp_min(L2_EPS)


def _bmm_sub(base: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """base - x @ y for (B, H, ., .) tensors, as one fused GEMM."""
    out = torch.baddbmm(base.flatten(0, 1), x.flatten(0, 1), y.flatten(0, 1), alpha=-1)
    return out.view(*base.shape[:2], *out.shape[1:])


def _add_bmm(acc: Tensor | None, x: Tensor, y: Tensor) -> Tensor:
    """acc + x @ y for (B, H, ., .) tensors, accumulated in place into acc (a buffer of this
    function's own making); x @ y when acc is None."""
    if acc is None:
        return x @ y
    acc.flatten(0, 1).baddbmm_(x.flatten(0, 1), y.flatten(0, 1))
    return acc


def _scaled_pair(s1: Tensor, s2: Tensor, x: Tensor) -> Tensor:
    """[s1 x, s2 x] along the last dim, each product written into its half of one buffer (no
    concatenation pass; the functional form when compiling, where out= on views is not traced)."""
    if torch.compiler.is_compiling():
        return torch.cat([s1 * x, s2 * x], dim=-1)
    d = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], 2 * d)
    torch.mul(s1, x, out=out[..., :d])
    torch.mul(s2, x, out=out[..., d:])
    return out


class _Cache:
    """Intermediates of one chunk's forward pass, for its backward (a plain class, which
    torch.compile can trace, unlike SimpleNamespace)."""


def _chunk_forward(G: Weights, WS: Weights, q, k, v, a, m, C, cS, e, gamma, beta,
                   clip: float | None, read: bool, keep: bool = False, W0: Weights = (),
                   update: bool | None = None, cache: _Cache | None = None):
    """One chunk.

    G: gradient base (B, H, D_in, D_out) per layer; WS: [W; S] stacked on rows, (B, H, 2 D_in, D_out),
    at the chunk start. q, k, v: (B, H, b, D); coefficients as in `chunk_coefficients` for this chunk,
    gate layer j = l for per-layer gates, else 0. W0: the anchor (H, D_in, D_out) per layer when
    forgetting towards the initial weights (WS then holds the offset U = W - W0 and the read adds
    u W0), else (). Returns (y or None, WS at the chunk end or (), cache), the cache (intermediates
    for `_chunk_backward`) only when `keep`. update: compute the end state (default: not `keep`).
    cache: one this chunk's earlier call returned (with `keep` and without the read); its inner
    gradients and written keys (which depend on G, k, v and the coefficients only) are reused, not
    recomputed, and the read's intermediates are added to it.
    """
    L, Lg = len(G), a.shape[2]
    if update is None:
        update = not keep
    g_ln, b_ln = (None, None) if L == 1 else (gamma.unsqueeze(-2), beta.unsqueeze(-2))
    c = _inner_gradients(G, k, v, gamma, beta, clip, Lg) if cache is None else cache
    xs, dts = c.xs, c.dts

    y = None
    if read:  # y_t = M_{W_t}(q_t) = [a_t u_t, m_t u_t] @ [W; S] - (C * u X^T) delta, layer by layer
        u, us, ps, Ps, As, aus = q, [], [], [], [], []
        for i in range(L):
            j = i if Lg > 1 else 0
            P = u @ xs[i].transpose(-1, -2)
            A = P * C[:, :, j]
            au = _scaled_pair(a[:, :, j, :, None], m[:, :, j, :, None], u)
            p = au @ WS[i]
            p.flatten(0, 1).baddbmm_(A.flatten(0, 1), dts[i].flatten(0, 1), alpha=-1)  # a fresh buffer
            if W0:
                p = p + u @ W0[i]
            us.append(u), ps.append(p), Ps.append(P), As.append(A), aus.append(au)
            u = F.gelu(p) if i < L - 1 else p
        if L == 1:
            y = u
        else:
            nq, rq = layer_norm(u)
            y = q + g_ln * nq + b_ln
            c.nq, c.rq = nq, rq
        c.us, c.ps, c.Ps, c.As, c.aus = us, ps, Ps, As, aus

    if cache is None:  # the written keys, scaled by their weight in the end state: [cW x, cS x]
        c.xcs = [_scaled_pair(C[:, :, j, -1, :, None], cS[:, :, j, :, None], x)
                 for x, j in zip(xs, (range(L) if Lg > 1 else [0] * L))]
    WS_end = []
    for i in range(L if update else 0):
        j = i if Lg > 1 else 0
        # [W; S] <- [a W + m S; e S] - [cW x; cS x]^T delta, in place in one new buffer: the
        # state is the largest tensor here, so every pass over it counts
        W, S = WS[i].chunk(2, dim=2)
        a_end, m_end, e_j = (t[..., None, None] for t in (a[:, :, j, -1], m[:, :, j, -1], e[:, :, j]))
        if torch.compiler.is_compiling():  # functional: the compiler fuses it (no out= on views)
            out = _bmm_sub(torch.cat([W * a_end + S * m_end, S * e_j], dim=2), c.xcs[i].transpose(-1, -2),
                           dts[i])
        else:
            out = torch.empty_like(WS[i])
            W_new, S_new = out.chunk(2, dim=2)
            torch.mul(W, a_end, out=W_new).addcmul_(S, m_end)
            torch.mul(S, e_j, out=S_new)
            out.flatten(0, 1).baddbmm_(c.xcs[i].transpose(-1, -2).flatten(0, 1), dts[i].flatten(0, 1),
                                       alpha=-1)
        WS_end.append(out)
    return y, tuple(WS_end), c if keep else None


def _inner_gradients(G: Weights, k, v, gamma, beta, clip: float | None, Lg: int) -> _Cache:
    """The inner gradients of one chunk at its base G, as a cache for `_chunk_forward` and
    `_chunk_backward`: every layer's input x_l on k and output-gradient delta_l (dts: after the
    optional clamp), with the intermediates their backward needs."""
    L = len(G)
    c = _Cache()
    c.L, c.Lg = L, Lg
    # inner gradients at G: inputs x_l and output-gradients delta_l of every layer, on k
    xs, zs, h = [], [], k
    for i in range(L):
        xs.append(h)
        h = h @ G[i]
        zs.append(h)
        if i < L - 1:
            h = F.gelu(h)
    if L == 1:
        delta = h - v
    else:
        g_ln, b_ln = gamma.unsqueeze(-2), beta.unsqueeze(-2)
        n, r = layer_norm(h)
        err = k + g_ln * n + b_ln - v
        gn = g_ln * err
        J = gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True)
        delta = r * J  # LayerNorm backward of gn
        c.n, c.r, c.err, c.gn, c.J = n, r, err, gn, J
    deltas, ts, gps = [delta], [], []
    for i in range(L - 2, -1, -1):
        t = delta @ G[i + 1].transpose(-1, -2)
        gp = gelu_grad(zs[i])
        delta = t * gp
        ts.insert(0, t)
        gps.insert(0, gp)
        deltas.insert(0, delta)
    dts = deltas  # the deltas that are written (after the optional clamp)
    if clip is not None:  # clamp each token's inner-gradient norm: ||x^T delta|| = |x| |delta|
        norm2 = sum(x.pow(2).sum(-1) * d.pow(2).sum(-1) for x, d in zip(xs, deltas))
        scale = (clip * torch.rsqrt(norm2.clamp(min=clip * clip))).unsqueeze(-1)
        dts = [d * scale for d in deltas]
        c.norm2, c.scale = norm2, scale
    c.xs, c.zs, c.deltas, c.dts, c.ts, c.gps = xs, zs, deltas, dts, ts, gps
    return c


def _chunk_backward(G: Weights, WS: Weights, q, k, v, a, m, C, cS, e, gamma, beta,
                    clip: float | None, read: bool, dy, dWS_end, W0: Weights = (), want_dG: bool = True,
                    cache: _Cache | None = None):
    """Gradients of one chunk, by hand: recompute the chunk's intermediates (those of `cache`, the
    chunk's inner gradients from recomputing its end state, are reused), then walk back
    (state update -> read -> clamp -> delta chain -> LayerNorm backward -> memory MLP on k).
    Returns (dG, dWS, dq, dk, dv, da, dm, dC, dcS, de, dgamma, dbeta, dW0) (dW0: () without W0;
    dG: None when not `want_dG`, as first_order drops it: its GEMMs are then skipped)."""
    _, _, c = _chunk_forward(G, WS, q, k, v, a, m, C, cS, e, gamma, beta, clip, read, keep=True, W0=W0,
                             cache=cache)
    dW0 = [torch.zeros_like(w) for w in W0]
    L, Lg, xs, dts = c.L, c.Lg, c.xs, c.dts
    da, dm, dC, dcS, de = (torch.zeros_like(t) for t in (a, m, C, cS, e))
    dxs = [torch.zeros_like(x) for x in xs]
    ddt = [torch.zeros_like(d) for d in dts]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dgamma = dbeta = None
    if L > 1:
        g_ln = gamma.unsqueeze(-2)
        dgamma, dbeta = torch.zeros_like(gamma), torch.zeros_like(beta)
    rowsum = lambda x, y: (x * y).sum(-1)  # noqa: E731

    # state update: WS_end = [a W + m S; e S] - xc^T dt
    dWS = []
    for i in range(L):
        j = i if Lg > 1 else 0
        dWe, dSe = dWS_end[i].chunk(2, dim=2)
        a_end, m_end, e_j = (t[..., None, None] for t in (a[:, :, j, -1], m[:, :, j, -1], e[:, :, j]))
        if torch.compiler.is_compiling():
            d_state = torch.cat([dWe * a_end, dSe * e_j + dWe * m_end], dim=2)
        else:
            d_state = torch.empty_like(WS[i])
            dW_new, dS_new = d_state.chunk(2, dim=2)
            torch.mul(dWe, a_end, out=dW_new)
            torch.mul(dSe, e_j, out=dS_new).addcmul_(dWe, m_end)
        dWS.append(d_state)
        dots = _part_dots(dWS_end[i], WS[i])
        da[:, :, j, -1] += dots[..., 0, 0]
        dm[:, :, j, -1] += dots[..., 0, 1]
        de[:, :, j] += dots[..., 1, 1]
        dxc = -(dts[i] @ dWS_end[i].transpose(-1, -2))
        dxc_w, dxc_s = dxc.chunk(2, dim=-1)
        dxs[i] += C[:, :, j, -1, :, None] * dxc_w + cS[:, :, j, :, None] * dxc_s
        dC[:, :, j, -1] += rowsum(dxc_w, xs[i])
        dcS[:, :, j] += rowsum(dxc_s, xs[i])
        ddt[i] = _bmm_sub(ddt[i], c.xcs[i], dWS_end[i])

    # read: p_l = [a u, m u] @ [W; S] - (P * C) dt,  P = u x^T,  u_{l+1} = gelu(p_l)
    if read:
        if L == 1:
            dp = dy
        else:
            dgamma += (dy * c.nq).sum((0, 2))
            dbeta += dy.sum((0, 2))
            dq += dy
            dp = _layer_norm_backward(c.nq, c.rq, dy * g_ln)
        for i in range(L - 1, -1, -1):
            j = i if Lg > 1 else 0
            u = c.us[i]
            dau = dp @ WS[i].transpose(-1, -2)
            dWS[i].flatten(0, 1).baddbmm_(c.aus[i].transpose(-1, -2).flatten(0, 1), dp.flatten(0, 1))
            dau_a, dau_m = dau.chunk(2, dim=-1)
            du = a[:, :, j, :, None] * dau_a + m[:, :, j, :, None] * dau_m
            da[:, :, j] += rowsum(dau_a, u)
            dm[:, :, j] += rowsum(dau_m, u)
            dA = -(dp @ dts[i].transpose(-1, -2))
            ddt[i] = _bmm_sub(ddt[i], c.As[i].transpose(-1, -2), dp)
            dC[:, :, j] += dA * c.Ps[i]
            dP = dA * C[:, :, j]
            du = du + dP @ xs[i]
            if W0:  # p += u W0
                du = du + dp @ W0[i].transpose(-1, -2)
                dW0[i] = dW0[i] + (u.transpose(-1, -2) @ dp).sum(0)
            dxs[i] += dP.transpose(-1, -2) @ u
            if i > 0:
                dp = gelu_backward(du, c.ps[i - 1])
            else:
                dq += du

    # clamp: dt = s * delta, s = clip / sqrt(max(N2, clip^2)), N2 = sum_l |x_l|^2 |delta_l|^2
    if clip is not None:
        ds = sum(rowsum(g, d) for g, d in zip(ddt, c.deltas))
        ddelta = [g * c.scale for g in ddt]
        dN2 = torch.where(c.norm2 > clip * clip, -ds * c.scale.squeeze(-1) / (2 * c.norm2), 0.0)
        for i in range(L):
            dxs[i] += (2 * dN2 * c.deltas[i].pow(2).sum(-1)).unsqueeze(-1) * xs[i]
            ddelta[i] = ddelta[i] + (2 * dN2 * xs[i].pow(2).sum(-1)).unsqueeze(-1) * c.deltas[i]
    else:
        ddelta = ddt

    # delta chain: delta_l = (delta_{l+1} G_{l+1}^T) * gelu'(z_l)
    dG = [None] * L if want_dG else None  # every layer gets a term from the MLP on k below
    dzs = [None] * L
    for i in range(L - 1):
        dt_i = ddelta[i] * c.gps[i]
        dzs[i] = ddelta[i] * c.ts[i] * _gelu_second(c.zs[i])
        ddelta[i + 1] = ddelta[i + 1] + dt_i @ G[i + 1]
        if want_dG:
            dG[i + 1] = _add_bmm(dG[i + 1], dt_i.transpose(-1, -2), c.deltas[i + 1])
    dd = ddelta[L - 1]
    if L == 1:  # delta = z - v
        dzs[0] = dd
        dv -= dd
    else:  # delta = r * J(gn, n),  gn = gamma * err,  err = k + gamma n + beta - v,  (n, r) = LN(z)
        n, r, J, gn, err = c.n, c.r, c.J, c.gn, c.err
        dr = rowsum(dd, J).unsqueeze(-1)
        dJ = r * dd
        dJn = (dJ * n).mean(-1, keepdim=True)
        dgn = dJ - dJ.mean(-1, keepdim=True) - n * dJn
        dn = -dJ * (gn * n).mean(-1, keepdim=True) - gn * dJn
        derr = g_ln * dgn
        dgamma += (dgn * err + derr * n).sum((0, 2))
        dbeta += derr.sum((0, 2))
        dk += derr
        dv -= derr
        dn = dn + g_ln * derr
        dzs[L - 1] = _layer_norm_backward(n, r, dn) - (r * r * dr / n.shape[-1]) * n

    # memory MLP on k: z_l = x_l G_l, x_{l+1} = gelu(z_l)
    for i in range(L - 1, -1, -1):
        dz = dzs[i] if i == L - 1 else dzs[i] + dxs[i + 1] * c.gps[i]
        if want_dG:
            dG[i] = _add_bmm(dG[i], xs[i].transpose(-1, -2), dz)
        dxs[i] += dz @ G[i].transpose(-1, -2)
    dk += dxs[0]
    return dG, dWS, dq, dk, dv, da, dm, dC, dcS, de, dgamma, dbeta, tuple(dW0)


def memory_read(x: Tensor, weights: Weights, ln: tuple[Tensor, Tensor] | None) -> Tensor:
    """`memory_apply` (M_W(x) per head) for reads whose gradient is taken once: for L >= 2 it keeps
    only x, the weights and (gamma, beta) for the backward, where autograd would also keep every
    layer's activations (2 x expansion x D per token and head), and recomputes them there. Not
    twice differentiable: the token-loop reference, which differentiates its inner gradient, uses
    `memory_apply` itself."""
    if len(weights) == 1:
        return x @ weights[0]
    return _MemoryRead.apply(x, *ln, *weights)


class _MemoryRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, *weights):
        ctx.save_for_backward(x, gamma, beta, *weights)
        return memory_apply(x, weights, (gamma, beta))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, gamma, beta, *W = ctx.saved_tensors
        L = len(W)
        hs, zs, h = [], [], x  # layer inputs and pre-activations
        for i, w in enumerate(W):
            hs.append(h)
            z = h @ w
            zs.append(z)
            h = F.gelu(z) if i < L - 1 else z
        n, r = layer_norm(h)  # y = x + gamma LN(h) + beta
        batch_dims = tuple(range(dy.dim() - 3)) + (dy.dim() - 2,)  # all but heads and features
        dgamma, dbeta = (dy * n).sum(batch_dims), dy.sum(batch_dims)
        dz = _layer_norm_backward(n, r, dy * gamma.unsqueeze(-2))
        dx, dW = dy.clone(), [None] * L
        for i in range(L - 1, -1, -1):
            dW[i] = (hs[i].transpose(-1, -2) @ dz).sum_to_size(W[i].shape)
            dh = dz @ W[i].transpose(-1, -2)
            if i > 0:
                dz = gelu_backward(dh, zs[i - 1])
            else:
                dx += dh
        return dx, dgamma, dbeta, *dW


def _part_dots(x: Tensor, y: Tensor) -> Tensor:
    """<x_r, y_c> for the W (0) and S (1) parts of stacked [W; S] tensors (B, H, 2 D_in, D_out):
    (B, H, 2, 2), as one GEMM over the whole state (10x faster than three multiply-and-sum passes)."""
    B, H = x.shape[:2]
    return torch.bmm(x.reshape(B * H, 2, -1), y.reshape(B * H, 2, -1).transpose(1, 2)).view(B, H, 2, 2)


def _layer_norm_backward(n: Tensor, r: Tensor, dn: Tensor) -> Tensor:
    """Gradient at z of n = LN(z) (no affine), given dn; r = 1/std."""
    return r * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))


def _gelu_second(z: Tensor) -> Tensor:
    """d^2/dz^2 of the exact GELU: phi(z) (2 - z^2), with in-place steps (fewer passes and buffers)."""
    z2 = z.square()
    pdf = torch.mul(z2, -0.5).exp_()
    return pdf.mul_(z2.neg_().add_(2.0)).mul_(1.0 / math.sqrt(2.0 * math.pi))


# The chunk step the loops call: the eager functions, or their torch.compile'd versions.
_STEP = {"forward": _chunk_forward, "backward": _chunk_backward}


def compile_chunks(enabled: bool = True, **options) -> None:
    """Run the memory's chunk step (forward, and the hand-written backward) through torch.compile.

    Eager PyTorch launches every small op of a chunk separately (about 250 per chunk forward and
    backward at L = 2), so on a GPU the chunk loop is bound by launch overhead; the compiler fuses
    the elementwise work. Results equal the eager step's to rounding. Each new shape (batch, heads,
    chunk size, depth) compiles once, which takes a minute or so. `options` go to torch.compile
    (default fullgraph=True). `compile_chunks(False)` restores the eager step. Process-wide."""
    if not enabled:
        _STEP.update(forward=_chunk_forward, backward=_chunk_backward)
        return
    options = {"fullgraph": True, **options}
    _STEP.update(forward=torch.compile(_chunk_forward, **options),
                 backward=torch.compile(_chunk_backward, **options))


def chunks_compiled() -> bool:
    return _STEP["forward"] is not _chunk_forward


# Chunk-start states kept for the backward pass: one every CHECKPOINT_EVERY chunks. The backward
# recomputes the states in between (write only, no read), so memory for states falls by this
# factor at the cost of re-running the cheaper half of the forward once.
CHECKPOINT_EVERY = 4


class _MemoryChunks(torch.autograd.Function):
    """All chunks in one Function. The forward keeps a chunk-start state every CHECKPOINT_EVERY
    chunks (in one preallocated buffer per layer); the backward walks the chunks in reverse,
    recomputing the states of a stretch from its checkpoint and each chunk's intermediates from
    its state, then applying the hand-written chunk backward. Both loops go by stretches of
    CHECKPOINT_EVERY chunks, each stretch pure tensor code (no autograd, no host synchronisation),
    so on CUDA a stretch can run as one captured graph (`graph_chunks`)."""

    @staticmethod
    def forward(ctx, L, clip, read, anchored, norm_qk, so_scale, q, k, v, alpha, eta, theta, valid, gamma,
                beta, *states):
        # detached: the chunk step sees the same requires_grad on every call (a compiled step
        # would otherwise recompile between the first chunk and the rest)
        q, k, v, alpha, eta, theta, valid, *states = (t.detach() for t in (q, k, v, alpha, eta, theta, valid,
                                                                           *states))
        gamma, beta = (None, None) if gamma is None else (gamma.detach(), beta.detach())
        states = tuple(states)
        W0 = states[2 * L:] if anchored else ()  # forgetting towards W0: WS holds U = W - W0
        G = tuple(_w_view(g) if not anchored else g.contiguous() for g in states[:L])
        WS = states[L:2 * L]
        G0 = G
        N, K = q.shape[0], CHECKPOINT_EVERY
        keep = any(ctx.needs_input_grad)
        y = torch.empty_like(q) if read else q.new_empty(0)
        saved = [ws.new_empty(math.ceil(N / K), *ws.shape) for ws in WS] if keep else None
        for n0 in range(0, N, K):
            n1 = min(n0 + K, N)
            if keep:
                for buf, ws in zip(saved, WS):
                    buf[n0 // K].copy_(ws)
            chunk = tuple(t[n0:n1] for t in (q, k, v, alpha, eta, theta, valid))
            args = (G, WS, *chunk, gamma, beta, W0)
            y_n, WS, G_last = _run_stretch(_forward_stretch, (L, clip, read, norm_qk), args,
                                           y[n0:n1] if read else None)
            if y_n is not None:  # a graph's output: copied into place
                y[n0:n1] = y_n
            G = _base(WS, W0)
        if N == 1:  # the open chunk's base is an input: hand out a copy, not the input itself
            G_last = tuple(g.clone() for g in G_last)
        ctx.L, ctx.clip, ctx.read, ctx.checkpoints, ctx.W0, ctx.norm_qk = L, clip, read, saved, W0, norm_qk
        ctx.so_scale = so_scale
        ctx.G0 = G0
        # the gates, not the b x b coefficients: those are recomputed per stretch in the backward
        ctx.save_for_backward(q, k, v, alpha, eta, theta, valid, gamma, beta)
        if not read:
            ctx.mark_non_differentiable(y)
        return (y, *WS, *G_last)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, dy, *d_out):
        L, clip, read, K = ctx.L, ctx.clip, ctx.read, CHECKPOINT_EVERY
        q, k, v, alpha, eta, theta, valid, gamma, beta = (None if t is None else t.detach()
                                                          for t in ctx.saved_tensors)
        dy = dy.detach().contiguous() if dy is not None else None  # one layout whatever N (compiled step)
        d_out = tuple(None if d is None else d.detach() for d in d_out)
        N = q.shape[0]
        zero_if_none = lambda ds, ref: tuple(torch.zeros_like(r) if d is None else d for d, r in zip(ds, ref))  # noqa: E731
        dWS = zero_if_none(d_out[:L], [buf[0] for buf in ctx.checkpoints])
        dG_last = None if all(d is None for d in d_out[L:]) else zero_if_none(d_out[L:], ctx.G0)
        d_inputs = [torch.empty_like(t) for t in (q, k, v, alpha, eta, theta)]
        d_gamma = d_beta = None
        W0 = tuple(w.detach() for w in ctx.W0)
        dW0 = [torch.zeros_like(w) for w in W0]
        for n0 in range(K * ((N - 1) // K), -1, -K):
            n1 = min(n0 + K, N)
            WS = tuple(buf[n0 // K] for buf in ctx.checkpoints)
            G = ctx.G0 if n0 == 0 else _base(WS, W0)
            last = dG_last if n1 == N else None
            chunk = tuple(t[n0:n1] for t in (q, k, v, alpha, eta, theta, valid))
            args = (G, WS, *chunk, gamma, beta, W0, dy[n0:n1] if read else None, dWS, last)
            d_chunk = [d[n0:n1] for d in d_inputs]
            static = (L, clip, read, ctx.norm_qk, n0 == 0, ctx.so_scale)
            d_n, dg, db, dWS, dW0_n = _run_stretch(_backward_stretch, static, args, d_chunk)
            if d_n is not None:  # a graph's outputs: copied into place
                for acc, g in zip(d_chunk, d_n):
                    acc.copy_(g)
            if dg is not None:
                d_gamma = dg if d_gamma is None else d_gamma + dg
                d_beta = db if d_beta is None else d_beta + db
            dW0 = [acc + g for acc, g in zip(dW0, dW0_n)]
        dG0, dWS = dWS[:L], dWS[L:]  # the first stretch hands out d(first base) and d(start [W; S])
        d_inputs = [d if want else None for d, want in zip(d_inputs, ctx.needs_input_grad[6:12])]
        return (None, None, None, None, None, None, *d_inputs, None, d_gamma, d_beta, *dG0, *dWS, *dW0)


def _forward_stretch(L, clip, read, norm_qk, G, WS, q, k, v, alpha, eta, theta, valid, gamma, beta, W0,
                     y=None):
    """Chunks n0 .. n1-1 from base G and state WS at n0 (chunk tensors and gates sliced to the
    stretch; q and k L2-normalised here when norm_qk). Writes y into `y` when given, else returns it;
    returns (y or None, WS at n1, the last chunk's base)."""
    out = y is None and read
    if out:
        y = torch.empty_like(q)
    a, m, C, cS, e = chunk_coefficients(alpha, eta, theta, valid)
    ext = _native_loops(q, clip, W0)
    if ext is not None:  # the same loop in C++, one memory per thread (native.py); q, k normalised there
        states = ext.forward_stretch(list(G), list(WS), *_dense(q, k, v, a, m, C, cS, e), gamma, beta,
                                     y if read else None, norm_qk)
        return (y if out else None), tuple(states[:L]), tuple(states[L:])
    if norm_qk:
        q, k = F.normalize(q, dim=-1, eps=L2_EPS), F.normalize(k, dim=-1, eps=L2_EPS)
    G_last = G
    for n in range(q.shape[0]):
        G_last = G
        y_n, WS, _ = _STEP["forward"](G, WS, q[n], k[n], v[n], a[n], m[n], C[n], cS[n], e[n],
                                      gamma, beta, clip, read, W0=W0)
        if read:
            y[n] = y_n
        G = _base(WS, W0)
    return (y if out else None), tuple(WS), tuple(G_last)


def _backward_stretch(L, clip, read, norm_qk, first, so_scale, G, WS, q, k, v, alpha, eta, theta, valid,
                      gamma, beta, W0, dy, dWS, dG_last, d_chunk=None):
    """The backward of chunks n0 .. n1-1 (a checkpoint stretch): recompute their coefficients from
    the gates and their start states from base G and state WS at n0, then walk back from dWS (the
    gradient of the state at n1; dG_last: the gradient of the last chunk's base when it is the
    stream's open chunk), ending with the coefficients' gradients taken back to the gates. Writes
    the gradients of q, k, v, alpha, eta, theta into `d_chunk` when given, else returns them.
    Returns (those gradients or None, d gamma, d beta, d of the state at n0 -- preceded by d of the
    base G when `first`, the stream's first stretch -- and d W0). so_scale: the share of the inner
    gradients' own gradient into their base that is kept (0: first_order, dropped; the gradient of
    the open chunk's base as an output, dG_last, always flows)."""
    n1 = q.shape[0]
    out = d_chunk is None
    if out:
        d_chunk = [torch.empty_like(t) for t in (q, k, v, alpha, eta, theta)]
    coef = chunk_coefficients(alpha, eta, theta, valid)
    a, m, C, cS, e = coef
    d_coef = [torch.empty_like(c) for c in coef]
    ext = _native_loops(q, clip, W0)
    if ext is not None:  # the same loops in C++, one memory per thread (native.py); q, k normalised there
        dg, db, *dWS = ext.backward_stretch(list(G), list(WS), *_dense(q, k, v, a, m, C, cS, e), gamma, beta,
                                            dy.contiguous() if read else None, [d.contiguous() for d in dWS],
                                            [] if dG_last is None else list(dG_last), first, so_scale,
                                            d_chunk[:3], d_coef, norm_qk)
        d_gamma, d_beta = (None, None) if dg is None else (dg.sum(0), db.sum(0))  # (B, H, D) -> (H, D)
        return _coefficient_and_input_grads(alpha, eta, theta, valid, d_coef, d_chunk, False, q, k,
                                            out, d_gamma, d_beta, dWS, ())
    q_in, k_in = q, k
    if norm_qk:
        q, k = F.normalize(q, dim=-1, eps=L2_EPS), F.normalize(k, dim=-1, eps=L2_EPS)
    base = lambda n, WS: G if n == 0 else _base(WS, W0)  # noqa: E731
    # the start states of the stretch's chunks, and their inner gradients (kept for the walk back,
    # which would otherwise compute them a second time; the last chunk's are computed there)
    starts, caches = [WS], []
    for n in range(n1 - 1):
        _, WS, c = _STEP["forward"](base(n, WS), WS, q[n], k[n], v[n], a[n], m[n], C[n], cS[n], e[n],
                                    gamma, beta, clip, read=False, keep=True, W0=W0, update=True)
        starts.append(WS)
        caches.append(c)
    caches.append(None)
    d_gamma = d_beta = None
    dW0 = [torch.zeros_like(w) for w in W0]
    for n in range(n1 - 1, -1, -1):
        WS = starts[n]
        dG, dWS, *d_n, dg, db, dW0_n = _STEP["backward"](
            base(n, WS), WS, q[n], k[n], v[n], a[n], m[n], C[n], cS[n], e[n], gamma, beta, clip,
            read, dy[n] if read else None, dWS, W0=W0, want_dG=so_scale != 0.0, cache=caches[n])
        caches[n] = None  # freed as the walk goes back
        for acc, g in zip(d_chunk[:3] + d_coef, d_n):
            acc[n] = g
        if dg is not None:
            d_gamma = dg if d_gamma is None else d_gamma + dg
            d_beta = db if d_beta is None else d_beta + db
        # dG is None when so_scale is 0 (first_order: the inner gradients treated as constant in the
        # weights they were taken at); otherwise a share so_scale of their second derivatives is kept
        if dG is not None and so_scale != 1.0:
            dG = [g * so_scale for g in dG]
        if n == n1 - 1 and dG_last is not None:  # gradient into the open chunk's base
            dG = list(dG_last) if dG is None else [g + h for g, h in zip(dG, dG_last)]
        dW0 = [acc + g for acc, g in zip(dW0, dW0_n)]
        if n > 0 or not first:  # this chunk's base is the previous chunk's end W (= W0 + U when anchored)
            if dG is not None:
                dWS = [_add_w_part(d, g) for d, g in zip(dWS, dG)]
                dW0 = [acc + g.sum(0) for acc, g in zip(dW0, dG)] if W0 else dW0
        else:
            dG = [torch.zeros_like(g) for g in base(n, WS)] if dG is None else dG
            dWS = [*dG, *dWS]
    return _coefficient_and_input_grads(alpha, eta, theta, valid, d_coef, d_chunk, norm_qk, q_in, k_in, out,
                                        d_gamma, d_beta, dWS, dW0)


def _coefficient_and_input_grads(alpha, eta, theta, valid, d_coef, d_chunk, norm_qk, q_in, k_in, out, d_gamma,
                                 d_beta, dWS, dW0):
    """The end of a backward stretch: the coefficients' gradients taken back to the gates, and those
    of the normalised q, k to q, k as given; then `_backward_stretch`'s results."""
    for acc, g in zip(d_chunk[3:], chunk_coefficients_backward(alpha, eta, theta, valid, *d_coef)):
        acc.copy_(g)
    if norm_qk:  # d of the normalised q, k -> d of q, k as given
        for acc, x in zip(d_chunk[:2], (q_in, k_in)):
            acc.copy_(_l2_normalize_backward(x, acc))
    return (d_chunk if out else None), d_gamma, d_beta, tuple(dWS), tuple(dW0)


def _dense(*ts: Tensor) -> list[Tensor]:
    """The tensors as the C++ loops read them: contiguous (e = E[..., -1] is a strided view)."""
    return [t.contiguous() for t in ts]


def _native_loops(q: Tensor, clip, W0):
    """The C++ chunk loops (native.py) when they cover this stretch and the step is the eager one."""
    if _STEP["forward"] is not _chunk_forward:
        return None
    return native.for_stretch(q, clip, W0)


# ---------------------------------------------------------------------------- CUDA graphs
# On a GPU the eager chunk loop is bound by kernel launches: a few hundred small kernels per chunk,
# each launched from Python. `graph_chunks()` captures one checkpoint stretch (CHECKPOINT_EVERY chunks,
# forward, and backward) once per configuration as a CUDA graph and replays it for every stretch of
# every layer and length. Inputs are copied into the graph's static buffers and its outputs copied
# out, so capturing costs a few chunks' time whatever the sequence length.

_GRAPHS: dict = {"enabled": False, "cache": {}, "pool": None, "capture": None}


def graph_chunks(enabled: bool = True) -> None:
    """Run the memory's chunk loops (forward and backward) as replays of captured CUDA graphs, one
    per stretch of CHECKPOINT_EVERY chunks, on CUDA tensors (a CPU run is unchanged). Each new
    configuration (shapes, dtypes, depth, options, compiled or eager step) is warmed up and captured
    once on first use; later stretches copy their inputs in, replay, and copy the outputs out.
    Combines with `compile_chunks()` (the compiled step is then captured). `graph_chunks(False)`
    turns it off and frees the graphs. Process-wide."""
    _GRAPHS["enabled"] = bool(enabled)
    if not enabled:
        _GRAPHS["cache"].clear()
        _GRAPHS["pool"] = None  # freed with its last graph: a later capture starts a new one


def chunks_graphed() -> bool:
    return _GRAPHS["enabled"]


def _run_stretch(fn, static, args, out=None):
    """fn(*static, *args, out): eagerly (the results written into `out`, and None in its place), or,
    when `graph_chunks` is on and the inputs are on CUDA, as a replay of fn's graph for this
    configuration (the outputs handed back as copies; `out` unused)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if not _GRAPHS["enabled"] or not (args[2].is_cuda or _GRAPHS["capture"] is not None):
        return fn(*static, *args, out)
    leaves, spec = tree_flatten(args)
    key = (fn.__name__, static, spec, _STEP["forward"] is _chunk_forward,
           torch.is_autocast_enabled(args[2].device.type),
           tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in leaves))
    entry = _GRAPHS["cache"].get(key)
    if entry is None:
        entry = _capture(lambda *ts: fn(*static, *tree_unflatten(list(ts), spec)), leaves)
        _GRAPHS["cache"][key] = entry
    graph, inputs, outputs, out_spec = entry
    for dst, src in zip(inputs, leaves):
        if dst is not None:
            dst.copy_(src)
    graph.replay()
    return tree_unflatten([None if t is None else t.clone() for t in outputs], out_spec)


def _static_like(t: Tensor | None) -> Tensor | None:
    """A buffer for t: its strides where they are dense (an expanded or sliced input gets a
    contiguous buffer; the graph is captured on the buffer, so either layout is fine)."""
    return None if t is None else torch.empty_like(t, memory_format=torch.preserve_format).copy_(t)


def _capture(fn, leaves):
    """(graph, static inputs, static outputs, output structure) for fn(*leaves)."""
    from torch.utils._pytree import tree_flatten

    inputs = [_static_like(t) for t in leaves]
    if _GRAPHS["capture"] is not None:  # tests: a stand-in for the CUDA graph API
        graph, out = _GRAPHS["capture"](fn, inputs)
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuBLAS handles, compilation) outside the capture
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if _GRAPHS["pool"] is None:  # one memory pool: every graph's outputs are copied out at once
            _GRAPHS["pool"] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_GRAPHS["pool"]):
            out = fn(*inputs)
    outputs, out_spec = tree_flatten(out)
    return graph, inputs, outputs, out_spec


def _w_part(WS: Weights) -> Weights:
    """W from stacked [W; S] (views)."""
    return tuple(ws[:, :, : ws.shape[2] // 2] for ws in WS)


def _base(WS: Weights, W0: Weights) -> Weights:
    """The gradient base of the next chunk: W from [W; S], or W0 + U when forgetting towards W0."""
    W = _w_part(WS)
    return tuple(w0 + u for w0, u in zip(W0, W)) if W0 else W


def _w_view(g: Tensor) -> Tensor:
    """g as the W part of a stacked [W; S] buffer: the layout (strides) of every later chunk's base,
    so a compiled chunk step sees one layout."""
    return torch.cat([g, torch.empty_like(g)], dim=2)[:, :, : g.shape[2]]


def _add_w_part(dWS: Tensor, dW: Tensor) -> Tensor:
    """dWS (a fresh buffer of the backward pass) += [dW; 0], in place."""
    dWS[:, :, : dW.shape[2]] += dW
    return dWS
