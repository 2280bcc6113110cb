"""Checkpoints: write atomically, keep the last N, find and load them.

A checkpoint is a folder `RUN/checkpoints/step_XXXXXXXX/` holding

    model.safetensors   the model weights
    config.json         the model config, the training config, step, tokens seen, tokenizer identity
    tokenizer/          the tokenizer (loaded with the model)
    trainer.pt          optimizer, scheduler, RNG and data-position state (for --resume); optional:
                        a weights-only checkpoint (without it) loads, evaluates and fine-tunes
                        (train.init_from) but cannot be resumed

It is written into a hidden temporary folder and renamed into place in one step, so an
interrupted write never leaves a half-written `step_*` folder: the previous checkpoint stays the
latest one. `RUN/checkpoints/latest` names the newest folder (also replaced atomically).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import TitansError
from .model import TitansConfig, TitansLM

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_REQUIRED = ("model.safetensors", "config.json", "tokenizer")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict, config: TitansConfig,
                    train_config: dict, tokenizer, trainer_state: dict, tokens_seen: int,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints and prune all but the newest keep_last.

    model_state: a full (unsharded) state dict of TitansLM; trainer_state: anything torch.save
    can write (optimizer, scheduler, RNG, data position)."""
    if keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        # clone: tied weights share storage, which safetensors refuses to write twice
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        meta = {"format": FORMAT, "step": step, "tokens_seen": tokens_seen, "model": config.to_dict(),
                "train": train_config,
                "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        tokenizer.save(tmp / "tokenizer")
        torch.save(trainer_state, tmp / "trainer.pt")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders under run_dir/checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted((p for p in found if all((p / r).exists() for r in _REQUIRED)), key=lambda p: p.name)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), a run's checkpoints folder,
    or a checkpoint folder itself. TitansError if there is none."""
    path = Path(path)
    if not path.exists():
        raise TitansError(f"checkpoint {str(path)!r} does not exist; pass a run folder "
                          "(e.g. out/runs/NAME) or one of its checkpoints/step_* folders")
    if (path / "config.json").is_file() and (path / "model.safetensors").exists():
        return path
    run = path.parent if path.name == "checkpoints" else path
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise TitansError(f"no checkpoint in {str(path)!r}: expected {run}/checkpoints/step_*/ "
                          "with model.safetensors, config.json and tokenizer/")
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        named = run / "checkpoints" / latest.read_text().strip()
        if named in ckpts:
            return named
    return ckpts[-1]


@dataclass
class Checkpoint:
    path: Path
    meta: dict            # config.json
    config: TitansConfig

    @property
    def step(self) -> int:
        return self.meta["step"]

    def tokenizer(self):
        from .data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(self.path / "tokenizer")
        except (OSError, ValueError) as e:
            raise TitansError(f"checkpoint {self.path}: cannot load its tokenizer ({e})") from None
        if tok.fingerprint != self.meta["tokenizer"]["fingerprint"]:
            raise TitansError(f"checkpoint {self.path}: tokenizer/ does not match the one the model was "
                              "trained with (fingerprint differs); the checkpoint is damaged")
        return tok

    def load_weights(self, model: torch.nn.Module) -> None:
        """Load model.safetensors into model (strict); TitansError if the file is damaged."""
        try:
            state = load_file(str(self.path / "model.safetensors"))
            model.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0][:200]
            raise TitansError(f"checkpoint {self.path}/model.safetensors is corrupt or does not fit the "
                              f"model in config.json ({msg})") from None

    def load_model(self, device: str | torch.device = "cpu"):
        """(model in eval mode on device, tokenizer)."""
        tokenizer = self.tokenizer()
        model = TitansLM(self.config)
        self.load_weights(model)
        return model.to(device).eval(), tokenizer

    def trainer_state(self) -> dict:
        if not (self.path / "trainer.pt").exists():
            raise TitansError(f"checkpoint {self.path} has no trainer.pt (a weights-only checkpoint): it can "
                              "be evaluated, sampled or fine-tuned from (train.init_from), not resumed")
        try:
            return torch.load(self.path / "trainer.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # pickle / zip errors of a damaged file come in many types
            raise TitansError(f"checkpoint {self.path}/trainer.pt is corrupt ({type(e).__name__}: "
                              f"{str(e)[:200]}); resume from an earlier checkpoint") from None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find (see find_checkpoint) and read a checkpoint's metadata."""
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / "config.json").read_text())
        # fields added after a checkpoint was written take the value that reproduces it
        config = TitansConfig.from_dict({"write_norm": False, **meta["model"]})
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TitansError(f"checkpoint {ckpt}/config.json is corrupt ({type(e).__name__}: {e})") from None
    return Checkpoint(ckpt, meta, config)


def load(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from any checkpoint the trainer wrote: a run folder (its latest
    checkpoint) or a checkpoints/step_* folder. The model is in eval mode on `device`."""
    return open_checkpoint(path).load_model(device)
