"""NeuralMemory: the long-term memory as an nn.Module (SPEC.md §2, "Layer output").

x -> q, k, v (linear, causal depthwise conv, SiLU; q, k L2-normalised per head)
  -> gates alpha, eta, theta per head (linear + sigmoid)
  -> memory_chunked (the inner loop)
  -> W_o(RMSNorm(y) * SiLU(x W_g))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import native
from .chunked import memory_read, run_memory
from .conv import check_sequence, conv_qkv, conv_silu, conv_weight, nonfinite_input_error, split_qkv
from .functional import MemoryState, no_autocast, rms_norm_backward, rms_scale, silu_grad

# Gate biases at initialisation (SPEC §2, "Stability"): forget little, learn slowly.
ALPHA_BIAS = -5.0  # sigmoid -> 0.0067
ETA_BIAS = 1.0  # sigmoid -> 0.73
THETA_BIAS = -2.2  # sigmoid -> 0.10, times theta_max


@dataclass
class NeuralMemoryState:
    """memory: the inner-loop state; conv: last (kernel - 1) projected inputs, (B, K-1, 3 dim);
    gate: gate logits of the open chunk's first token (only with chunk_gates), (B, 1, n_gates)."""

    memory: MemoryState
    conv: Tensor | None
    gate: Tensor | None = None

    def detach(self) -> NeuralMemoryState:
        cut = lambda t: None if t is None else t.detach()  # noqa: E731
        return NeuralMemoryState(self.memory.detach(), cut(self.conv), cut(self.gate))


