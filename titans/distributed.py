"""Data parallelism, applied to a built model from outside (the model knows nothing about it).

`torchrun --nproc_per_node=N -m titans.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()`
then joins the process group (NCCL on CUDA, gloo on CPU) and the trainer wraps the model with
`apply_ddp` or, with `fsdp: true`, `apply_fsdp` (FSDP2: each block is one shard unit)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(finished: bool = True) -> None:
    """Leave the process group. After a finished run every process first waits for the others (a
    barrier): destroying the group while another process is still busy (rank 0 writing the last
    checkpoint) can hang (pytorch/pytorch#75097). After an error nothing is destroyed: the other
    processes may be blocked in a collective, and destroying would deadlock; the process exits and
    torchrun stops the rest."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
        dist.destroy_process_group()


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard each block, then the rest (embedding, head) as the root unit. In place."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def mean_across(value: float, world: World, device: torch.device) -> float:
    """The mean of a float over all processes (the value itself in a world of one)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size
