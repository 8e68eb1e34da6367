"""Batch samplers whose order is a pure function of (seed, epoch, batch index).

That purity is what makes resume exact: a run interrupted at batch k of epoch e restarts
the same permutation and skips k batches without touching an image. Both samplers are
distributed-aware: the *global* batch (``batch_size * world_size`` samples) is the same
whatever the number of processes, and rank r takes its contiguous slice of it, so
N processes see exactly the samples one process with the global batch would see.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from facecli.errors import UserError


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream)]))


class _EpochBatches(Sampler[list[int]]):
    """What both samplers share: the epoch, the batch to start from, the rank's slice."""

    def _setup(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def _slice(self, batch) -> list[int]:
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


class ShuffledBatchSampler(_EpochBatches):
    """A fresh permutation per epoch, cut into global batches (incomplete last batch dropped)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > num_samples:
            raise UserError(
                f"Batch size {batch_size} x {world_size} process(es) exceeds the {num_samples} training images.",
                hint="Lower --batch-size.",
            )
        self._setup(num_samples, batch_size, seed, rank, world_size)

    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = _rng(self.seed, self.epoch, 0).permutation(self.num_samples)
        g = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * g : (b + 1) * g]
            yield self._slice(chunk)


class PKBatchSampler(_EpochBatches):
    """FaceNet batches: P identities x K images each.

    An epoch has ``len(dataset) // global_batch`` batches. Identities are taken from a
    shuffled queue (refilled when exhausted), so every identity with at least two images is
    used equally often; K images are drawn without replacement (with replacement only for
    identities holding fewer than K).
    """

    def __init__(self, labels, batch_size: int, k: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1):
        if k < 2:
            raise UserError(f"--images-per-identity must be at least 2 for triplets, got {k}.")
        if batch_size % k != 0 or batch_size < 2 * k:
            raise UserError(
                f"FaceNet batch size {batch_size} must be a multiple of --images-per-identity {k} with at least 2 identities."
            )
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
        self.by_identity = [order[bounds[c] : bounds[c + 1]] for c in range(labels.max() + 1)]
        self.eligible = np.array([c for c, idx in enumerate(self.by_identity) if len(idx) >= 2], dtype=np.int64)
        self.p = batch_size // k
        self.k = k
        if len(self.eligible) < self.p * world_size:
            raise UserError(
                f"FaceNet needs {self.p * world_size} identities with 2+ images per batch but the data has {len(self.eligible)}.",
                hint="Lower --batch-size or raise --images-per-identity.",
            )
        self._setup(len(labels), batch_size, seed, rank, world_size)

    def batches_per_epoch(self) -> int:
        return max(1, self.num_samples // (self.batch_size * self.world_size))

    def _global_batches(self) -> Iterator[np.ndarray]:
        rng = _rng(self.seed, self.epoch, 1)
        queue: list[int] = []
        gp = self.p * self.world_size
        for _ in range(self.batches_per_epoch()):
            ids: list[int] = []
            while len(ids) < gp:
                if not queue:
                    queue = rng.permutation(self.eligible).tolist()
                c = queue.pop()
                if c not in ids:
                    ids.append(c)
            picks = []
            for c in ids:
                pool = self.by_identity[c]
                picks.append(rng.choice(pool, size=self.k, replace=len(pool) < self.k))
            yield np.concatenate(picks)

    def __iter__(self) -> Iterator[list[int]]:
        for b, batch in enumerate(self._global_batches()):
            if b < self.start_batch:
                continue
            yield self._slice(batch)
