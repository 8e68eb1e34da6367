"""Process-group plumbing for ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m facecli train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init` reads them and joins the group (NCCL on CUDA, gloo on the CPU). A plain
``facecli train`` is a world of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from facecli.engine.device import local_device_index  # here too: callers use dist_utils.local_device_index


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    # A gloo group for decisions the host makes (batch sizes, stop): agreeing there never
    # makes Python wait for a device.
    host_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


BACKEND_ENV = "FACECLI_DIST_BACKEND"


def backend_for(device_type: str) -> str:
    """NCCL on CUDA, gloo on the CPU; ``FACECLI_DIST_BACKEND`` overrides it.

    gloo on CUDA tensors lets several ranks share one GPU (NCCL refuses two ranks on one
    device): how the GPU check tests multi-process code on a one-GPU machine.
    """
    return os.environ.get(BACKEND_ENV) or ("nccl" if device_type == "cuda" else "gloo")


def init(device: torch.device | str) -> World:
    """Join the process group described by torchrun's environment (or stay single)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not dist.is_initialized():
        kwargs: dict = {"timeout": timedelta(minutes=30), "backend": backend_for(device.type)}
        if device.type == "cuda":
            index = local_device_index(local_rank)
            torch.cuda.set_device(index)
            if kwargs["backend"] == "nccl":
                kwargs["device_id"] = torch.device("cuda", index)
        kwargs.update(_restart_store(rank, world_size, kwargs["timeout"]))
        dist.init_process_group(**kwargs)
    host = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return World(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world, host_group=host)


def _restart_store(rank: int, world_size: int, timeout: timedelta) -> dict:
    """After a torchrun restart, the process group's store under a prefix of its own.

    torchrun keeps one rendezvous store across restarts (TCP store sharing), so the restarted
    group would read the dead group's connection keys (gloo: "Connection refused"; NCCL: a
    stale unique id). Prefixing them with the restart count keeps each attempt's apart. (With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every attempt gets a fresh store and no prefix is
    needed: the way for several nodes, whose agents may count a restart differently.)
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return {"store": dist.PrefixStore(f"facecli/restart_{restart}", store), "rank": rank, "world_size": world_size}


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=world.host_group)


def agree(world: World, batch_size: int, stop: bool) -> tuple[tuple[int, ...], bool]:
    """Every rank's batch size and whether any rank must stop, exchanged on the host (gloo).

    Ranks must take the same decisions at the same step (skip a batch that lost its images
    to decode errors, stop on a signal), or DDP's collectives would wait forever.
    """
    if not world.distributed:
        return (batch_size,), stop
    mine = torch.tensor([batch_size, int(stop)], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(world.world_size)]
    dist.all_gather(parts, mine, group=world.host_group)
    rows = torch.stack(parts).numpy()  # host memory: reading it waits for no device
    return tuple(int(n) for n in rows[:, 0]), bool(rows[:, 1].any())


def broadcast_object(obj, world: World):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=world.host_group)
    return box[0]


def gather_objects(obj, world: World) -> list:
    """``obj`` of every rank, on every rank (over the host group)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj, group=world.host_group)
    return out


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks, left on the device (a collective nobody waits for)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = value.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks, left on the device (for a loss's batch statistics)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = value.detach().clone()
    dist.all_reduce(t)
    return t


def allreduce_sum_hook(process_group, bucket):  # no return annotation: DDP checks it and this module's are strings
    """DDP communication hook that sums gradients over ranks instead of averaging them (returns a Future).

    For a loss that is already the mean over the global batch and replicated on every rank
    (the class-sharded margin head), each rank's backward yields only its part of the
    gradient: the sum, not the mean, is the gradient of that loss.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient is summed over ranks too (every rank's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.detach().clone()
        dist.all_reduce(g)
        return g


class GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch for backends without ``nn.SyncBatchNorm`` (CPU/gloo).

    ``nn.SyncBatchNorm`` runs on GPUs only. This one computes the per-channel mean and the
    variance over the samples of all ranks with two all-reduces (mean first, then the sum of
    squared deviations, as precise as the one-process two-pass formula); autograd carries the
    gradient through them. In eval mode, or outside a process group, it is a plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        local_count = x.numel() // x.shape[1]
        stats = torch.cat([xf.sum(dims).double(), torch.tensor([float(local_count)], dtype=torch.float64, device=x.device)])
        stats = _AllReduceSum.apply(stats)
        count = stats[-1].detach()  # >= 2: the trainer skips a step where any rank has fewer than 2 images
        mean = (stats[:-1] / count).float()
        xc = xf - mean.view(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims).double()).div(count).float()
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1)).float()
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm over the global batch: ``nn.SyncBatchNorm`` on CUDA, :class:`GlooSyncBatchNorm` elsewhere.

    Parameters and running-stat buffers are shared with the replaced layers (the optimizer
    keeps working) and the state-dict keys are unchanged (checkpoints load into plain BatchNorm).
    """
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, torch.nn.SyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
