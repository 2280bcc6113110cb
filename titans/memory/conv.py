"""Causal depthwise convolution + SiLU over (B, T, C), with a streaming cache.

Written as one autograd.Function that keeps only its input: the framework path (transpose to
(B, C, T), conv1d, transpose back, SiLU) keeps four copies of a 3*dim-wide activation per token
and its CPU backward is slow on strided inputs. On the CPU (float32/float64) the pre-activation,
SiLU and their backward run as fused C++ loops over tiles of rows (csrc/conv_silu.cpp, via
native.py); the eager passes below stay their reference and run everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native


def causal_conv_silu(x: Tensor, cache: Tensor, weight: Tensor) -> Tensor:
    """y_t = SiLU(sum_i weight[:, i] * x_{t - K + 1 + i}), where x_{<0} comes from `cache`.

    x: (B, T, C); cache: (B, K-1, C), the inputs before x (zeros at a stream's start);
    weight: (C, K). Returns y: (B, T, C). The new cache is x_pad[:, -(K-1):] (see `conv_tail`).
    """
    return _CausalConvSiLU.apply(x, cache, weight)


def conv_tail(x: Tensor, cache: Tensor) -> Tensor:
    """The last K-1 inputs of the stream [cache || x]: the cache for the next piece. A copy, not a
    view: a view would keep all of x (a whole piece's projections) alive for as long as the state."""
    K1 = cache.shape[1]
    if x.shape[1] >= K1:
        return x[:, x.shape[1] - K1:].clone()
    return torch.cat([cache, x], dim=1)[:, -K1:].clone()


def _shifts(K: int, T: int):
    """(i, s, m) for each tap i < K-1 of the kernel: it reads the input s = K-1-i steps back, and the
    first m = min(s, T) outputs take that input from the cache (rows K-1-s .. K-1-s+m-1)."""
    return [(i, K - 1 - i, min(K - 1 - i, T)) for i in range(K - 1)]


def _native(x: Tensor, cache: Tensor):
    """The C++ convolution (csrc/conv_silu.cpp) when it takes these tensors (CPU, float32/64,
    contiguous channels; native.for_tensor), else None: the eager code below runs."""
    if x.stride(-1) != 1 or cache.stride(-1) != 1 or cache.dtype != x.dtype:
        return None
    return native.for_tensor(x)


def _conv_silu_forward(x: Tensor, cache: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """SiLU(_pre_activation(x, cache, w)), written into `out` (B, T, C) when given."""
    ext = _native(x, cache)
    if ext is not None:
        rows = out is not None and out.stride(2) == 1 and out.stride(1) == out.shape[2]  # written in place
        y = out if rows else torch.empty_like(x, memory_format=torch.contiguous_format)
        ext.conv_silu_forward(x, cache, w.t().contiguous(), y)
        return y if out is None or rows else out.copy_(y)
    y = F.silu(_pre_activation(x, cache, w), inplace=True)
    return y if out is None else out.copy_(y)


def _pre_activation(x: Tensor, cache: Tensor, w: Tensor) -> Tensor:
    """sum_i w[:, i] * x_{t-K+1+i} with x_{<0} from the cache, without concatenating [cache || x]
    (that copy is as large as the activation). w: (C, K); its taps are read as contiguous rows of
    w^T (a strided per-channel vector halves the speed of the multiply-adds)."""
    T, K = x.shape[1], w.shape[1]
    taps = w.t().contiguous()
    pre = x * taps[K - 1]
    for i, s, m in _shifts(K, T):
        if T > s:
            pre[:, s:].addcmul_(x[:, :T - s], taps[i])
        pre[:, :m].addcmul_(cache[:, K - 1 - s:K - 1 - s + m], taps[i])
    return pre


def _channel_dot(a: Tensor, b: Tensor, block: int = 256) -> Tensor:
    """sum over (batch, time) of a * b, per channel, for (B, T, C) tensors; in time blocks, so the
    product never takes a full activation's memory."""
    out = a.new_zeros(a.shape[-1])
    for t in range(0, a.shape[1], block):
        out += (a[:, t:t + block] * b[:, t:t + block]).sum((0, 1))
    return out


def _conv_silu_backward(x: Tensor, cache: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dcache, dw) of y = SiLU(causal conv of x with w, x_{<0} from cache), all in x's dtype."""
    T, K = x.shape[1], w.shape[1]
    taps = w.t().contiguous()  # (K, C): contiguous per-tap channel vectors
    ext = _native(x, cache)
    if ext is not None:  # the passes below, fused (csrc/conv_silu.cpp)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx, dcache, dtaps = ext.conv_silu_backward(x, cache, taps, dy)
        return dx, dcache, dtaps.t().contiguous()
    # two activation-sized buffers in all: SiLU'(p) = s + p s (1 - s) is built in place in
    # `pre`, and the input gradient is then written into the buffer of `s`
    pre = _pre_activation(x, cache, w)
    s = torch.sigmoid(pre)
    dpre = pre.mul_(s)
    dpre.addcmul_(dpre, s, value=-1).add_(s).mul_(dy)
    dx = torch.mul(dpre, taps[K - 1], out=s)
    dcache = torch.zeros_like(cache)
    dw = torch.empty_like(w)
    dw[:, K - 1] = _channel_dot(dpre, x)
    for i, s_, m in _shifts(K, T):
        dw[:, i] = _channel_dot(dpre[:, :m], cache[:, K - 1 - s_:K - 1 - s_ + m])
        if T > s_:
            dx[:, :T - s_].addcmul_(dpre[:, s_:], taps[i])
            dw[:, i] += _channel_dot(dpre[:, s_:], x[:, :T - s_])
        dcache[:, K - 1 - s_:K - 1 - s_ + m].addcmul_(dpre[:, :m], taps[i])
    return dx, dcache, dw


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cache, weight):
        ctx.save_for_backward(x, cache, weight)
        return _conv_silu_forward(x, cache.to(x.dtype), weight.to(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, cache_in, weight = ctx.saved_tensors
        dx, dcache, dw = _conv_silu_backward(x, cache_in.to(x.dtype), weight.to(x.dtype), dy)
        return dx, dcache.to(cache_in.dtype), dw.to(weight.dtype)


# time steps per block of `_LinearConvSiLU`: its transient buffers are a block's, not a sequence's
BLOCK = 512


class _LinearConvSiLU(torch.autograd.Function):
    """h = x @ proj^T, y = SiLU(causal conv(h)) and the cache after x (the last K-1 rows of
    [cache || h]), in blocks of BLOCK time steps. Only x, proj, the cache and the conv weight are
    kept: h, the widest activation of the layer, is never whole in memory, and the backward
    recomputes it block by block (one GEMM) with the block's SiLU and conv gradients, so its
    transients are a block's too. The conv reaches K-1 steps back: a block's first outputs take h
    from the previous block (its last K-1 rows) or from the cache."""

    @staticmethod
    def forward(ctx, x, proj, cache, weight):
        B, T, _ = x.shape
        step = max(BLOCK, cache.shape[1])  # a block reaches back into one block at most
        y = left = w = None
        for t0 in range(0, T, step):
            # the block made contiguous first: F.linear on the strided block is slower than the copy and
            # the product together (3.5 against 2.9 ms for 2 x 512 x 384 -> 1152)
            hb = F.linear(x[:, t0:t0 + step].contiguous(), proj)  # under autocast: the autocast dtype
            if y is None:
                y = hb.new_empty(B, T, hb.shape[-1])
                left, w = cache.to(hb.dtype), weight.to(hb.dtype)
            _conv_silu_forward(hb, left, w, out=y[:, t0:t0 + step])
            left = conv_tail(hb, left)  # the K-1 rows of h before the next block
        ctx.save_for_backward(x, proj, cache, weight)
        ctx.h_dtype = y.dtype
        return y, left

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dtail):
        x, proj, cache_in, weight = ctx.saved_tensors
        dt = ctx.h_dtype
        acc = torch.promote_types(dt, torch.float32)  # weight gradients summed over blocks
        xd, pd, cache, w = x.to(dt), proj.to(dt), cache_in.to(dt), weight.to(dt)
        T, K1 = x.shape[1], cache.shape[1]
        step = max(BLOCK, K1)  # as in the forward
        dx = torch.empty_like(x)
        dproj = torch.zeros(proj.shape, dtype=acc, device=proj.device)
        dw = torch.zeros(w.shape, dtype=acc, device=w.device)
        carry = dcache = None  # d of the K-1 rows of h before the block processed last
        for t0 in reversed(range(0, T, step)):
            t1 = min(t0 + step, T)
            xb = xd[:, t0:t1].contiguous()  # as in the forward; and flattened below without a copy
            hb = F.linear(xb, pd)
            left = cache if t0 == 0 else F.linear(xd[:, t0 - K1:t0], pd)
            dyb = torch.zeros_like(hb) if dy is None else dy[:, t0:t1].to(dt)
            dhb, dleft, dwb = _conv_silu_backward(hb, left, w, dyb)
            dw += dwb
            if t1 == T and dtail is not None:  # the tail is the last K-1 rows of [left || hb]
                n, dtail = t1 - t0, dtail.to(dt)
                if n >= K1:
                    dhb[:, n - K1:] += dtail
                else:
                    dhb += dtail[:, K1 - n:]
                    dleft[:, n:] += dtail[:, :K1 - n]
            if carry is not None:  # from the block after this one (every block but the last has >= K-1 rows)
                dhb[:, -K1:] += carry
            dx[:, t0:t1] = dhb @ pd
            dproj += (dhb.flatten(0, -2).t() @ xb.flatten(0, -2)).to(acc)
            if t0 == 0:
                dcache = dleft
            else:
                carry = dleft
        return dx, dproj.to(proj.dtype), dcache.to(cache_in.dtype), dw.to(weight.dtype)


def check_sequence(owner: str, x: Tensor, dim: int, finite: bool = True) -> None:
    """The input check every token mixer shares: x must be a finite float (B, T >= 1, dim) tensor.
    finite=False leaves the finiteness to the caller (`nonfinite_input_error`), which can fold it
    into a later check: each such check is a host synchronisation on a GPU."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}: x must be (B, T, {dim}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{owner}: x must hold at least one token (T >= 1)")
    if finite and not torch.isfinite(x).all():
        raise nonfinite_input_error(owner)


def nonfinite_input_error(owner: str) -> FloatingPointError:
    return FloatingPointError(f"{owner}: the input x contains NaN or Inf "
                              "(it came from the layers before this one)")


def conv_weight(channels: int, kernel: int) -> Tensor:
    """A depthwise causal-conv weight (channels, kernel) that starts close to identity: the current
    token's tap is 1, the earlier taps small noise, so the current token dominates at init."""
    w = torch.empty(channels, kernel)
    w[:, :-1].normal_(0, 0.1)
    w[:, -1] = 1.0
    return w


def conv_qkv(x: Tensor, proj: Tensor, weight: Tensor | None, cache: Tensor | None, heads: int,
             normalize: bool = True):
    """Inputs x (B, T, dim) -> q, k, v (B, H, T, D): projected by proj (3 dim, dim), causal conv +
    SiLU, q and k L2-normalised per head (unless normalize=False: the caller does it); and the conv
    cache after x (None without a conv)."""
    h, new_cache = conv_silu(x, proj, weight, cache)
    _, q, k, v = split_qkv(h, heads)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q, k, v, new_cache


def split_qkv(h: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The projections h (B, T, 3 dim) as packed (B, T, 3, H, D) and q, k, v (B, H, T, D): views."""
    packed = h.view(*h.shape[:2], 3, heads, -1)
    return (packed, *packed.permute(2, 0, 3, 1, 4).unbind(0))


def conv_silu(x: Tensor, proj: Tensor, weight: Tensor | None, cache: Tensor | None
              ) -> tuple[Tensor, Tensor | None]:
    """SiLU(causal depthwise conv(x @ proj^T)) for x (B, T, dim), proj (C, dim), weight (C, K), with
    the cache of the K-1 projected inputs before x (zeros when None); returns the activations and
    the cache after x (None without a conv). Computed in blocks of time, the projection never whole
    and recomputed in the backward pass rather than kept (`_LinearConvSiLU`)."""
    if weight is None:
        return F.silu(F.linear(x, proj)), None
    if cache is None:
        cache = x.new_zeros(x.shape[0], weight.shape[1] - 1, proj.shape[0])
    return _LinearConvSiLU.apply(x, proj, cache, weight)
