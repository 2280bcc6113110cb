"""Token mixers of the Titans variants (SPEC.md §4). Each is an nn.Module with
`forward(x, state) -> (out, state)` on x: (B, T, dim) and `init_state(batch_size)`.

- LMM:  the neural memory is the whole mixer.
- MAG:  sliding-window attention and the memory side by side, combined by a gate.
- MAL:  the memory, then sliding-window attention on its output.
- MAC:  per segment: read the memory (state before the segment), attend over
        [persistent || memory tokens || segment], write the attention output into the memory and
        read it back, gate.
The attention baselines are `Attention` itself (titans/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..attention import Attention
from ..memory import NeuralMemory
from ..memory.conv import check_sequence
from ..memory.functional import rms_norm_backward, rms_scale
from ..memory.layer import NeuralMemoryState


class Gate(nn.Module):
    """o = RMSNorm_a(y) * sigmoid(RMSNorm_b(m)) (SPEC §4, MAG), with learnable norm weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_y = nn.RMSNorm(dim, eps=1e-6)
        self.norm_m = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        if y.shape != m.shape:
            raise ValueError(f"Gate: y and m must have the same shape, got {tuple(y.shape)} and "
                             f"{tuple(m.shape)}")
        return _GateFn.apply(y, m, self.norm_y.weight, self.norm_m.weight, self.norm_y.eps, self.norm_m.eps)


class _GateFn(torch.autograd.Function):
    """RMSNorm_a(y) * sigmoid(RMSNorm_b(m)) keeping only y and m: the two norms, the sigmoid and the
    product (four more activation-sized tensors under autograd) are recomputed in the backward.
    Computed in float32 at least, like nn.RMSNorm with a float32 weight."""

    @staticmethod
    def forward(ctx, y, m, wy, wm, eps_y, eps_m):
        acc = torch.promote_types(y.dtype, m.dtype)
        acc = torch.promote_types(acc, torch.promote_types(wy.dtype, torch.float32))
        yf, mf = y.to(acc), m.to(acc)
        ctx.save_for_backward(y, m, wy, wm)
        ctx.eps = (eps_y, eps_m)
        return yf * rms_scale(yf, eps_y) * wy.to(acc) * torch.sigmoid(mf * rms_scale(mf, eps_m) * wm.to(acc))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        y, m, wy, wm = ctx.saved_tensors
        eps_y, eps_m = ctx.eps
        acc = do.dtype
        yf, mf, wyf, wmf = y.to(acc), m.to(acc), wy.to(acc), wm.to(acc)
        ry, rm = rms_scale(yf, eps_y), rms_scale(mf, eps_m)
        ny, nm = yf * ry, mf * rm
        s = torch.sigmoid(nm * wmf)
        lead = tuple(range(do.dim() - 1))
        da = do * s  # o = a * s, a = ny wy, s = sigmoid(nm wm)
        dwy = (da * ny).sum(lead)
        dny = da.mul_(wyf)
        dy = rms_norm_backward(ny, ry, dny)
        db = do * (ny * wyf) * s * (1 - s)
        dwm = (db * nm).sum(lead)
        dnm = db.mul_(wmf)
        dm = rms_norm_backward(nm, rm, dnm)
        return dy.to(y.dtype), dm.to(m.dtype), dwy.to(wy.dtype), dwm.to(wm.dtype), None, None


class LMM(nn.Module):
    def __init__(self, memory: NeuralMemory):
        super().__init__()
        self.memory = memory

    def init_state(self, batch_size: int):
        return self.memory.init_state(batch_size)

    def forward(self, x, state=None):
        return self.memory(x, state)


class MAG(nn.Module):
    def __init__(self, attention: Attention, memory: NeuralMemory):
        super().__init__()
        self.attention, self.memory, self.gate = attention, memory, Gate(attention.dim)

    def init_state(self, batch_size: int):
        return (self.attention.init_state(batch_size), self.memory.init_state(batch_size))

    def forward(self, x, state=None):
        sa, sm = state if state is not None else (None, None)
        y, sa = self.attention(x, sa)
        m, sm = self.memory(x, sm)
        return self.gate(y, m), (sa, sm)


class MAL(nn.Module):
    def __init__(self, attention: Attention, memory: NeuralMemory):
        super().__init__()
        self.attention, self.memory = attention, memory

    def init_state(self, batch_size: int):
        return (self.memory.init_state(batch_size), self.attention.init_state(batch_size))

    def forward(self, x, state=None):
        sm, sa = state if state is not None else (None, None)
        m, sm = self.memory(x, sm)
        y, sa = self.attention(m, sa)
        return y, (sm, sa)


@dataclass
class MACState:
    """memory: the live memory state (written with every attention output so far);
    segment_weights: memory weights at the start of the open segment (what h reads);
    k_h, v_h, k_s, v_s: keys/values of the open segment's memory tokens and tokens, (B, H, n, D);
    read_conv: conv cache of the read stream (projected segment inputs); position: tokens seen."""

    memory: NeuralMemoryState
    segment_weights: tuple[Tensor, ...]
    k_h: Tensor
    v_h: Tensor
    k_s: Tensor
    v_s: Tensor
    read_conv: Tensor | None
    position: int


