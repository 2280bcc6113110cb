"""The training loop: `titans train --config configs/NAME.yaml [--set key=value ...]`, or on N
processes `torchrun --nproc_per_node=N -m titans.train --config ...`.

A config file has four sections (every key is optional; see `TrainConfig` for the defaults):

    model:   preset: tiny          # a TitansConfig preset, then any TitansConfig field
             variant: mac
    data:    dir, sources, tokenizer (byte | bpe8k | bpe32k), seq_len
    optim:   lr, min_lr_ratio, warmup_steps, weight_decay, beta1, beta2, eps, grad_clip
    train:   steps, batch_size (per process), grad_accum, seed, device, bf16, compile, cuda_graphs, fsdp,
             eval_every, eval_windows, ckpt_every, keep_last, log_every, out, progress, tensorboard

The run folder (train.out) gets metrics.jsonl, tb/ (TensorBoard), loss.png, summary.json and
checkpoints/ (see titans.checkpoint). `--resume` continues the latest checkpoint exactly: the
batches depend only on (seed, step), and the model, optimizer, scheduler and RNG states are
restored, so on a CPU the resumed losses equal the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import distributed
from .checkpoint import list_checkpoints, open_checkpoint, save_checkpoint
from .device import cpu_warning, pick_device
from .errors import TitansError, TrainingDiverged
from .memory import chunks_compiled, chunks_graphed, compile_chunks, graph_chunks
from .model import PARAMETER_FREE_FIELDS, PRESETS, TitansConfig, TitansLM, count_parameters

# ----------------------------------------------------------------------------- configuration

@dataclass
class DataConfig:
    dir: str = "data"
    sources: str = "pypi"      # a group (pypi, all) or comma-separated source names
    tokenizer: str = "byte"    # byte | bpe8k | bpe32k | bpe<N>
    seq_len: int = 512
    tasks: str = ""            # comma-separated titans.tasks names mixed into training (fine-tuning)
    task_mix: float = 0.5      # fraction of rows that are task examples when tasks is set
    task_loss: str = "answer"  # answer: score only the answer tokens of task rows; all: every token
    task_lengths: str = "fixed"  # fixed: every task prompt seq_len - 16 tokens; varied: drawn per row
    task_place: str = "end"    # end: the answer ends the row; random: the row's padding split at random
                               # before and after the example, so the answer falls anywhere in a segment


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0     # max global gradient norm; 0 disables


@dataclass
class RunConfig:
    steps: int = 1000
    batch_size: int = 8        # sequences per process per micro-step
    grad_accum: int = 1
    bptt: int = 0              # truncated backprop: pieces of this many tokens on the detached state (0: off)
    max_minutes: float = 0.0   # wall-clock budget: stop with a checkpoint after this long (0: none)
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    bf16: bool = True          # bf16 autocast (CUDA only)
    compile: bool = False      # torch.compile the neural memory's chunk step (titans.memory.compile_chunks)
    cuda_graphs: bool = False  # run the memory's chunk loops as CUDA graphs (titans.memory.graph_chunks)
    fsdp: bool = False         # FSDP2 instead of DDP when run on several processes
    init_from: str = ""        # start from these weights (a run or checkpoint folder): fine-tuning
    eval_every: int = 200
    eval_windows: int = 32     # validation windows of seq_len tokens
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    out: str = "out/runs/default"
    progress: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny", "variant": "mac"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int) -> TitansConfig:
        """The TitansConfig this run trains: the preset (if any), the model fields, and the
        tokenizer's vocabulary size."""
        fields_ = dict(self.model)
        preset = fields_.pop("preset", None)
        if fields_.get("vocab_size", vocab_size) != vocab_size:
            raise TitansError(f"model.vocab_size = {fields_['vocab_size']} but the tokenizer "
                              f"{self.data.tokenizer!r} has {vocab_size} tokens; drop model.vocab_size "
                              "(it is taken from the tokenizer)")
        fields_["vocab_size"] = vocab_size
        try:
            if preset is None:
                return TitansConfig.from_dict(fields_)
            return TitansConfig.from_preset(preset, **fields_)
        except ValueError as e:
            raise TitansError(f"model: {e}") from None


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": RunConfig}


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(where: str, value, default):
    """value converted to the type of the field's default, or a TitansError saying what was expected."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        with contextlib.suppress(TypeError, ValueError):  # YAML reads 2e-3 (no dot) as a string
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    article = "an" if kind is int else "a"
    raise TitansError(f"{where} must be {article} {kind.__name__}, got {value!r}")


def _model_keys() -> set[str]:
    return {f.name for f in fields(TitansConfig)} | {"preset"}


def config_from_dict(d: dict, *, source: str = "config") -> TrainConfig:
    """A TrainConfig from nested dicts; unknown sections or keys are errors with a suggestion."""
    if not isinstance(d, dict):
        raise TitansError(f"{source}: expected a mapping with sections model, data, optim, train; "
                          f"got {type(d).__name__}")
    cfg = TrainConfig()
    for section, values in d.items():
        if section not in ("model", *_SECTIONS):
            hint = _suggest(section, ["model", *_SECTIONS])
            raise TitansError(f"{source}: unknown section {section!r}{hint}; sections are model, data, "
                              "optim, train")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise TitansError(f"{source}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value, source=source)
    return cfg


def set_key(cfg: TrainConfig, dotted: str, value, *, source: str = "--set") -> None:
    """Set one `section.key` (e.g. optim.lr) with type checking."""
    section, _, key = dotted.partition(".")
    every = [f"model.{k}" for k in sorted(_model_keys())] + [
        f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in fields(c)]
    if section == "model" and key in _model_keys():
        if key == "preset" and value not in PRESETS:
            raise TitansError(f"{source}: model.preset {value!r} is not a preset; choose one of "
                              f"{', '.join(PRESETS)}")
        cfg.model[key] = value
        return
    if section in _SECTIONS and key in {f.name for f in fields(_SECTIONS[section])}:
        sub = getattr(cfg, section)
        setattr(sub, key, _coerce(f"{source}: {dotted}", value, getattr(_SECTIONS[section](), key)))
        return
    raise TitansError(f"{source}: unknown key {dotted!r}{_suggest(dotted, every)}")


def stop_if_interrupted(summary: dict, name: str) -> None:
    """For experiment drivers that run many trainings: a run that SIGINT / SIGTERM stopped returned
    early with a checkpoint; it must not be recorded as finished, and the driver must not go on to
    the next run. Raises SystemExit with a one-line message (exit status 1; rerunning resumes)."""
    if summary.get("stopped_by") in ("SIGINT", "SIGTERM"):
        raise SystemExit(f"{name}: stopped by {summary['stopped_by']} at step {summary['steps']} "
                         f"(checkpoint {summary['checkpoint']}); not recorded. Run the same command to "
                         "continue it.")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings (values parsed as YAML) to `cfg` in place, as `--set` does."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise TitansError(f"--set expects key=value (e.g. optim.lr=1e-3), got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_key(cfg, key.strip(), value)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a file in configs/), then apply `key=value`
    overrides (values are parsed as YAML: 3e-4, true, [1, 2])."""
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.exists() and (Path("configs") / f"{path}.yaml").exists():
            p = Path("configs") / f"{path}.yaml"
        if not p.is_file():
            have = sorted(q.stem for q in Path("configs").glob("*.yaml"))
            raise TitansError(f"config file {str(path)!r} not found"
                              + (f"; configs/ has: {', '.join(have)}" if have else ""))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TitansError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        cfg = config_from_dict(data, source=str(p))
        if "out" not in (data.get("train") or {}):
            cfg.train.out = f"out/runs/{p.stem}"
    apply_overrides(cfg, overrides)
    _validate(cfg)
    cfg.model_config(cfg.model.get("vocab_size", 256))  # model errors now, not after the data is built
    return cfg


