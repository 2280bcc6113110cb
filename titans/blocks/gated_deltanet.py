"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): the linear-attention baseline of SPEC.md §4.

x -> q, k, v (one linear, causal depthwise conv, SiLU; q, k L2-normalised per head)
  -> gates alpha (decay), beta (write strength) per head (linear + sigmoid)
  -> the gated delta rule, chunk-wise (titans.ops.gated_delta)
  -> W_o(RMSNorm(o) * SiLU(x W_g))

Everything around the recurrence mirrors titans.memory.NeuralMemory, so the two differ only in the
memory rule. q is not scaled by 1/sqrt(Dk): the per-head RMSNorm of the output undoes any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from titans.memory.conv import check_sequence, conv_qkv, conv_weight
from titans.ops.gated_delta import gated_delta_chunked

# Gate biases at initialisation: keep most of the state, write half-strength.
ALPHA_BIAS = math.log(99.0)  # sigmoid -> 0.99
BETA_BIAS = 0.0  # sigmoid -> 0.5


@dataclass
class GatedDeltaNetState:
    """S: the delta-rule state, (B, H, D, D) (rows: value dims, columns: key dims), float32 or
    float64; conv: last (kernel - 1) projected inputs, (B, K-1, 3 dim), None without the conv."""

    S: Tensor
    conv: Tensor | None

    def detach(self) -> GatedDeltaNetState:
        return GatedDeltaNetState(self.S.detach(), None if self.conv is None else self.conv.detach())

    @property
    def batch_size(self) -> int:
        return self.S.shape[0]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer.

    dim: model width; heads: heads (head dim D = dim / heads, keys and values both D);
    chunk_size: chunk of the chunk-wise form (exact for any value); conv / conv_kernel: the causal
    depthwise convolution over the projected q, k, v (off = SiLU only).
    """

    def __init__(self, dim: int, heads: int, *, chunk_size: int = 64, conv: bool = True,
                 conv_kernel: int = 4):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("chunk_size", chunk_size),
                          ("conv_kernel", conv_kernel)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"GatedDeltaNet: {name} must be a positive int, got {val!r}")
        if dim % heads:
            raise ValueError(f"GatedDeltaNet: heads ({heads}) must divide dim ({dim}); "
                             f"choose heads from {[h for h in range(1, dim + 1) if dim % h == 0][:12]}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.kernel = chunk_size, conv_kernel

        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Parameter(conv_weight(3 * dim, conv_kernel)) if conv else None
        self.gates = nn.Linear(dim, 2 * heads)  # [alpha logits (heads) | beta logits (heads)]
        nn.init.normal_(self.gates.weight, std=0.02)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([ALPHA_BIAS, BETA_BIAS]).repeat_interleave(heads))
        self.out_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    # ------------------------------------------------------------------ pieces
    def init_state(self, batch_size: int) -> GatedDeltaNetState:
        """The state before any token: S = 0 and an empty (zero) convolution cache."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"GatedDeltaNet: batch_size must be a positive int, got {batch_size!r}")
        w = self.qkv.weight
        D = self.head_dim
        S = w.new_zeros(batch_size, self.heads, D, D, dtype=torch.promote_types(w.dtype, torch.float32))
        conv = None if self.conv is None else w.new_zeros(batch_size, self.kernel - 1, 3 * self.dim)
        return GatedDeltaNetState(S, conv)

    def _check(self, x: Tensor, state: GatedDeltaNetState | None) -> None:
        check_sequence("GatedDeltaNet", x, self.dim)
        if state is not None:
            if not isinstance(state, GatedDeltaNetState):
                raise ValueError(f"GatedDeltaNet: state must be a GatedDeltaNetState or None, "
                                 f"got {type(state).__name__}")
            D = self.head_dim
            want = (x.shape[0], self.heads, D, D)
            if tuple(state.S.shape) != want:
                raise ValueError(f"GatedDeltaNet: state.S must have shape {want} (B, heads, D, D), "
                                 f"got {tuple(state.S.shape)}")
            if self.conv is not None:
                want = (x.shape[0], self.kernel - 1, 3 * self.dim)
                if state.conv is None or tuple(state.conv.shape) != want:
                    got = None if state.conv is None else tuple(state.conv.shape)
                    raise ValueError(f"GatedDeltaNet: state.conv must have shape {want}, got {got}")

    def _qkv(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v: (B, H, T, D) after conv + SiLU (+ L2 norm for q, k); returns the new conv cache."""
        return conv_qkv(x, self.qkv.weight, self.conv, cache, self.heads)

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha, beta: (B, H, T), at least float32 for the recurrence."""
        logits = self.gates(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        alpha, beta = torch.sigmoid(rearrange(logits, "b t (n h) -> n b h t", n=2))
        return alpha, beta

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        o = self.out_norm(o.to(x.dtype))
        o = rearrange(o, "b h t d -> b t (h d)")
        return self.out_proj(o * F.silu(self.gate_proj(x)))

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, state: GatedDeltaNetState | None = None
                ) -> tuple[Tensor, GatedDeltaNetState]:
        """x: (B, T, dim) -> out (B, T, dim) and the state after x (feed it with the next piece)."""
        self._check(x, state)
        q, k, v, conv = self._qkv(x, None if state is None else state.conv)
        alpha, beta = self._gates(x)
        o, S = gated_delta_chunked(q, k, v, alpha, beta, chunk_size=self.chunk_size,
                                   state=None if state is None else state.S)
        return self._output(o, x), GatedDeltaNetState(S, conv)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, chunk_size={self.chunk_size}, "
                f"conv={self.conv is not None}, conv_kernel={self.kernel}")
