"""Optimizers and learning-rate schedules.

The schedule is a pure function of the global step, recomputed every step, so it has no
state of its own to save: resuming at step k gives exactly the learning rate of step k.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from facecli.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 5e-4, momentum: float = 0.9):
    """SGD (momentum 0.9, weight decay 5e-4, the margin-loss papers' recipe) or AdamW.

    BatchNorm weights and biases get no weight decay: decaying them only hurts.
    """
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels: one launch for all parameters, and they take a found-inf flag that skips
    # the update on the device, so a non-finite step needs no host read (GradScaler works so).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    if name == "sgd":
        return zero_momentum(torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False, fused=fused))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    raise UserError(f"Unknown optimizer {name!r}.", hint=f"Choose one of: {', '.join(OPTIMIZERS)}.")


def zero_momentum(optimizer: torch.optim.SGD) -> torch.optim.SGD:
    """Give every parameter a zero momentum buffer now, before the first step.

    Fused SGD creates its buffers with ``empty_like`` at its first step and has that step's
    kernel fill them; when that step is skipped through ``found_inf`` (GradScaler's fp16
    overflow, StepRunner's non-finite step) they keep uninitialised memory, and the next
    good step adds it to the weights (-3e8 entries, then NaN). With zero buffers every step
    is a "later" step: ``buf = 0.9 * 0 + grad`` equals the first step's ``buf = grad`` exactly.
    (AdamW needs nothing: its moments start as zeros and a skipped step un-counts itself.)
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


class Schedule:
    """Linear warm-up, then cosine decay to zero, step decay (x0.1 at milestones) or constant."""

    def __init__(
        self,
        name: str,
        base_lr: float,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        milestones: Sequence[float] | None = None,
        gamma: float = 0.1,
    ):
        if name not in SCHEDULERS:
            raise UserError(f"Unknown scheduler {name!r}.", hint=f"Choose one of: {', '.join(SCHEDULERS)}.")
        self.name = name
        self.base_lr = base_lr
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), self.total_steps - 1)
        epochs = max(1, round(total_steps / self.steps_per_epoch))
        if milestones is None:
            milestones = sorted({max(1, int(epochs * 0.6)), max(1, int(epochs * 0.85))})
        self.milestone_steps = [int(round(m * self.steps_per_epoch)) for m in milestones]
        self.gamma = gamma

    def lr_at(self, step: int) -> float:
        """The learning rate used for optimizer step number ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.base_lr
        if self.name == "step":
            return self.base_lr * self.gamma ** sum(step >= m for m in self.milestone_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def margin_weight_at(step: int, warmup_steps: int) -> float:
    """The share of the margin applied at optimizer step ``step``: a linear ramp to 1.

    SphereFace (Liu et al., 2017, Sec. 4) anneals its margin logit from plain softmax towards
    the margin because a large margin from scratch does not converge; on small sets every
    margin head collapses the same way (issue 13). A pure function of the step: exact resume.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
