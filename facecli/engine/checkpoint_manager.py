"""A run's checkpoint files: written once per save, linked under every name, rotated; and the RNG
state that makes resume exact.

Every rank calls :meth:`CheckpointManager.save` (gathering RNG states and a sharded head's
weights are collectives); only rank 0 writes. Files are written atomically
(:func:`facecli.engine.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from facecli.engine import distributed as dist_utils
from facecli.engine.checkpoint import CheckpointSaveError, save_checkpoint
from facecli.engine.runs import EPOCH_FILES


class CheckpointManager:
    def __init__(self, run_dir: Path, world, keep_epochs: int):
        self.run_dir, self.world, self.keep_epochs = Path(run_dir), world, keep_epochs

    def clear_temporaries(self) -> None:
        """Remove temporary files a process killed mid-save left behind."""
        for stale in self.run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def save(self, build: Callable[[], dict | None], names: list[str], epoch_file: str | None = None) -> None:
        """Build the checkpoint (on every rank), write it once on rank 0 and link it under ``names``."""
        ckpt = build()
        if not self.world.is_main:
            return
        first = epoch_file or names[0]
        save_checkpoint(ckpt, self.run_dir / first)
        for name in names:
            if name != first:
                link_or_copy(self.run_dir / first, self.run_dir / name)
        if epoch_file:
            self._rotate(epoch_file)

    def _rotate(self, newest: str) -> None:
        # Newest last by write time: after `resume --from min_loss` the epochs of the
        # abandoned continuation are older than the ones this run writes now.
        epochs = sorted(self.run_dir.glob(EPOCH_FILES), key=lambda p: (p.stat().st_mtime_ns, p.name))
        keep = {self.run_dir / newest}
        stale = [p for p in epochs if p not in keep][: max(0, len(epochs) - self.keep_epochs)]
        for old in stale:
            old.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, else copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointSaveError(f"Could not write {dst}: {e.strerror or e}.", hint="The previous checkpoint is kept.") from e


def capture_rng(world, device: torch.device) -> dict:
    """Every rank's torch (dropout) and CUDA RNG state: the random part of exact resume."""
    rng = {"torch": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if cuda is not None:
        rng["cuda"] = cuda
    if world.distributed:
        states = dist_utils.gather_objects((torch.get_rng_state(), cuda), world)
        rng["torch_per_rank"] = [s[0] for s in states]
        if cuda is not None:
            rng["cuda_per_rank"] = [s[1] for s in states]
    return rng


def restore_rng(rng: dict, world, device: torch.device) -> None:
    """This rank's states from :func:`capture_rng` (rank 0's when the process count changed)."""
    per_rank = rng.get("torch_per_rank")
    if per_rank and len(per_rank) == world.world_size:
        torch.set_rng_state(per_rank[world.rank])
    elif "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if device.type != "cuda":
        return
    cuda_per_rank = rng.get("cuda_per_rank")
    if cuda_per_rank and len(cuda_per_rank) == world.world_size:
        torch.cuda.set_rng_state(cuda_per_rank[world.rank], device)
    elif "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
