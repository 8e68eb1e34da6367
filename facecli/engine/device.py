"""The training device: which one, which precision, which backend switches."""

from __future__ import annotations

import os

import torch

from facecli.errors import UserError
from facecli.hardware import amp_dtype  # noqa: F401 (re-export: benchmarks/gpu_check.py imports it from here)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; a CUDA device always has an index and is made current.

    Every command resolves ``--device`` here. ``cuda`` without an index means this process's GPU:
    LOCAL_RANK's under torchrun, else the current one. torch.cuda.set_device rejects an
    index-less device, and later calls (memory fraction, RNG state) need the index too.
    """
    if name == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {name!r} is not a device.", hint="Use auto, cpu, cuda or cuda:N.") from e
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported.", hint="Use auto, cpu, cuda or cuda:N.")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine.", hint="Use --device cpu or auto.")
    index = device.index if device.index is not None else default_cuda_index()
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    # Work on cuda:N must not create contexts (and allocate memory) on cuda:0 as a side effect.
    torch.cuda.set_device(index)
    return torch.device("cuda", torch.cuda.current_device())


def default_cuda_index() -> int:
    """The GPU an index-less ``cuda`` means: LOCAL_RANK's under torchrun, else the current device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.strip().isdigit():
        return local_device_index(int(local_rank))
    return torch.cuda.current_device()


def local_device_index(local_rank: int) -> int:
    """The GPU of a local rank: ranks beyond the GPU count wrap around (several ranks per GPU)."""
    return local_rank % max(1, torch.cuda.device_count())


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: every training step has the same shapes, so the search pays once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def memory_report(device: torch.device) -> str:
    """Peak and total memory of a CUDA device, for out-of-memory messages."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "peak memory unknown on this device"
    gib = 1024**3
    peak = torch.cuda.max_memory_allocated(device) / gib
    total = torch.cuda.get_device_properties(device).total_memory / gib
    return f"peak {peak:.1f} GiB allocated of {total:.1f} GiB"
