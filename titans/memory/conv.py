"""Causal depthwise convolution + SiLU over (B, T, C), with a streaming cache.

Written as one autograd.Function that keeps only its input: the framework path (transpose to
(B, C, T), conv1d, transpose back, SiLU) keeps four copies of a 3*dim-wide activation per token
and its CPU backward is slow on strided inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv_silu(x: Tensor, cache: Tensor, weight: Tensor) -> Tensor:
    """y_t = SiLU(sum_i weight[:, i] * x_{t - K + 1 + i}), where x_{<0} comes from `cache`.

    x: (B, T, C); cache: (B, K-1, C), the inputs before x (zeros at a stream's start);
    weight: (C, K). Returns y: (B, T, C). The new cache is x_pad[:, -(K-1):] (see `conv_tail`).
    """
    return _CausalConvSiLU.apply(x, cache, weight)


def conv_tail(x: Tensor, cache: Tensor) -> Tensor:
    """The last K-1 inputs of the stream [cache || x]: the cache for the next piece."""
    K1 = cache.shape[1]
    if x.shape[1] >= K1:
        return x[:, x.shape[1] - K1:]
    return torch.cat([cache, x], dim=1)[:, -K1:]


def _pre_activation(xp: Tensor, weight: Tensor, T: int) -> Tensor:
    K = weight.shape[1]
    pre = xp[:, K - 1:K - 1 + T] * weight[:, K - 1]
    for i in range(K - 1):
        pre.addcmul_(xp[:, i:i + T], weight[:, i])
    return pre


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cache, weight):
        xp = torch.cat([cache.to(x.dtype), x], dim=1)
        ctx.save_for_backward(x, cache, weight)
        return F.silu(_pre_activation(xp, weight.to(x.dtype), x.shape[1]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, cache, weight = ctx.saved_tensors
        T, K = x.shape[1], weight.shape[1]
        w = weight.to(x.dtype)
        xp = torch.cat([cache.to(x.dtype), x], dim=1)
        pre = _pre_activation(xp, w, T)
        s = torch.sigmoid(pre)
        # SiLU'(p) = s (1 + p (1 - s)), in place: this runs on the widest activation of the layer
        dpre = torch.sub(1, s).mul_(pre).add_(1).mul_(s).mul_(dy)
        del pre, s
        dxp = torch.zeros_like(xp)
        dw = torch.empty_like(w)
        for i in range(K):
            dxp[:, i:i + T].addcmul_(dpre, w[:, i])
            dw[:, i] = (dpre * xp[:, i:i + T]).sum((0, 1))
        return dxp[:, K - 1:], dxp[:, :K - 1].to(cache.dtype), dw.to(weight.dtype)


def check_sequence(owner: str, x: Tensor, dim: int) -> None:
    """The input check every token mixer shares: x must be a finite float (B, T >= 1, dim) tensor."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}: x must be (B, T, {dim}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{owner}: x must hold at least one token (T >= 1)")
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{owner}: the input x contains NaN or Inf "
                                 "(it came from the layers before this one)")


def conv_qkv(h: Tensor, weight: Tensor | None, cache: Tensor | None, heads: int):
    """Projected inputs h (B, T, 3 dim) -> q, k, v (B, H, T, D) after causal conv + SiLU, with q and
    k L2-normalised per head; and the conv cache after h (None without a conv)."""
    h, new_cache = conv_silu(h, weight, cache)
    B, T, _ = h.shape
    q, k, v = h.view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, new_cache


def conv_silu(h: Tensor, weight: Tensor | None, cache: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """SiLU(causal depthwise conv(h)) for h (B, T, C) with the cache of the K-1 inputs before h
    (zeros when None); returns the activations and the cache after h (None without a conv)."""
    if weight is None:
        return F.silu(h), None
    if cache is None:
        cache = h.new_zeros(h.shape[0], weight.shape[1] - 1, h.shape[2])
    return causal_conv_silu(h, cache, weight), conv_tail(h, cache)