def _validate(cfg: TrainConfig) -> None:
    positive = {"data.seq_len": cfg.data.seq_len, "train.steps": cfg.train.steps,
                "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "train.eval_every": cfg.train.eval_every, "train.eval_windows": cfg.train.eval_windows,
                "train.ckpt_every": cfg.train.ckpt_every, "train.keep_last": cfg.train.keep_last,
                "train.log_every": cfg.train.log_every, "optim.lr": cfg.optim.lr}
    for name, v in positive.items():
        if v <= 0:
            raise TitansError(f"{name} must be > 0, got {v}")
    if cfg.train.bptt < 0:
        raise TitansError(f"train.bptt must be >= 0 (0 = full backpropagation), got {cfg.train.bptt}")
    if not cfg.train.max_minutes >= 0:
        raise TitansError(f"train.max_minutes must be >= 0 (0 = no limit), got {cfg.train.max_minutes}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise TitansError(f"optim.min_lr_ratio must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.weight_decay < 0 or cfg.optim.grad_clip < 0:
        raise TitansError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")


# A gradient norm above this (before clipping) gets one warning with the remedy.
EXPLODING_GRAD_NORM = 1e4


def forward_backward(net, x: torch.Tensor, y: torch.Tensor, *, bptt: int = 0, scale: float = 1.0,
                     autocast=contextlib.nullcontext, last: bool = True) -> float:
    """Loss of one micro-batch (mean over its scored targets, y = -100 unscored) and its gradient
    times `scale`, accumulated into .grad.

    bptt > 0: truncated backpropagation through time. The sequence goes through the model in pieces
    of `bptt` tokens on the model state, which is detached between pieces, and each piece is
    backpropagated on its own. The forward pass (the loss) is unchanged, since pieces on the state
    equal one call; gradients no longer flow between pieces. DDP all-reduces only on the final
    backward of the last micro-step (`last`)."""
    T = x.shape[1]
    step = T if bptt <= 0 else bptt
    n_scored = (y != -100).sum().clamp(min=1)
    total, state = 0.0, None
    for a in range(0, T, step):
        final = last and a + step >= T
        sync = contextlib.nullcontext() if final or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast():
                logits, state = net(x[:, a:a + step], state)
                targets = y[:, a:a + step].flatten()
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets,
                                                         ignore_index=-100, reduction="sum") / n_scored
            (loss * scale).backward()
        total += loss.item()
        if a + step < T:
            state = state.detach()
    return total