class MAC(nn.Module):
    """Memory as context (SPEC §4, Eq. 21-25), one memory token per segment token, causally aligned:
    token i sees every persistent slot, the memory tokens h_j and the tokens S_j for j <= i of its
    segment. Segments are aligned to stream positions 0, C, 2C, ..."""

    def __init__(self, attention: Attention, memory: NeuralMemory, segment_len: int, *,
                 write_norm: bool = False, detach_write: bool = False, detach_kv: bool = False):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"MAC: segment_len must be >= 1, got {segment_len}")
        self.attention, self.memory, self.segment_len = attention, memory, segment_len
        self.gate = Gate(attention.dim)
        # write_norm: the memory writes RMSNorm(y), not y (TitansConfig.write_norm says when and why)
        self.write_norm = nn.RMSNorm(attention.dim, eps=1e-6) if write_norm else None
        # detach_write: the memory is given a detached copy of y (TitansConfig.detach_write)
        self.detach_write = detach_write
        # detach_kv: only what the memory writes (keys, values, gates) comes from the detached copy;
        # the read-back's queries and output gate keep their gradient (TitansConfig.detach_kv)
        if detach_write and detach_kv:
            raise ValueError("MAC: detach_write already detaches everything detach_kv does; set one of them")
        self.detach_kv = detach_kv

    def init_state(self, batch_size: int) -> MACState:
        mem = self.memory.init_state(batch_size)
        empty = self.attention.init_state(batch_size).k
        read_conv = None if mem.conv is None else mem.conv.new_zeros(*mem.conv.shape[:-1], self.memory.dim)
        return MACState(mem, mem.memory.weights, empty, empty, empty, empty, read_conv, 0)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        check_sequence("MAC", x, self.attention.dim)
        state = self.init_state(x.shape[0]) if state is None else state
        # split the piece at segment boundaries (split, not slices: a slice's backward writes a
        # zero tensor of x's full size per segment, quadratic in T)
        first = min(x.shape[1], self.segment_len - state.position % self.segment_len)
        full, tail = divmod(x.shape[1] - first, self.segment_len)
        sizes = [first] + [self.segment_len] * full + ([tail] if tail else [])
        # what depends on x alone, for the whole piece at once (large matmuls, one conv pass): the
        # memory's read queries and output gate, and the segment tokens' attention q, k, v
        q_read, gate, read_conv = self.memory.read_inputs(x, state.read_conv)
        pos = torch.arange(state.position, state.position + x.shape[1], device=x.device)
        qkv = self.attention.project(x, pos)
        pieces = zip(q_read.split(sizes, 2), gate.split(sizes, 1), *(t.split(sizes, 2) for t in qkv),
                     pos.split(sizes))
        outs = []
        for piece in pieces:
            o, state = self._segment_piece(*piece, state)
            outs.append(o)
        return torch.cat(outs, dim=1), replace(state, read_conv=read_conv)

    def _segment_piece(self, q_read, gate, q, k_s, v_s, pos, st: MACState) -> tuple[Tensor, MACState]:
        """The tokens of one segment (all T of them in it), given their x-only inputs: read queries
        q_read (B, H, T, D) and output gate (B, T, dim) of the memory, attention q, k_s, v_s
        (B, H, T, D) and stream positions pos (T,)."""
        B, T = gate.shape[:2]
        attn = self.attention
        # 1. read: memory tokens from the state before the segment (no write)
        h = self.memory.read_with(q_read, gate, st.segment_weights)
        # 2. attend over [P || h || S]
        k_h, v_h = attn.project_kv(h, pos)  # memory tokens are keys and values only
        k_h, v_h = torch.cat([st.k_h, k_h], 2), torch.cat([st.v_h, v_h], 2)
        k_s, v_s = torch.cat([st.k_s, k_s], 2), torch.cat([st.v_s, v_s], 2)
        n = k_s.shape[2]  # segment tokens so far (earlier pieces + this one)
        causal = torch.ones(T, n, dtype=torch.bool, device=q.device).tril(n - T)
        keys, values, mask = [k_h, k_s], [v_h, v_s], [causal, causal]
        pk, pv = attn.prefix
        if pk is not None:
            keys.insert(0, pk.expand(B, -1, -1, -1).to(q.dtype))
            values.insert(0, pv.expand(B, -1, -1, -1).to(q.dtype))
            mask.insert(0, causal.new_ones(T, pk.shape[2]))
        y = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2),
                                           attn_mask=torch.cat(mask, 1))
        y = attn.out(rearrange(y, "b h t d -> b t (h d)"))
        # 3-4. write y into the memory and read it back, token by token (exact, SPEC §2)
        norm = (lambda t: t) if self.write_norm is None else self.write_norm  # noqa: E731
        w = y.detach() if self.detach_write or self.detach_kv else y
        # detach_kv reads from y itself only where a gradient is wanted (same values: without one,
        # as in evaluation, one pass over the written input serves both)
        split = self.detach_kv and y.requires_grad
        m, mem = self.memory(norm(w), st.memory, read_from=norm(y) if split else None)
        out = self.gate(y, m)
        position = st.position + T
        if position % self.segment_len == 0:  # segment closed: the next one reads the state now
            empty = k_h.new_empty(*k_h.shape[:2], 0, k_h.shape[3])  # not a view: it would keep k_h alive
            return out, MACState(mem, mem.memory.weights, empty, empty, empty, empty, st.read_conv, position)
        return out, MACState(mem, st.segment_weights, k_h, v_h, k_s, v_s, st.read_conv, position)
