"""Titans language models: config, Llama-style blocks, streaming state, generation (SPEC.md §4-5).

    config = TitansConfig.from_preset("tiny", variant="mac")
    model = TitansLM(config)
    logits, state = model(tokens)              # tokens: (B, T) long
    logits, state = model(more_tokens, state)  # continue the stream: same as one call
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention
from .blocks.mixers import LMM, MAC, MAG, MAL
from .memory import NeuralMemory
from .memory.functional import silu_grad
from .memory.layer import check_forget_scale

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa", "gated_deltanet", "ttt_mlp")

# SPEC §5 (camera-ready Table 5) plus two CPU-sized presets. Paper presets use the Llama-2 32K
# vocabulary; the small ones bytes. `params` is the target size: the SwiGLU width is chosen per
# variant so that every variant of a preset has about that many parameters (equal-size
# comparisons, as in the paper), unless mlp_hidden is given.
PRESETS: dict[str, dict] = {
    "tiny": dict(params=2e6, vocab_size=256, dim=128, n_layers=4, n_heads=4, segment_len=64, window=64,
                 chunk_size=16, n_persistent=4),
    "small": dict(params=20e6, vocab_size=256, dim=384, n_layers=8, n_heads=6, segment_len=128, window=128,
                  chunk_size=16, n_persistent=16),
    "170m": dict(params=170e6, vocab_size=32000, dim=768, n_layers=12, n_heads=16),
    "340m": dict(params=340e6, vocab_size=32000, dim=1024, n_layers=24, n_heads=16),
    "760m": dict(params=760e6, vocab_size=32000, dim=1536, n_layers=24, n_heads=16),
    "1.3b": dict(params=1.3e9, vocab_size=32000, dim=2048, n_layers=18, n_heads=8),
}


# TitansConfig fields that change only the backward pass: a model fine-tuned with another value
# (train.init_from) computes the same function
GRADIENT_ONLY_FIELDS = ("first_order", "second_order", "detach_write", "detach_kv")
# fields that change no parameter: a checkpoint's weights fit a model with any value of them
PARAMETER_FREE_FIELDS = (*GRADIENT_ONLY_FIELDS, "forget_scale")


@dataclass
class TitansConfig:
    """Everything that defines a model. Defaults follow SPEC §5 (chunk 16, segment 512, window
    2048, 128 persistent tokens, conv kernel 4)."""

    variant: str = "mac"
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    memory_depth: int = 2
    memory_expansion: int = 4
    chunk_size: int = 16
    segment_len: int = 512
    window: int = 2048
    n_persistent: int = 128
    mlp_hidden: int | None = None  # SwiGLU width; None: 8/3 dim rounded up to a multiple of 64
    momentum: bool = True
    forgetting: bool = True
    conv: bool = True
    per_layer_gates: bool = False
    theta_max: float = 1.0
    # clamp of each token's inner-gradient norm (SPEC §2 "Stability"). Without it the deep memory's
    # inner step can diverge early in training (outer gradient norms of 1e3 at lr 3e-3 on the tiny
    # MAC); None turns it off.
    grad_clip: float | None = 1.0
    # where forgetting pulls the memory: "zero" (the paper) or "init" (the learned initial weights;
    # NeuralMemory's docstring and docs/training.md)
    forget_to: str = "zero"
    # the outer gradient treats each inner gradient as constant in the memory weights it was taken
    # at (first-order MAML; NeuralMemory's docstring). Forward pass and inference unchanged; a
    # training option for long rows, where full backprop through the deep memory explodes.
    first_order: bool = False
    # keep this share (in [0, 1]) of the inner loop's second derivatives in the outer gradient instead
    # of all (1, exact) or none (first_order); exclusive with first_order. Forward pass unchanged.
    second_order: float = 1.0
    # multiply every memory's forgetting gate alpha by this number in [0, 1] (1: as learned). Changes
    # no parameter: `TitansLM.set_forget_scale` (and `titans eval --forget-scale`) reads a trained
    # model past its training length with slower forgetting. NeuralMemory's docstring.
    forget_scale: float = 1.0
    # MAC: RMSNorm (learnable weight) on the attention output before the memory writes it and reads
    # it back (SPEC §4 writes the output as it is: off by default). The block's pre-norm gives LMM,
    # MAG and MAL normalised memory inputs; MAC's write input is the attention's output projection,
    # whose scale training is free to grow. In a tiny MAC trained on the pass key without it, the
    # values written grew to norms of 12-450 while the deep memory's output has a norm of ~6: the
    # memory fitted nothing and no trace of the needle reached the answer; with it, the needle
    # reached the answer through the memory from about 2M tokens on (by 12M, 90% of the key's digits
    # teacher-forced). On language modelling it costs 0.05-0.08 bits/byte at 0.4M tokens
    # (Table-1 budget, two seeds). docs/results.md, "Why the tiny MAC carried nothing".
    write_norm: bool = False
    # MAC: the memory writes (and reads back from) a detached copy of the attention output, so no
    # gradient flows from the memory's write into attention. This cuts MAC's segment-to-segment loop
    # W -> h (memory tokens) -> attention -> write -> W, the second path along which the outer
    # gradient explodes with length (first_order cuts the first); the memory's own projections,
    # gates and write_norm still learn. Forward pass unchanged. docs/training.md.
    detach_write: bool = False
    # MAC: the finer cut of the same loop. Only what the memory writes (its keys, values and gates)
    # comes from the detached copy; its read-back queries and output gate keep their gradient into
    # attention, which so still learns what to ask the memory. The loop W -> h -> attention -> write
    # -> W is cut all the same. Exclusive with detach_write. Forward pass unchanged.
    detach_kv: bool = False
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"TitansConfig: {msg}")

        if self.variant not in VARIANTS:
            close = difflib.get_close_matches(str(self.variant), VARIANTS, n=1)
            bad(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "memory_depth", "memory_expansion",
                     "chunk_size", "segment_len", "window"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                bad(f"{name} must be a positive int, got {val!r}")
        if self.n_persistent < 0:
            bad(f"n_persistent must be >= 0, got {self.n_persistent}")
        if self.dim % self.n_heads:
            divisors = [h for h in range(1, self.n_heads * 2 + 1) if self.dim % h == 0]
            bad(f"n_heads ({self.n_heads}) must divide dim ({self.dim}); e.g. n_heads in {divisors[-4:]}")
        if (self.dim // self.n_heads) % 2:
            bad(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even (RoPE)")
        if self.forget_to not in ("zero", "init"):
            bad(f"forget_to must be 'zero' (the paper) or 'init' (towards the initial weights), "
                f"got {self.forget_to!r}")
        for name in ("first_order", "detach_write", "detach_kv", "write_norm", "momentum", "forgetting",
                     "conv", "per_layer_gates"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        try:
            check_forget_scale(self.forget_scale, "TitansConfig")
        except ValueError as e:
            bad(str(e).removeprefix("TitansConfig: "))
        so = self.second_order
        if isinstance(so, bool) or not isinstance(so, (int, float)) or not 0.0 <= so <= 1.0:
            bad(f"second_order must be a number in [0, 1] (1: the exact gradient), got {so!r}")
        if self.first_order and so != 1.0:
            bad(f"first_order=true is second_order=0; got both (second_order={so!r}): set one of them")
        if self.detach_write and self.detach_kv:
            bad("detach_write and detach_kv are exclusive (detach_write detaches the read-back too); set one")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.dim / 3 / 64)

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> TitansConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"TitansConfig: unknown field {key!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else ""))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> TitansConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TitansConfig:
        """A named configuration (tiny, small, 170m, 340m, 760m, 1.3b) with field overrides. Without
        an explicit mlp_hidden, the SwiGLU width is sized so the model has the preset's parameter
        count for the chosen variant."""
        if name not in PRESETS:
            raise ValueError(f"TitansConfig: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields_ = {k: v for k, v in PRESETS[name].items() if k != "params"}
        cfg = cls.from_dict({**fields_, **overrides})
        if "mlp_hidden" in overrides:
            return cfg
        # parameters are linear in the MLP width: two counts on the meta device give the slope
        n1, n2 = (_count(dataclasses.replace(cfg, mlp_hidden=h)) for h in (64, 128))
        hidden = 64 + (PRESETS[name]["params"] - n1) / ((n2 - n1) / 64)
        return dataclasses.replace(cfg, mlp_hidden=max(64, 64 * round(hidden / 64)))


# ------------------------------------------------------------------ blocks

class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """down(silu(a) * b) for [a, b] = up(x)."""
        return _SwiGLUDown.apply(self.up(x), self.down.weight)


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(a) * b) from ab = [a, b], keeping only ab: silu(a) and the product, which autograd
    would keep as well (half again the hidden activations), are recomputed in the backward."""

    @staticmethod
    def forward(ctx, ab, w_down):
        a, b = ab.chunk(2, dim=-1)
        ctx.save_for_backward(ab, w_down)
        return F.linear(F.silu(a) * b, w_down.to(ab.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        ab, w_down = ctx.saved_tensors
        a, b = ab.chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        silu = a * sig
        dout = dout.to(ab.dtype)
        dw = (dout.flatten(0, -2).t() @ (silu * b).flatten(0, -2)).to(w_down.dtype)
        dp = dout @ w_down.to(ab.dtype)
        dab = torch.cat([dp * b * silu_grad(a, sig), dp * silu], dim=-1)
        return dab, dw


def build_mixer(cfg: TitansConfig) -> nn.Module:
    """The token mixer of one block for cfg.variant."""
    v = cfg.variant

    def memory(**kw):
        opts = dict(depth=cfg.memory_depth, expansion=cfg.memory_expansion, chunk_size=cfg.chunk_size,
                    momentum=cfg.momentum, forgetting=cfg.forgetting, conv=cfg.conv,
                    per_layer_gates=cfg.per_layer_gates, theta_max=cfg.theta_max, grad_clip=cfg.grad_clip,
                    forget_to=cfg.forget_to, first_order=cfg.first_order, second_order=cfg.second_order,
                    forget_scale=cfg.forget_scale)
        return NeuralMemory(cfg.dim, cfg.n_heads, **{**opts, **kw})

    def attention(window, n_persistent):
        return Attention(cfg.dim, cfg.n_heads, window=window, n_persistent=n_persistent,
                         rope_base=cfg.rope_base)

    if v == "transformer":
        return attention(None, 0)
    if v == "swa":
        return attention(cfg.window, 0)
    if v == "lmm":
        return LMM(memory())
    if v == "ttt_mlp":  # TTT-MLP: deep memory, no momentum, no forgetting
        return LMM(memory(momentum=False, forgetting=False))
    if v == "mag":
        return MAG(attention(cfg.window, cfg.n_persistent), memory())
    if v == "mal":
        return MAL(attention(cfg.window, cfg.n_persistent), memory())
    if v == "mac":
        return MAC(attention(None, cfg.n_persistent), memory(), cfg.segment_len, write_norm=cfg.write_norm,
                   detach_write=cfg.detach_write, detach_kv=cfg.detach_kv)
    if v == "gated_deltanet":
        from .blocks.gated_deltanet import GatedDeltaNet

        return GatedDeltaNet(cfg.dim, cfg.n_heads)
    raise ValueError(f"unknown variant {v!r}")


class Block(nn.Module):
    """Llama-style: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.mixer = build_mixer(cfg)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)

    def forward(self, x: Tensor, state) -> tuple[Tensor, object]:
        h, state = self.mixer(self.norm1(x), state)
        x = x + h
        return x + self.mlp(self.norm2(x)), state


@dataclass
class LMState:
    """Per-layer mixer states and the number of tokens seen."""

    layers: list
    position: int

    def detach(self) -> LMState:
        return LMState([_detach(s) for s in self.layers], self.position)


def _detach(obj):
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _detach(getattr(obj, f.name)) for f in fields(obj)})
    return obj


class TitansLM(nn.Module):
    def __init__(self, config: TitansConfig):
        super().__init__()
        if not isinstance(config, TitansConfig):
            raise ValueError(f"TitansLM: config must be a TitansConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        for mod in self.modules():
            if isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, nn.Linear) and not _is_gate(mod):
                nn.init.normal_(mod.weight, std=std)
        for block in self.blocks:  # scale residual outputs down with depth (GPT-2)
            for name, p in block.named_parameters():
                if name.endswith(("out.weight", "out_proj.weight", "down.weight")):
                    nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))

    def set_forget_scale(self, scale: float) -> None:
        """Multiply every neural memory's forgetting gate alpha by `scale` in [0, 1] from now on (1: as
        learned); recorded in self.config. For reading a trained model past its training length."""
        scale = check_forget_scale(scale, "TitansLM.set_forget_scale")
        memories = [m for m in self.modules() if isinstance(m, NeuralMemory)]
        if not memories:
            raise ValueError(f"TitansLM.set_forget_scale: variant {self.config.variant!r} has no neural "
                             "memory to scale; it applies to lmm, mac, mag, mal (ttt_mlp never forgets)")
        for m in memories:
            m.forget_scale = scale
        self.config = dataclasses.replace(self.config, forget_scale=scale)

    def init_state(self, batch_size: int) -> LMState:
        return LMState([b.mixer.init_state(batch_size) for b in self.blocks], 0)

    def forward(self, tokens: Tensor, state: LMState | None = None) -> tuple[Tensor, LMState]:
        """tokens: (B, T) long -> logits (B, T, vocab), and the state after the last token."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            got = (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor)
                   else type(tokens).__name__)
            raise ValueError(f"TitansLM: tokens must be a (B, T) integer tensor, got {got}")
        if tokens.shape[1] < 1:
            raise ValueError("TitansLM: tokens must hold at least one position (T >= 1)")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"TitansLM: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        # no state: each mixer starts its own inside its forward (where FSDP has gathered its weights)
        layers = [None] * len(self.blocks) if state is None else state.layers
        x = self.embed(tokens)
        new_layers = []
        try:
            for block, s in zip(self.blocks, layers):
                x, s = block(x, s)
                new_layers.append(s)
        except FloatingPointError as e:  # a layer found NaN/Inf: say if the weights were broken already
            bad = next((n for n, p in self.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is None:
                raise
            raise FloatingPointError(
                f"TitansLM: parameter {bad} contains NaN or Inf, so the activations do ({e}): the weights "
                "were broken before this call, e.g. by an optimizer step with a non-finite gradient "
                "(`titans train` stops on that; in a loop of your own check the gradient norm before "
                "optimizer.step())") from e
        position = 0 if state is None else state.position
        return self.head(self.norm(x)), LMState(new_layers, position + tokens.shape[1])

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample max_new_tokens after prompt (B, T) one token per step on the streaming state.
        temperature 0 is greedy. Returns (B, T + max_new_tokens)."""
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p}")
        logits, state = self(prompt)
        out = [prompt]
        for _ in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, top_p, generator)
            out.append(nxt)
            logits, state = self(nxt, state)
        return torch.cat(out, dim=1)


def _is_gate(mod: nn.Linear) -> bool:
    """Gate projections keep their own (conservative) initialisation."""
    return mod.bias is not None


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else top-k / nucleus."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(cfg: TitansConfig) -> int:
    """Parameters of TitansLM(cfg), counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return count_parameters(TitansLM(cfg))
