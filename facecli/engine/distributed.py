"""Process-group plumbing for ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m facecli train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init` reads them and joins the group (NCCL on CUDA, gloo on the CPU). A plain
``facecli train`` is a world of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> World:
    """Join the process group described by torchrun's environment (or stay single)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any (used to stop all ranks at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, world: World):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
