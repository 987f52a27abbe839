"""torchrun support: one process per device, gloo on CPU and nccl on GPUs.

``torchrun --nproc_per_node N imager train-base ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; without
them the run is a single process. Only rank 0 writes checkpoints, outputs and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over all processes (itself when single-process)."""
    if not d.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / d.world_size


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
