"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024; SPEC.md §4 "Baselines").

Per batch element and head, with the state S of shape (Dv, Dk) (column vectors):

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,        o_t = S_t q_t

- `gated_delta_recurrent`: the reference token loop.
- `gated_delta_chunked`:   the exact chunk-wise form with the same signature and results.

Chunk-wise form. Write S_t = alpha_t S_{t-1} + u_t k_t^T with the "pseudo value"
u_t = beta_t (v_t - alpha_t S_{t-1} k_t). Inside a chunk that starts from S_0, with
P[t, s] = prod_{s < r <= t} alpha_r and g_t = prod_{r <= t} alpha_r (products inside the chunk),

    S_t = g_t S_0 + sum_{s <= t} P[t, s] u_s k_s^T
    u_t + beta_t sum_{s < t} P[t, s] (k_t . k_s) u_s = beta_t v_t - beta_t g_t S_0 k_t

i.e. (I + A) U = diag(beta) V - diag(beta g) K S_0^T with A strictly lower triangular (the UT /
WY transform): one unit-triangular solve per chunk gives U = U~ - W S_0^T with U~, W independent
of the state, so all chunks are solved at once and only two small matmuls per chunk remain in the
sequential loop. Then O = diag(g) Q S_0^T + (Q K^T * P) U and S_end = g_b S_0 + U^T (P[b, :] * K).

Decays are cumulative products (no logarithms), so alpha may be exactly 0 or 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.memory.functional import no_autocast

__all__ = ["gated_delta_chunked", "gated_delta_recurrent"]


# ----------------------------------------------------------------------------- input checks

def _require(cond: bool, name: str, expected: str, actual: object) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {actual}")


def _check_float(name: str, t: object) -> None:
    _require(isinstance(t, Tensor), name, "a torch.Tensor", type(t).__name__)
    _require(t.is_floating_point(), name, "a floating-point tensor", t.dtype)


_NO_CHUNKS = object()  # gated_delta_recurrent has no chunk_size


def _check(q, k, v, alpha, beta, state, chunk_size=_NO_CHUNKS) -> torch.dtype:
    """Validate the arguments; return the compute dtype (float64 if any input is, else float32)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        _require(t.dim() == 4, name, f"a 4-D tensor (B, H, T, {'Dv' if name == 'v' else 'Dk'})",
                 f"shape {tuple(t.shape)}")
    _require(k.shape == q.shape, "k", f"the shape of q {tuple(q.shape)}", f"shape {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    _require(v.shape[:3] == q.shape[:3], "v", f"shape ({B}, {H}, {T}, Dv) (B, H, T of q)",
             f"shape {tuple(v.shape)}")
    _require(T >= 1, "q", "at least one token (T >= 1)", f"T = {T}")
    Dv = v.shape[3]
    for name, g in (("alpha", alpha), ("beta", beta)):
        _check_float(name, g)
        _require(tuple(g.shape) == (B, H, T), name, f"shape ({B}, {H}, {T})", f"shape {tuple(g.shape)}")
    if chunk_size is not _NO_CHUNKS:
        _require(isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1,
                 "chunk_size", "a positive int", repr(chunk_size))
    tensors = [q, k, v, alpha, beta]
    if state is not None:
        _check_float("state", state)
        _require(tuple(state.shape) == (B, H, Dv, Dk), "state",
                 f"shape ({B}, {H}, {Dv}, {Dk}) (B, H, Dv, Dk)", f"shape {tuple(state.shape)}")
        tensors.append(state)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _start(q: Tensor, v: Tensor, state: Tensor | None, dtype: torch.dtype) -> Tensor:
    if state is None:
        B, H, _, Dk = q.shape
        return q.new_zeros(B, H, v.shape[-1], Dk, dtype=dtype)
    return state.to(dtype)


# ----------------------------------------------------------------------------- reference loop

def gated_delta_recurrent(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, *,
                          state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token.

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); alpha (decay), beta (write strength): (B, H, T), in [0, 1]
    (not enforced); state: S before the first token, (B, H, Dv, Dk), None = zeros.
    Returns o: (B, H, T, Dv) and the final S: (B, H, Dv, Dk), in float64 if any input is float64,
    else float32 (also under autocast).
    """
    dtype = _check(q, k, v, alpha, beta, state)
    with no_autocast(q.device.type):
        q, k, v, alpha, beta = (t.to(dtype) for t in (q, k, v, alpha, beta))
        S = _start(q, v, state, dtype)
        outs = []
        for t in range(q.shape[2]):
            k_t, a_t = k[:, :, t], alpha[:, :, t, None]
            # S_t = a S (I - b k k^T) + b v k^T = a S + [b (v - a S k)] k^T
            Sk = (S @ k_t.unsqueeze(-1)).squeeze(-1)
            u = beta[:, :, t, None] * (v[:, :, t] - a_t * Sk)
            S = a_t.unsqueeze(-1) * S + u.unsqueeze(-1) * k_t.unsqueeze(-2)
            outs.append((S @ q[:, :, t].unsqueeze(-1)).squeeze(-1))
        return torch.stack(outs, dim=2), S


