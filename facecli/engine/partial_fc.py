"""Partial FC class sampling (``--sample-rate R``): each step computes logits for a sample of the classes.

An, Deng et al., "Partial FC: Training 10 Million Identities on a Single Machine" (and
insightface's arcface_torch). Each step, each process holding ``C_local`` classes keeps

* every class that is the label of a sample of the global batch (the positives), and
* uniformly drawn others, up to ``max(positives, ceil(R * C_local))`` classes;

the softmax normaliser runs over the sampled classes only. The draw is on the device (no
host sync): the scores of ``C_local`` uniform numbers, positives raised to 2, and their
top-k. ``k`` must be known on the host, so it is ``max(ceil(R C_local), min(B_global,
C_local))`` (the most positives there can be); where that exceeds ``ceil(R C_local)`` (tiny
class counts only) the surplus draws beyond ``max(positives, ceil(R C_local))`` are masked
out of the softmax (``keep``) and left unchanged by the update, so the sample is exactly the
one described. The generator is re-seeded from (seed, rank, step) every step: a resumed run
draws what the uninterrupted one drew, with nothing extra in the checkpoint.

Only the sampled rows of the class weights and of their optimizer state change.
The forward uses a detached copy of the sampled rows as a leaf (no dense (C, D) gradient);
:func:`sampled_rows` then swaps the weight parameter, its gradient and its per-row optimizer
state (SGD momentum, AdamW moments) for those rows around the optimizer's update and writes
them back. Momentum and weight decay therefore never touch an unsampled row, with any
optimizer, fused or not, and the optimizer's state dict stays in the full (C, D) format:
checkpoints are today's. (AdamW's step count is one per parameter, not per row: rows share it.)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facecli.losses import Loss, MarginHead

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (seed, rank, step) (splitmix64): distinct streams per rank and step."""
    x = 0
    for part in (seed, rank, step):
        x = (x ^ (part & _MASK64)) * _MIX[1] & _MASK64
        x = (x + _MIX[0]) & _MASK64
        x ^= x >> 31
    x = (x * _MIX[2]) & _MASK64
    return (x ^ (x >> 29)) & ((1 << 63) - 1)


@dataclass
class Sample:
    """One step's sampled classes: ``index`` (k,) local class ids, ``keep`` (k,) bool or None
    (all kept), and ``rows``, the leaf holding the sampled weights (its grad after backward)."""

    index: Tensor
    keep: Tensor | None
    rows: Tensor


class ClassSampler:
    """Draws a step's classes for one process holding ``num_local`` classes."""

    def __init__(self, rate: float, num_local: int, seed: int, rank: int = 0):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {rate}")
        self.rate, self.num_local, self.seed, self.rank = float(rate), int(num_local), int(seed), int(rank)
        self.by_rate = min(self.num_local, math.ceil(self.rate * self.num_local))
        self.step = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def size(self, batch: int) -> int:
        """Columns drawn for a global batch of ``batch`` samples (known on the host)."""
        return max(self.by_rate, min(batch, self.num_local))

    def draw(self, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """(index, keep) for ``labels`` (global batch, local class ids; -1: another process's class)."""
        device = labels.device
        k = self.size(labels.shape[0])
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed(_step_seed(self.seed, self.rank, self.step))
        score = torch.rand(self.num_local + 1, generator=g, device=device)
        slot = torch.where(labels >= 0, labels, torch.full_like(labels, self.num_local))
        score.scatter_(0, slot, 2.0)  # positives outrank every uniform draw
        top = score[: self.num_local].topk(k)
        keep = None
        if k > self.by_rate:  # more columns than max(positives, by_rate) may need: mask the surplus
            positives = (top.values >= 2.0).sum()
            keep = torch.arange(k, device=device) < positives.clamp_min(self.by_rate)
        return top.indices, keep


def columns_of(labels: Tensor, index: Tensor, num_local: int) -> Tensor:
    """Each label's column in the sampled ``index`` (-1 stays -1), without a host sync."""
    where = torch.full((num_local,), -1, dtype=torch.long, device=index.device)
    where[index] = torch.arange(index.shape[0], device=index.device)
    return torch.where(labels >= 0, where[labels.clamp_min(0)], labels)


def draw_sample(sampler: ClassSampler, weight: Tensor, labels: Tensor) -> tuple[Sample, Tensor]:
    """The step's :class:`Sample` (sampled rows as a fresh leaf) and the labels as its columns."""
    index, keep = sampler.draw(labels)
    rows = weight.detach().index_select(0, index).requires_grad_(True)
    return Sample(index, keep, rows), columns_of(labels, index, sampler.num_local)


def mask_unsampled(logits: Tensor, sample: Sample) -> Tensor:
    """The logits with the surplus columns (``keep`` False) out of the softmax."""
    if sample.keep is None:
        return logits
    return logits.masked_fill(~sample.keep, float("-inf"))


@contextlib.contextmanager
def sampled_rows(weight: torch.nn.Parameter, optimizer: torch.optim.Optimizer, sample: Sample | None):
    """Inside: ``weight`` is its sampled rows, with their gradient and their optimizer state;
    on exit the updated rows (those kept) and state are written back into the full tensors."""
    if sample is None:
        yield
        return
    full = weight.data
    state = optimizer.state[weight]
    full_state = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == full.shape}
    before = full.index_select(0, sample.index)
    weight.data = before.clone()
    weight.grad = sample.rows.grad
    for key, value in full_state.items():
        state[key] = value.index_select(0, sample.index)
    try:
        yield
    finally:
        _write_back(weight, full, before, state, full_state, sample)