# ----------------------------------------------------------------------------- optimisation

def no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm gains, biases (gate biases included), embeddings and persistent tokens are not decayed."""
    return (p.ndim < 2 or name.endswith("bias") or "norm" in name or ".ln_" in name
            or name.startswith("embed.") or "persistent" in name)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- the loop

class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop saves a checkpoint at the end of the step and returns."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Metrics:
    """metrics.jsonl (+ TensorBoard) on the main process."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.kept: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop records past the resumed step
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            self.kept = [r for r in records if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("titans train: tensorboard is not installed; writing metrics.jsonl only "
                      "(pip install tensorboard)", file=sys.stderr)

    def last_validation(self, step: int) -> dict | None:
        """The validation record of `step` kept from before a resume (None if there is none)."""
        found = [r for r in self.kept if r["step"] == step and "val_loss" in r]
        return found[-1] if found else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _config_diff(old: TitansConfig, new: TitansConfig) -> str:
    return "; ".join(f"{k}: {v} -> {getattr(new, k)}" for k, v in old.to_dict().items()
                     if getattr(new, k) != v)


def train(cfg: TrainConfig, *, resume: str | bool | None = None, log=print) -> dict:
    """Train as configured; returns a summary (final validation loss and bits per byte, tokens,
    steps, wall time, run folder, last checkpoint, and whether a signal stopped the run)."""
    from .data.stream import bits_per_byte, evaluate_loss, prepare, train_batch

    world = distributed.setup(torch.device("cuda" if cfg.train.device.startswith("cuda") else "cpu"))
    compiled_here = graphed_here = finished = False
    try:
        device = pick_device(cfg.train.device, world.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        main = world.is_main
        say = log if main else (lambda *a, **k: None)
        run_dir = Path(cfg.train.out)
        t, d = cfg.train, cfg.data
        if t.cuda_graphs and world.size > 1:  # NCCL's threads query CUDA events during a capture
            raise TitansError(f"train.cuda_graphs=true runs on one process only, got {world.size}: "
                              "drop it under torchrun (DDP / FSDP), or train on one GPU with it")
        if t.cuda_graphs and device.type != "cuda":
            raise TitansError(f"train.cuda_graphs=true needs a CUDA device, got {device}: "
                              "drop the option or set train.device=cuda")
        earlier = [] if resume else list_checkpoints(run_dir)
        if earlier:  # a fresh run would mix its checkpoints (and their pruning) with the old ones
            raise TitansError(f"{run_dir} already holds checkpoints of an earlier run (latest "
                              f"{earlier[-1].name}); continue it with --resume, choose another train.out, "
                              f"or delete the folder")

        # data: the main process builds the caches first, the others then read them
        if main:
            tokenizer, splits = prepare(d.dir, d.sources, d.tokenizer, d.seq_len, log=say)
        if world.size > 1:
            torch.distributed.barrier()
        if not main:
            tokenizer, splits = prepare(d.dir, d.sources, d.tokenizer, d.seq_len, log=say)
        model_cfg = cfg.model_config(tokenizer.vocab_size)
        task_mix = None
        if d.tasks:
            from .data.corpus import load_documents
            from .data.stream import TaskMix

            haystack = "\n\n".join(doc.text for doc in load_documents(d.dir, "train"))
            task_mix = TaskMix([n.strip() for n in d.tasks.split(",") if n.strip()], haystack, tokenizer,
                               d.seq_len, d.task_mix, d.task_loss, d.task_lengths, d.task_place)

        ckpt = None
        if resume:
            ckpt = open_checkpoint(run_dir if resume is True else resume)
            if ckpt.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
                raise TitansError(f"cannot resume {ckpt.path}: it was trained with tokenizer "
                                  f"{ckpt.meta['tokenizer']['name']!r}, this config gives {tokenizer.name!r} "
                                  "with a different vocabulary; use the same data.tokenizer and data.dir")
            if ckpt.config != model_cfg:
                raise TitansError(f"cannot resume {ckpt.path}: the model config changed "
                                  f"({_config_diff(ckpt.config, model_cfg)})")

        torch.manual_seed(t.seed)
        model = TitansLM(model_cfg)
        if ckpt is not None:
            ckpt.load_weights(model)
        elif t.init_from:  # fine-tuning: weights only; optimizer, schedule and data start afresh
            base = open_checkpoint(t.init_from)
            # fields that change no parameter may differ (e.g. fine-tuning with first_order)
            same = dataclasses.replace(base.config,
                                       **{f: getattr(model_cfg, f) for f in PARAMETER_FREE_FIELDS})
            if same != model_cfg:
                raise TitansError(f"train.init_from {base.path}: its model config differs "
                                  f"({_config_diff(base.config, model_cfg)})")
            if base.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
                raise TitansError(f"train.init_from {base.path}: trained with another tokenizer "
                                  f"({base.meta['tokenizer']['name']!r})")
            base.load_weights(model)
            say(f"initialised from {base.path} (step {base.step})")
        model.to(device)
        n_params = count_parameters(model)
        if t.fsdp and world.size > 1:  # FSDP2 swaps in sharded parameters: build the optimizer after
            net = distributed.apply_fsdp(model)
        elif world.size > 1:
            net = distributed.apply_ddp(model, device)
        else:
            net = model
        optimizer = make_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, t.steps))
        # optimizer state in the full, name-keyed form: the same file for 1 process, DDP or FSDP
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        step, tokens_seen = 0, 0
        if ckpt is not None:
            state = ckpt.trainer_state()
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            step, tokens_seen = state["step"], state["tokens_seen"]
            say(f"resumed from {ckpt.path} at step {step} ({tokens_seen:,} tokens)")
        if t.compile and not chunks_compiled():  # the memory's chunk step (the launch-bound loop)
            compile_chunks()
            compiled_here = True
        if t.cuda_graphs and not chunks_graphed():
            graph_chunks()
            graphed_here = True

        use_bf16 = t.bf16 and device.type == "cuda"
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        tokens_per_step = t.batch_size * t.grad_accum * d.seq_len * world.size
        say(f"model: {model_cfg.variant}, {n_params:,} parameters, vocab {model_cfg.vocab_size} "
            f"({tokenizer.name}); {world.size} process(es) on {device}; {tokens_per_step:,} tokens/step, "
            f"{t.steps} steps; run folder {run_dir}")
        hint = cpu_warning(device) if main else None  # only rank 0 speaks: the others skip the 0.2 s probe
        if hint:
            say(f"warning: {hint}")
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        metrics = _Metrics(run_dir, main, t.tensorboard, step if ckpt is not None else None)

        def validate() -> dict:
            net.eval()
            loss, _ = evaluate_loss(net, splits["val"], d.seq_len, t.eval_windows, t.batch_size, device,
                                    rank=world.rank, world=world.size, autocast=autocast)
            net.train()
            loss = distributed.mean_across(loss, world, device)
            return {"step": step, "tokens": tokens_seen, "val_loss": loss,
                    "val_bpb": bits_per_byte(loss, splits["val"])}

        def checkpoint() -> Path | None:
            model_state = get_model_state_dict(model, options=full)
            optim_state = get_optimizer_state_dict(model, optimizer, options=full)
            if not main:
                return None
            trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                             "rng": {"torch": torch.get_rng_state()}, "step": step,
                             "tokens_seen": tokens_seen, "data": {"seed": t.seed, "step": step}}
            return save_checkpoint(run_dir, step, model_state=model_state, config=model_cfg,
                                   train_config=cfg.to_dict(), tokenizer=tokenizer,
                                   trainer_state=trainer_state, tokens_seen=tokens_seen,
                                   keep_last=t.keep_last)

        progress = None
        if main and t.progress and sys.stderr.isatty():  # in a log file: plain lines instead
            from tqdm.auto import tqdm
            progress = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, leave=False)
        last_ckpt, last_val, stopped, warned_grad = None, None, None, False
        if ckpt is not None:  # resuming: a run that is already done reports its own last numbers
            last_ckpt, last_val = ckpt.path, metrics.last_validation(step)
        start, start_step = time.perf_counter(), step
        net.train()
        with _StopFlag() as stop:
            while step < t.steps:
                loss_sum = 0.0
                for micro in range(t.grad_accum):
                    x, y = train_batch(splits["train"], d.seq_len, t.batch_size, seed=t.seed, step=step,
                                       micro=micro, accum=t.grad_accum, rank=world.rank, world=world.size)
                    if task_mix is not None:
                        x, y = task_mix.apply(x, y, seed=t.seed, step=step, micro=micro, accum=t.grad_accum,
                                              rank=world.rank, world=world.size)
                    x, y = x.to(device), y.to(device)
                    loss_sum += forward_backward(net, x, y, bptt=t.bptt, scale=1 / t.grad_accum,
                                                 autocast=autocast, last=micro == t.grad_accum - 1)
                loss_val = distributed.mean_across(loss_sum / t.grad_accum, world, device)
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(f"the training loss became {loss_val} at step {step} (lr "
                                           f"{scheduler.get_last_lr()[0]:.2e}); lower optim.lr or set "
                                           f"optim.grad_clip; resume from the last checkpoint in {run_dir}",
                                           step=step, quantity="loss", value=loss_val)
                # the norm is taken even without clipping (max_norm inf), to catch a non-finite gradient
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    net.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf))
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(
                        f"the gradient became {grad_norm} at step {step} while the loss was finite "
                        f"({loss_val:.4g}); the weights were not updated. Backpropagating through the memory "
                        f"over {d.seq_len} tokens can overflow (benchmarks/results/grad_norm_vs_length.md): "
                        f"set train.bptt (e.g. 256), or model.forget_to=init, or lower optim.lr; resume from "
                        f"the last checkpoint in {run_dir}", step=step, quantity="gradient", value=grad_norm)
                if main and not warned_grad and grad_norm > EXPLODING_GRAD_NORM:
                    warned_grad = True
                    say(f"warning: gradient norm {grad_norm:.3g} at step {step + 1} (clipped to "
                        f"{cfg.optim.grad_clip}). Backpropagating through a deep memory over long sequences "
                        f"can explode; set train.bptt (e.g. 256) to truncate it (docs/training.md).")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                tokens_seen += tokens_per_step
                elapsed = time.perf_counter() - start
                tok_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                metrics.write({"step": step, "tokens": tokens_seen, "loss": loss_val, "lr": lr,
                               "grad_norm": grad_norm, "tok_per_s": tok_s})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
                elif main and (step % t.log_every == 0 or step == t.steps):
                    say(f"step {step}/{t.steps}  loss {loss_val:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s")
                if step % t.eval_every == 0 or step == t.steps:
                    last_val = validate()
                    metrics.write(last_val)
                    msg = (f"step {step}: val loss {last_val['val_loss']:.4f}, "
                           f"{last_val['val_bpb']:.4f} bits/byte")
                    (progress.write if progress is not None else say)(msg) if main else None
                if t.max_minutes and elapsed > 60 * t.max_minutes and not stop.signal:
                    stop.signal = "max_minutes"  # the time budget: stop like a signal, with a checkpoint
                if world.size > 1:  # every process must stop at the same step
                    flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
                    torch.distributed.all_reduce(flag)
                    if flag.item() and not stop.signal:
                        stop.signal = "SIGTERM"
                if step % t.ckpt_every == 0 or step == t.steps or stop.signal:
                    last_ckpt = checkpoint() or last_ckpt
                if stop.signal:
                    stopped = stop.signal
                    break
        if stopped == "max_minutes" and (last_val is None or last_val["step"] != step):
            last_val = validate()  # a run cut by its time budget still reports where it got to
            metrics.write(last_val)
            say(f"step {step}: val loss {last_val['val_loss']:.4f}, {last_val['val_bpb']:.4f} bits/byte")
        if progress is not None:
            progress.close()
        metrics.close()
        elapsed = time.perf_counter() - start
        summary = {"run_dir": str(run_dir), "variant": model_cfg.variant, "parameters": n_params,
                   "steps": step, "tokens": tokens_seen, "seconds": elapsed,
                   "tok_per_s": (step - start_step) * tokens_per_step / max(elapsed, 1e-9),
                   "val_loss": last_val and last_val["val_loss"], "val_bpb": last_val and last_val["val_bpb"],
                   "checkpoint": str(last_ckpt) if last_ckpt else None, "stopped_by": stopped}
        if main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if stopped is None:
                plot_losses({model_cfg.variant: run_dir / "metrics.jsonl"}, run_dir / "loss.png")
            if stopped:
                say(f"stopped by {stopped} at step {step}; checkpoint {last_ckpt}; continue with --resume")
        finished = True
        return summary
    finally:
        if compiled_here:
            compile_chunks(False)
        if graphed_here:
            graph_chunks(False)
        distributed.teardown(finished)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(runs: dict[str, str | Path], png: str | Path, title: str | None = None) -> Path:
    """Training loss (smoothed) and validation bits per byte against tokens, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, path) in enumerate(runs.items()):
        recs = read_metrics(path)
        train_recs = [r for r in recs if "loss" in r]
        val_recs = [r for r in recs if "val_bpb" in r]
        color = f"C{i}"
        if train_recs:
            xs = [r["tokens"] for r in train_recs]
            ys, avg = [], None
            for r in train_recs:  # exponential moving average, as TensorBoard shows it
                avg = r["loss"] if avg is None else 0.9 * avg + 0.1 * r["loss"]
                ys.append(avg / math.log(2))
            ax1.plot(xs, ys, color=color, label=label)
        if val_recs:
            ax2.plot([r["tokens"] for r in val_recs], [r["val_bpb"] for r in val_recs], "o-",
                     color=color, label=label)
    ax1.set(xlabel="training tokens", ylabel="train loss (bits/token, EMA)", title="training")
    ax2.set(xlabel="training tokens", ylabel="validation bits per byte", title="validation")
    from matplotlib.ticker import EngFormatter

    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(EngFormatter())  # 250k, 1M
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (a path, or a name from configs/, e.g. tiny_mac)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set optim.lr=1e-3 --set model.variant=mag "
                             "(repeatable)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the latest checkpoint of the run folder (train.out), or the "
                             "given checkpoint folder")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    main_process = os.environ.get("RANK", "0") == "0"
    if summary["val_bpb"] is not None and summary["stopped_by"] is None and main_process:
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f} s; "
              f"val {summary['val_bpb']:.4f} bits/byte; checkpoint {summary['checkpoint']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import fail_cleanly  # noqa: I001 (cli imports train lazily)

    parser = argparse.ArgumentParser(prog="python -m titans.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return fail_cleanly("train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