# ----------------------------------------------------------------------------- chunk-wise form

def _decay_matrix(a: Tensor) -> Tensor:
    """P[..., t, s] = prod_{s < r <= t} a_r for t >= s (1 on the diagonal), 0 above it. a: (..., b).

    A cumulative product down masked columns: no logarithms or divisions, so exact zeros are fine."""
    b = a.shape[-1]
    below = torch.ones(b, b, dtype=torch.bool, device=a.device).tril(-1)
    M = torch.where(below, a.unsqueeze(-1), torch.ones((), dtype=a.dtype, device=a.device))
    return torch.cumprod(M, dim=-2).tril()


def gated_delta_chunked(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, *,
                        chunk_size: int = 64, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same arguments and results as `gated_delta_recurrent`, computed chunk by chunk (exact).

    T need not be a multiple of chunk_size: the last chunk is padded with tokens that neither decay
    (alpha = 1) nor write (beta = 0), whose outputs are dropped. Chunks are aligned to the start of
    this call; the rule has no chunk-dependent approximation, so a stream can be cut anywhere.
    """
    dtype = _check(q, k, v, alpha, beta, state, chunk_size)
    with no_autocast(q.device.type):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        b = chunk_size
        N = math.ceil(T / b)
        pad = N * b - T

        def tokens(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, N, b, D)
            return F.pad(x.to(dtype), (0, 0, 0, pad)).view(B, H, N, b, x.shape[-1])

        q_c, k_c, v_c = tokens(q), tokens(k), tokens(v)
        a_c = F.pad(alpha.to(dtype), (0, pad), value=1.0).view(B, H, N, b)
        b_c = F.pad(beta.to(dtype), (0, pad), value=0.0).view(B, H, N, b)

        P = _decay_matrix(a_c)  # (B, H, N, b, b), lower triangular, unit diagonal
        g = torch.cumprod(a_c, dim=-1)  # (B, H, N, b): decay from the chunk start
        kb = k_c * b_c.unsqueeze(-1)
        A = ((kb @ k_c.transpose(-1, -2)) * P).tril(-1)
        eye = torch.eye(b, dtype=dtype, device=q.device)
        # one batched unit-lower-triangular solve for every chunk and head: [U~ | W]
        rhs = torch.cat([v_c * b_c.unsqueeze(-1), kb * g.unsqueeze(-1)], dim=-1)
        X = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        # chunk-major, contiguous per chunk for the sequential loop
        X = X.permute(2, 0, 1, 3, 4).contiguous()
        U_tilde, W = X[..., :Dv], X[..., Dv:]  # (N, B, H, b, Dv), (N, B, H, b, Dk)
        # keys decayed to the chunk end: P[b, s] k_s
        k_end = (k_c * P[..., -1, :].unsqueeze(-1)).permute(2, 0, 1, 3, 4).contiguous()
        g_end = g[..., -1].permute(2, 0, 1)[..., None, None]  # (N, B, H, 1, 1)

        S = _start(q, v, state, dtype)
        starts, Us = [], []
        # unbind, not indexing: the backward of x[n] writes into a zero tensor of x's full size for
        # every chunk, which makes the loop quadratic in T
        for U_n, W_n, k_n, g_n in zip(U_tilde.unbind(0), W.unbind(0), k_end.unbind(0), g_end.unbind(0)):
            starts.append(S)
            U = U_n - W_n @ S.transpose(-1, -2)  # (B, H, b, Dv): the pseudo values
            S = g_n * S + U.transpose(-1, -2) @ k_n
            Us.append(U)
        S0 = torch.stack(starts, dim=2)  # (B, H, N, Dv, Dk)
        U = torch.stack(Us, dim=2)  # (B, H, N, b, Dv)

        attn = (q_c @ k_c.transpose(-1, -2)) * P  # causal (P is 0 above the diagonal)
        o = (q_c * g.unsqueeze(-1)) @ S0.transpose(-1, -2) + attn @ U
        return o.reshape(B, H, N * b, Dv)[:, :, :T], S