def _write_back(weight, full: Tensor, before: Tensor, state: dict, full_state: dict, sample: Sample) -> None:
    keep = None if sample.keep is None else sample.keep.unsqueeze(1)
    rows = weight.data if keep is None else torch.where(keep, weight.data, before)
    full.index_copy_(0, sample.index, rows)
    for key, value in list(state.items()):
        if not (torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == sample.index.shape[0]):
            continue
        target = full_state.get(key)
        if target is None:  # state the update created (AdamW's moments): zeros for the other rows
            target = full_state[key] = torch.zeros_like(full)
        if keep is not None:
            value = torch.where(keep, value, target.index_select(0, sample.index))
        target.index_copy_(0, sample.index, value)
        state[key] = target
    weight.data = full
    weight.grad = None


class SampledMarginHead(Loss):
    """A one-process margin head with Partial FC sampling; the wrapped head is what is saved.

    Checkpoints, hyper-parameters and evaluation see ``inner`` (its state dict and the
    optimizer's entry for its weight are the plain head's), so a sampled run's checkpoint is
    an ordinary one and resumes with or without sampling.
    """

    shardable = True

    def __init__(self, inner: MarginHead, rate: float, seed: int):
        super().__init__()
        self.inner = inner
        self.name, self.label = inner.name, inner.label
        self.needs_global_target_cosines = inner.needs_global_target_cosines
        self.needs_embedding_norm = inner.needs_embedding_norm
        self.batch_statistics = inner.batch_statistics
        self.sampler = ClassSampler(rate, inner.num_classes, seed)
        self.sample: Sample | None = None

    def start_step(self, step: int) -> None:
        self.sampler.step = step

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy over the sampled classes (training); the full head's otherwise."""
        if not (self.training and torch.is_grad_enabled()):
            self.sample = None
            return self.inner.loss(embeddings, labels)
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        self.sample, columns = draw_sample(self.sampler, self.inner.weight, labels)
        cos = self.inner.cosine(embeddings, self.sample.rows)
        norms = self.inner.embedding_norms(embeddings) if self.inner.needs_embedding_norm else None
        logits = mask_unsampled(self.inner.logits_from_cos(cos, columns, norms=norms), self.sample)
        ce = F.cross_entropy(logits, columns)
        penalty = self.inner.norm_penalty(norms) if norms is not None else None  # MagFace's g(a): per sample, not per class
        return ce if penalty is None else ce + penalty.mean()

    def optimizer_rows(self, optimizer: torch.optim.Optimizer):
        sample, self.sample = self.sample, None
        return sampled_rows(self.inner.weight, optimizer, sample)

    def hparams(self) -> dict:
        return self.inner.hparams()

    def full_state_dict(self) -> dict | None:
        return self.inner.full_state_dict()

    def load_full_state_dict(self, state: dict) -> None:
        self.inner.load_full_state_dict(state)

    def follow_global_batch(self, sum_over_ranks) -> None:
        self.inner.follow_global_batch(sum_over_ranks)
