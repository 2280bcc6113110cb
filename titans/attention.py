"""Attention for Titans and its baselines: RoPE, causal / sliding-window attention with persistent
key-value slots, and a streaming cache (SPEC.md §3-4).

Persistent memory (SPEC §3) is N_p learned tokens prepended to every attention input. Projected
with the layer's fixed key/value maps they are just N_p learned key/value pairs, so that is how they
are stored: `persistent_k`, `persistent_v` of shape (H, N_p, D), visible to every query, without
RoPE (they have no position; they also act as attention sinks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .memory.conv import check_sequence

QUERY_BLOCK = 512  # queries per SDPA call: memory O(block x (block + window)), never T x T


def rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (half-split, as in Llama). x: (B, H, T, D); positions: (T,)."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
                       prefix_k: Tensor | None = None, prefix_v: Tensor | None = None) -> Tensor:
    """Causal attention, optionally limited to a window, with an always-visible prefix.

    q: (B, H, Tq, D) at positions q_pos (Tq,); k, v: (B, H, Tk, D) at positions k_pos (Tk,), both
    increasing. Query at p sees keys at p' with p - window < p' <= p (window None: all p' <= p),
    plus every prefix key (B or 1, H, P, D). Computed block-wise over queries: cost O(Tq x window).
    """
    B, H, Tq, D = q.shape
    no_prefix = prefix_k is None or prefix_k.shape[2] == 0
    if window is None and no_prefix and k.shape[2] == Tq:  # plain causal: the fused O(T)-memory kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # split, not slice: the backward of a slice writes into a zero tensor of the input's full
    # size, once per block, which made long inputs quadratic. Keys come in blocks of the same size;
    # a query block takes the key blocks that cover its range.
    k_blocks, v_blocks = k.split(QUERY_BLOCK, dim=2), v.split(QUERY_BLOCK, dim=2)
    outs = []
    for i, qb in enumerate(q.split(QUERY_BLOCK, dim=2)):
        qp = q_pos[i * QUERY_BLOCK:i * QUERY_BLOCK + qb.shape[2]]
        lo = 0 if window is None else int(torch.searchsorted(k_pos, qp[0] - window + 1))
        hi = int(torch.searchsorted(k_pos, qp[-1], right=True))
        first, last = lo // QUERY_BLOCK, (hi - 1) // QUERY_BLOCK
        off = first * QUERY_BLOCK
        kb, vb = (blocks[first] if first == last else torch.cat(blocks[first:last + 1], dim=2)
                  for blocks in (k_blocks, v_blocks))
        kb, vb, kp = kb[:, :, lo - off:hi - off], vb[:, :, lo - off:hi - off], k_pos[lo:hi]
        mask = kp[None, :] <= qp[:, None]
        if window is not None:
            mask &= qp[:, None] - kp[None, :] < window
        if prefix_k is not None and prefix_k.shape[2] > 0:
            kb = torch.cat([prefix_k.expand(B, -1, -1, -1).to(kb.dtype), kb], dim=2)
            vb = torch.cat([prefix_v.expand(B, -1, -1, -1).to(vb.dtype), vb], dim=2)
            mask = torch.cat([mask.new_ones(mask.shape[0], prefix_k.shape[2]), mask], dim=1)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask))
    return torch.cat(outs, dim=2)


@dataclass
class AttentionState:
    """Keys/values (after RoPE) of the last `window` tokens (all tokens for full attention),
    (B, H, n, D) each, and the stream position."""

    k: Tensor
    v: Tensor
    position: int

    def detach(self) -> AttentionState:
        return AttentionState(self.k.detach(), self.v.detach(), self.position)


class Attention(nn.Module):
    """Multi-head causal attention with RoPE, an optional sliding window and persistent slots."""

    def __init__(self, dim: int, heads: int, *, window: int | None = None, n_persistent: int = 0,
                 rope_base: float = 10000.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: heads ({heads}) must divide dim ({dim})")
        if window is not None and window < 1:
            raise ValueError(f"Attention: window must be None or >= 1, got {window}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.n_persistent, self.rope_base = window, n_persistent, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        if n_persistent:
            self.persistent_k = nn.Parameter(torch.randn(heads, n_persistent, self.head_dim) * 0.02)
            self.persistent_v = nn.Parameter(torch.randn(heads, n_persistent, self.head_dim) * 0.02)

    @property
    def prefix(self) -> tuple[Tensor | None, Tensor | None]:
        if not self.n_persistent:
            return None, None
        return self.persistent_k.unsqueeze(0), self.persistent_v.unsqueeze(0)

    def init_state(self, batch_size: int) -> AttentionState:
        w = self.qkv.weight
        empty = w.new_zeros(batch_size, self.heads, 0, self.head_dim)
        return AttentionState(empty, empty.clone(), 0)

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v: (B, H, T, D), with RoPE at `positions` on q and k."""
        q, k, v = rearrange(self.qkv(x), "b t (s h d) -> s b h t d", s=3, h=self.heads)
        return rope(q, positions, self.rope_base), rope(k, positions, self.rope_base), v

    def project_kv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """k, v only, (B, H, T, D), RoPE on k: for tokens that are attended to but never attend
        (MAC's memory tokens), a third less projection work than `project`."""
        kv = F.linear(x, self.qkv.weight[self.dim:])
        k, v = rearrange(kv, "b t (s h d) -> s b h t d", s=2, h=self.heads)
        return rope(k, positions, self.rope_base), v

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        """x: (B, T, dim) -> (B, T, dim); the state carries the cache across calls."""
        check_sequence("Attention", x, self.dim)
        B, T, _ = x.shape
        state = self.init_state(B) if state is None else state
        pos = torch.arange(state.position, state.position + T, device=x.device)
        q, k, v = self.project(x, pos)
        k_all = torch.cat([state.k.to(k.dtype), k], dim=2)
        v_all = torch.cat([state.v.to(v.dtype), v], dim=2)
        k_pos = torch.arange(state.position - state.k.shape[2], state.position + T, device=x.device)
        y = windowed_attention(q, k_all, v_all, pos, k_pos, self.window, *self.prefix)
        if self.window is None or k_all.shape[2] < self.window:
            new_state = AttentionState(k_all, v_all, state.position + T)
        else:  # copies of the last window - 1 keys and values: views would keep all of k_all alive
            start = k_all.shape[2] - (self.window - 1)
            new_state = AttentionState(k_all[:, :, start:].clone(), v_all[:, :, start:].clone(),
                                       state.position + T)
        return self.out(rearrange(y, "b h t d -> b t (h d)")), new_state
