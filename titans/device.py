"""Choosing the torch device from a user's setting (auto | cpu | cuda | cuda:N)."""

from __future__ import annotations

import os
import time

import torch

from .errors import TitansError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when available, else the CPU; a plain `cuda` is the process's local GPU."""
    if not isinstance(name, str):
        raise TitansError(f"the device must be a string ({DEVICE_CHOICES}), got {type(name).__name__}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        index = name[5:] if name.startswith("cuda:") else ""
        if name != "cuda" and not index.isdigit():
            raise TitansError(f"the device must be {DEVICE_CHOICES}, got {name!r}")
        if not torch.cuda.is_available():
            raise TitansError(f"device {name!r} was asked for but CUDA is not available; use cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise TitansError(f"the device must be {DEVICE_CHOICES}, got {name!r}")
    return torch.device(name)


def busy_cores(interval: float = 0.2) -> float | None:
    """How many CPU cores other processes keep busy now: the machine's non-idle share over
    `interval` seconds (from /proc/stat; this process sleeps meanwhile), times the number of cores.
    None where /proc/stat cannot be read (not Linux)."""
    if interval <= 0:
        raise ValueError(f"interval must be positive seconds, got {interval}")

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle  # user nice system idle iowait irq softirq steal

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * os.cpu_count()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def oversubscription_hint(threads: int, others_busy: float | None, cores: int) -> str | None:
    """A warning when this process's CPU threads outnumber the cores that other processes leave
    free, else None. Each of PyTorch's parallel regions waits for its slowest thread, and one whose
    core is taken makes the whole step crawl: a two-thread memory step ran 12x slower next to one busy
    one-thread process (benchmarks/results/wait_policy.md)."""
    if threads < 1 or cores < 1:
        raise ValueError(f"threads and cores must be at least 1, got threads={threads}, cores={cores}")
    if threads == 1 or others_busy is None:
        return None
    free = cores - others_busy
    if threads <= free + 0.5:
        return None
    fit = max(1, int(free + 0.5))
    return (f"other processes keep {others_busy:.1f} of {cores} CPU cores busy and this one runs {threads} "
            f"threads: each parallel step would wait for a thread whose core is taken (12x slower, measured "
            f"in benchmarks/results/wait_policy.md); set OMP_NUM_THREADS={fit}, or stop the other work")


def cpu_warning(device: torch.device) -> str | None:
    """The oversubscription warning for work about to run on `device` (None on a GPU, on one CPU
    thread, or when the cores are free). Costs `busy_cores`' 0.2 s on a CPU with several threads."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return None
    return oversubscription_hint(threads, busy_cores(), usable_cores())
