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


BACKEND_ENV = "FACECLI_DIST_BACKEND"


def backend_for(device_type: str) -> str:
    """NCCL on CUDA, gloo on the CPU; ``FACECLI_DIST_BACKEND`` overrides it.

    gloo on CUDA tensors lets several ranks share one GPU (NCCL refuses two ranks on one
    device): how the GPU check tests multi-process code on a one-GPU machine.
    """
    return os.environ.get(BACKEND_ENV) or ("nccl" if device_type == "cuda" else "gloo")


def local_device_index(local_rank: int) -> int:
    """The GPU of a local rank: ranks beyond the GPU count wrap around (several ranks per GPU)."""
    return local_rank % max(1, torch.cuda.device_count())


def init(device_type: str) -> World:
    """Join the process group described by torchrun's environment (or stay single)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = backend_for(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(local_device_index(local_rank))
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


def mean_over_ranks(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar over all ranks (NaN/inf anywhere gives a non-finite result everywhere)."""
    if not world.distributed:
        return float(value)
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t.item() / world.world_size)


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
        count = stats[-1].detach()
        if float(count) < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} on all ranks together")
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