def check_forget_scale(value, where: str) -> float:
    """value as a float in [0, 1], or ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: forget_scale must be a number in [0, 1] (1: the learned forgetting, "
                         f"0: none), got {value!r}")
    return float(value)


class NeuralMemory(nn.Module):
    """Neural long-term memory layer.

    dim: model width; heads: memory heads (head dim = dim / heads); depth: memory MLP layers L_M
    (1 = linear memory); expansion: hidden width of a deep memory, times head dim; chunk_size: b.
    momentum / forgetting / conv: the paper's ablations (off = eta 0 / alpha 0 / no convolution).
    per_layer_gates: separate alpha, eta, theta for each memory layer. chunk_gates: one gate value
    per chunk, taken at the chunk's first token (causal). theta_max: upper bound of the inner
    learning rate. grad_clip: clamp each token's inner-gradient norm (None = off). forget_to: "zero"
    (the paper's W = (1 - alpha) W + S) or "init" (W = (1 - alpha) W + alpha W_0 + S, towards the
    learned initial weights; contractive where "zero" amplifies perturbations, docs/training.md).
    first_order: in the backward pass, treat each inner gradient as constant in the weights it was
    taken at (first-order MAML; the forward pass is unchanged). The outer gradient then still reaches
    what is written (k, v, gates) and the reads, but no longer multiplies through the inner loop's
    second derivatives, the path along which it explodes with length (docs/training.md).
    second_order: keep this share (in [0, 1]) of those second derivatives instead of all (1, exact)
    or none (first_order); 0.5 bounds the pass-key MAC's gradient to 2K tokens (docs/training.md).
    forget_scale: multiply the forgetting gate alpha by this number in [0, 1] (1: as learned, 0: no
    forgetting). A knob for reading past the training length (the gate is learned for rows of the
    training length and erases a key written further back; docs/results.md, "What limits the pass key past
    its training length"); it changes no parameter, so a trained model can be read with any value.
    """

    def __init__(self, dim: int, heads: int, *, depth: int = 2, expansion: int = 4, chunk_size: int = 16,
                 momentum: bool = True, forgetting: bool = True, conv: bool = True,
                 per_layer_gates: bool = False, chunk_gates: bool = False, theta_max: float = 1.0,
                 grad_clip: float | None = None, conv_kernel: int = 4, forget_to: str = "zero",
                 first_order: bool = False, second_order: float = 1.0, forget_scale: float = 1.0):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("depth", depth), ("expansion", expansion),
                          ("chunk_size", chunk_size), ("conv_kernel", conv_kernel)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"NeuralMemory: {name} must be a positive int, got {val!r}")
        if dim % heads:
            raise ValueError(f"NeuralMemory: heads ({heads}) must divide dim ({dim}); "
                             f"choose heads from {[h for h in range(1, dim + 1) if dim % h == 0][:12]}")
        if not theta_max > 0:
            raise ValueError(f"NeuralMemory: theta_max must be > 0, got {theta_max!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"NeuralMemory: grad_clip must be None or > 0, got {grad_clip!r}")
        if forget_to not in ("zero", "init"):
            raise ValueError(f"NeuralMemory: forget_to must be 'zero' or 'init', got {forget_to!r}")
        if not isinstance(first_order, bool):
            raise ValueError(f"NeuralMemory: first_order must be True or False, got {first_order!r}")
        if isinstance(second_order, bool) or not isinstance(second_order, (int, float)) \
                or not 0.0 <= second_order <= 1.0:
            raise ValueError(f"NeuralMemory: second_order must be a number in [0, 1], got {second_order!r}")
        if first_order and second_order != 1.0:
            raise ValueError(f"NeuralMemory: first_order=True is second_order=0; got both (second_order="
                             f"{second_order!r}): pass one of them")
        self.forget_scale = check_forget_scale(forget_scale, "NeuralMemory")
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, dim // heads, depth
        self.chunk_size, self.momentum, self.forgetting = chunk_size, momentum, forgetting
        self.per_layer_gates, self.chunk_gates = per_layer_gates, chunk_gates
        self.theta_max, self.grad_clip, self.kernel = theta_max, grad_clip, conv_kernel
        self.forget_to, self.first_order, self.second_order = forget_to, first_order, float(second_order)
        D = self.head_dim

        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Parameter(conv_weight(3 * dim, conv_kernel)) if conv else None
        # gate logits: theta always, eta with momentum, alpha with forgetting
        self.gate_names = ["theta"] + (["eta"] if momentum else []) + (["alpha"] if forgetting else [])
        self.gates_per_head = depth if per_layer_gates else 1
        self.gates = nn.Linear(dim, len(self.gate_names) * heads * self.gates_per_head)
        nn.init.normal_(self.gates.weight, std=0.02)
        bias = {"theta": THETA_BIAS, "eta": ETA_BIAS, "alpha": ALPHA_BIAS}
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([bias[n] for n in self.gate_names])
                                  .repeat_interleave(heads * self.gates_per_head))

        dims = [D] + [D * expansion] * (depth - 1) + [D]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, dims[i], dims[i + 1]) / math.sqrt(dims[i])) for i in range(depth))
        if depth >= 2:
            self.ln_gamma = nn.Parameter(torch.ones(heads, D))
            self.ln_beta = nn.Parameter(torch.zeros(heads, D))
        self.out_norm = nn.RMSNorm(D, eps=1e-6)
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    # ------------------------------------------------------------------ pieces
    @property
    def ln(self) -> tuple[Tensor, Tensor] | None:
        return (self.ln_gamma, self.ln_beta) if self.depth >= 2 else None

    def init_state(self, batch_size: int) -> NeuralMemoryState:
        """The state before any token: the learned initial memory, zero momentum, empty caches."""
        W = tuple(w.expand(batch_size, *w.shape) for w in self.weights)
        mem = MemoryState(W, tuple(torch.zeros_like(w) for w in W), W, 0, self.chunk_size)
        conv = None if self.conv is None else self.conv.new_zeros(batch_size, self.kernel - 1, 3 * self.dim)
        return NeuralMemoryState(mem, conv)

    def _check(self, x: Tensor, state: NeuralMemoryState | None, finite: bool = True) -> None:
        check_sequence("NeuralMemory", x, self.dim, finite)
        if state is not None:
            if not isinstance(state, NeuralMemoryState):
                raise ValueError(f"NeuralMemory: state must be a NeuralMemoryState or None, "
                                 f"got {type(state).__name__}")
            if state.memory.batch_size != x.shape[0]:
                raise ValueError(f"NeuralMemory: state is for batch size {state.memory.batch_size}, "
                                 f"x has batch size {x.shape[0]}")

    def _qkv(self, x: Tensor, cache: Tensor | None, normalize: bool = True
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v: (B, H, T, D) after conv + SiLU (+ L2 norm for q, k unless normalize=False);
        returns the new conv cache."""
        return conv_qkv(x, self.qkv.weight, self.conv, cache, self.heads, normalize)

    def _gates(self, x: Tensor, state: NeuralMemoryState | None):
        """alpha, eta, theta: (B, H, T) or (B, H, T, L); and the chunk-gate carry for the state."""
        logits = self.gates(x)  # (B, T, n_gates), at least float32 for the memory recurrence
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        carry = None
        if self.chunk_gates:
            logits, carry = self._chunk_gate_logits(logits, state)
        g = rearrange(logits, "b t (n h l) -> n b h t l", n=len(self.gate_names), h=self.heads)
        if not self.per_layer_gates:
            g = g[..., 0]
        named = dict(zip(self.gate_names, torch.sigmoid(g).unbind(0)))
        theta = named["theta"] * self.theta_max
        zeros = torch.zeros_like(theta)
        alpha = named.get("alpha", zeros)
        if self.forget_scale != 1.0:
            alpha = alpha * self.forget_scale
        return alpha, named.get("eta", zeros), theta, carry

    def _chunk_gate_logits(self, logits: Tensor, state: NeuralMemoryState | None):
        """Every token takes the gate logits of its chunk's first token (stream-aligned chunks)."""
        B, T, _ = logits.shape
        pos = 0 if state is None else state.memory.position
        b = self.chunk_size
        carried = logits[:, :1] if state is None or state.gate is None else state.gate.to(logits.dtype)
        table = torch.cat([carried, logits], dim=1)  # index 0: the open chunk's first token
        p = torch.arange(pos, pos + T, device=logits.device)
        start = p - p % b
        idx = torch.where(start >= pos, start - pos + 1, torch.zeros_like(start))
        end = pos + T
        open_start = end - end % b
        carry = None if end % b == 0 else table[:, max(open_start - pos + 1, 0)].unsqueeze(1)
        return table[:, idx], carry

    def _gated_output(self, y: Tensor, gate: Tensor) -> Tensor:
        """out_proj(RMSNorm(y) * silu(gate)), gate = gate_proj(x) (B, T, dim): `_GatedOutput`."""
        return _GatedOutput.apply(y, gate, self.out_norm.weight, self.out_proj.weight, self.out_norm.eps)

    def _memory(self, x: Tensor, state: NeuralMemoryState | None, read: bool,
                read_from: Tensor | None = None):
        self._check(x, state, finite=False)
        x_finite = torch.isfinite(x).all()  # read on the host below, with the weights' check
        # q and k before their L2 norm: the memory normalises them chunk by chunk, so that it keeps
        # only its own copies of q, k, v for the backward pass (not also the conv's output)
        cache = None if state is None else state.conv
        h, conv = conv_silu(x, self.qkv.weight, self.conv, cache)
        packed, q, k, v = split_qkv(h, self.heads)  # packed (B, T, 3, H, D): q, k, v side by side per token
        if read_from is not None:  # the queries (and their conv cache) from the reading input: only
            w_q, conv_w = self.read_projection()  # the q rows of the projection and the conv
            h, conv_q = conv_silu(read_from, w_q, conv_w, None if cache is None else cache[..., :self.dim])
            q = rearrange(h, "b t (h d) -> b h t d", h=self.heads)
            if conv is not None:
                conv = torch.cat([conv_q, conv[..., self.dim:]], dim=-1)
        alpha, eta, theta, carry = self._gates(x, state)
        y, mem = run_memory(q, k, v, alpha, eta, theta, tuple(self.weights), chunk_size=self.chunk_size,
                            ln=self.ln, state=None if state is None else state.memory,
                            grad_clip=self.grad_clip, read=read, forget_to=self.forget_to, normalize_qk=True,
                            first_order=self.first_order, second_order=self.second_order,
                            packed=packed if read_from is None else None)
        # one host synchronisation for both checks (MAC calls this once per segment)
        x_ok, *w_ok = torch.stack([x_finite, *(torch.isfinite(w).all() for w in mem.weights)]).tolist()
        if not x_ok:
            raise nonfinite_input_error("NeuralMemory")
        if not all(w_ok):
            raise FloatingPointError(
                f"NeuralMemory: the memory weights became NaN/Inf within positions "
                f"[{mem.position - x.shape[1]}, {mem.position}); the inner updates diverged. "
                f"Lower theta_max (now {self.theta_max}) or set grad_clip (now {self.grad_clip}).")
        return y, NeuralMemoryState(mem, conv, carry)

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, state: NeuralMemoryState | None = None, *, read_from: Tensor | None = None
                ) -> tuple[Tensor, NeuralMemoryState]:
        """Write every token and read after each write. x: (B, T, dim) -> out (B, T, dim), state.

        read_from: the input the reads are computed from (queries, output gate), when it is to differ
        from the written x (keys, values, gates) in its gradient only: the same values, e.g. x with
        its graph and x.detach() (MAC's detach_kv). Default: x itself."""
        if read_from is not None and (not isinstance(read_from, Tensor) or read_from.shape != x.shape):
            got = tuple(read_from.shape) if isinstance(read_from, Tensor) else type(read_from).__name__
            raise ValueError(f"NeuralMemory: read_from must be a tensor of x's shape {tuple(x.shape)}, "
                             f"got {got}")
        y, new_state = self._memory(x, state, read=True, read_from=read_from)
        return self._gated_output(y, self.gate_proj(x if read_from is None else read_from)), new_state

    def update(self, x: Tensor, state: NeuralMemoryState | None = None) -> NeuralMemoryState:
        """Write only: the state after storing x (B, T, dim)."""
        return self._memory(x, state, read=False)[1]

    def retrieve(self, x: Tensor, state: NeuralMemoryState | None = None, *,
                 conv_cache: Tensor | None = None) -> Tensor:
        """Read only: y_t = M_W(q_t) with the state's current weights W for every token of x
        (B, T, dim); nothing is written. The convolution sees `conv_cache` (the projected inputs
        before x, (B, K-1, 3 dim) or only its q part (B, K-1, dim)) or zeros."""
        self._check(x, state)
        W = tuple(self.weights) if state is None else state.memory.weights
        return self.read(x, W, conv_cache)[0]

    def read_projection(self) -> tuple[Tensor, Tensor | None]:
        """The q rows of the projection and of the conv (the first dim channels): all a read needs."""
        return self.qkv.weight[:self.dim], None if self.conv is None else self.conv[:self.dim]

    def read(self, x: Tensor, weights: tuple[Tensor, ...], conv_cache: Tensor | None = None
             ) -> tuple[Tensor, Tensor | None]:
        """`retrieve` with explicit memory weights ((H, ., .) or (B, H, ., .) per layer); also
        returns the q-channel conv cache after x (B, K-1, dim), for a read stream that continues (MAC)."""
        q, gate, new_cache = self.read_inputs(x, conv_cache)
        return self.read_with(q, gate, weights), new_cache

    def read_inputs(self, x: Tensor, conv_cache: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The half of `read` that depends on x only: the L2-normalised queries (B, H, T, D), the
        output gate's logits gate_proj(x) (B, T, dim) and the q-channel conv cache after x. A caller
        that reads consecutive pieces of x with different weights (MAC's segments) computes these
        once for the whole x, as a few large matmuls, and passes slices to `read_with`."""
        if conv_cache is not None and conv_cache.shape[-1] == 3 * self.dim:
            conv_cache = conv_cache[..., :self.dim]
        w_q, conv = self.read_projection()
        h, new_cache = conv_silu(x, w_q, conv, conv_cache)
        q = F.normalize(rearrange(h, "b t (h d) -> b h t d", h=self.heads), dim=-1)
        return q, self.gate_proj(x), new_cache

    def read_with(self, q: Tensor, gate: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """M_weights(q) through the output norm, gate and projection: `read` given `read_inputs`."""
        H, D = self.heads, self.head_dim
        bad_q = q.dim() != 4 or q.shape[1:2] + q.shape[3:] != (H, D)
        if bad_q or gate.shape != (q.shape[0], q.shape[2], self.dim):
            raise ValueError(f"NeuralMemory.read_with: expected q (B, {H}, T, {D}) and gate "
                             f"(B, T, {self.dim}) as `read_inputs` returns them, got q {tuple(q.shape)}, "
                             f"gate {tuple(gate.shape)}")
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cast = lambda ts: None if ts is None else tuple(t.to(dtype) for t in ts)  # noqa: E731
        with no_autocast(q.device.type):
            y = memory_read(q.to(dtype), cast(weights), cast(self.ln))
        return self._gated_output(y, gate)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, depth={self.depth}, chunk_size={self.chunk_size}, "
                f"momentum={self.momentum}, forgetting={self.forgetting}, conv={self.conv is not None}, "
                f"per_layer_gates={self.per_layer_gates}, chunk_gates={self.chunk_gates}, "
                f"forget_to={self.forget_to!r}" + (", first_order=True" if self.first_order else "")
                + (f", second_order={self.second_order}" if self.second_order != 1.0 else ""))


# time steps per block of `_GatedOutput`: its transient buffers are a block's, not a sequence's
OUT_BLOCK = 512


class _GatedOutput(torch.autograd.Function):
    """out = (RMSNorm(y) * silu(g)) @ w_out^T for the memory's read y (B, H, T, D) and the gate's
    logits g (B, T, dim), keeping only y and g: the normalised read, the gate and their product
    (what autograd would keep, three more activation-sized tensors) are recomputed in the backward,
    which runs first in a layer's backward pass, while everything else is still kept. Both passes
    go by blocks of OUT_BLOCK time steps, so their transients are a block's. The norm and the gate
    run in float32 (y is float32); the product is cast to g's dtype (the autocast dtype under
    autocast) for the projection, as nn.Linear would."""

    @staticmethod
    def _native(y, g):
        """The C++ passes (csrc/gated_output.cpp) when they take y and g: y laid out (B, T, H, D) (the
        memory's read), y and g of one CPU float dtype with contiguous channels; else None."""
        yt = y.transpose(1, 2)
        if yt.stride(3) != 1 or yt.stride(2) != y.shape[3] or g.dtype != y.dtype or g.stride(2) != 1:
            return None
        return native.for_tensor(y)

    @staticmethod
    def forward(ctx, y, g, w_norm, w_out, eps):
        out = None
        ext = _GatedOutput._native(y, g)
        for t0 in range(0, y.shape[2], OUT_BLOCK):
            blk = slice(t0, t0 + OUT_BLOCK)
            if ext is not None:
                yb = y.transpose(1, 2)[:, blk].flatten(2)  # (B, n, H D), a view
                z = yb.new_empty(yb.shape)
                ext.gated_output_forward(yb, g[:, blk], w_norm.to(y.dtype), eps, z)
            else:
                z, _, _ = _GatedOutput._product(y[:, :, blk], g[:, blk], w_norm, eps)
            o = F.linear(z.to(g.dtype), w_out.to(g.dtype))
            if out is None:
                out = o.new_empty(*g.shape[:2], o.shape[-1])
            out[:, t0:t0 + OUT_BLOCK] = o
        ctx.save_for_backward(y, g, w_norm, w_out)
        ctx.eps = eps
        return out

    @staticmethod
    def _product(y, g, w_norm, eps):
        """RMSNorm(y) * silu(g) in (B, T, dim) and the pieces its gradient needs."""
        acc = torch.promote_types(y.dtype, torch.float32)
        y = y.to(acc)
        rstd = rms_scale(y, eps)
        normed = rearrange(y * rstd * w_norm.to(acc), "b h t d -> b t (h d)")
        return normed * F.silu(g.to(acc)), normed, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y, g, w_norm, w_out = ctx.saved_tensors
        H, dt = y.shape[1], g.dtype
        acc = torch.promote_types(y.dtype, torch.float32)
        dg = torch.empty_like(g)
        ext = _GatedOutput._native(y, g)
        # laid out as the memory's read, (B, T, H, D), which the C++ passes write by rows
        dy = torch.empty_like(y) if ext is None else torch.empty_like(y.transpose(1, 2)).transpose(1, 2)
        dw_out = torch.zeros(w_out.shape, dtype=acc, device=w_out.device)
        dw_norm = torch.zeros(w_norm.shape, dtype=acc, device=w_norm.device)
        wn, wo = w_norm.to(acc), w_out.to(dt)
        for t0 in range(0, y.shape[2], OUT_BLOCK):
            blk = slice(t0, t0 + OUT_BLOCK)
            if ext is not None:  # the passes below, fused; dy is laid out as y
                db = dout[:, blk]
                dz = db @ wo
                z = torch.empty_like(dz)
                yb, dyb = (t.transpose(1, 2)[:, blk].flatten(2) for t in (y, dy))  # (B, n, H D) views
                dw_norm += ext.gated_output_backward(yb, g[:, blk], wn, ctx.eps, dz, z, dg[:, blk], dyb)
                dw_out += db.flatten(0, -2).t() @ z.flatten(0, -2)
                continue
            yb, gb, db = y[:, :, blk].to(acc), g[:, blk].to(acc), dout[:, blk]
            z, normed, rstd = _GatedOutput._product(yb, gb, wn, ctx.eps)
            dw_out += (db.flatten(0, -2).t() @ z.to(dt).flatten(0, -2)).to(acc)
            dz = (db @ wo).to(acc)
            sig = torch.sigmoid(gb)
            dg[:, blk] = dz * normed * silu_grad(gb, sig)
            dnormed = rearrange(dz.mul_(gb * sig), "b t (h d) -> b h t d", h=H)
            yhat = yb * rstd
            dw_norm += (dnormed * yhat).sum((0, 1, 2))
            dyhat = dnormed.mul_(wn)
            dy[:, :, blk] = rms_norm_backward(yhat, rstd, dyhat)
        return dy, dg, dw_norm.to(w_norm.dtype), dw_out.to(w_out.dtype), None
