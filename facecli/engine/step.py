"""One training step that never makes the host wait for the device.

Between logging points the loop reads no device value: the flip coins are a hash computed
on the device, normalisation constants are cached there, the loss and a "bad step" flag
accumulate in :class:`DeviceStats`, and a non-finite loss or gradient skips the optimizer
update on the device (fused optimizers take a found-inf flag, as GradScaler uses them).
The host reads the statistics once per ``log_every`` steps, one interval late: the copy is
started non-blocking at one logging point and read at the next, when it has long arrived.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from facecli.data.images import normalize_batch
from facecli.engine import distributed as dist_utils

_MASK32 = 0xFFFFFFFF
HOST_READ = "facecli::host_read"


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 arithmetic, every product below 2**63): identical on every device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def flip_coins(seed: int, step: int, offset: int, count: int, device: torch.device) -> torch.Tensor:
    """Whether sample ``offset + i`` of global batch ``step`` is flipped: a pure function of
    (seed, step, position), computed where the images are, so no host copy is needed."""
    index = torch.arange(offset, offset + count, device=device, dtype=torch.int64)
    key = _hash32(_hash32(torch.full_like(index, seed & _MASK32) ^ (step & _MASK32)) ^ index)
    return (key & 1).bool()


def flip_batch(x: torch.Tensor, seed: int, step: int, offset: int, global_batch: int) -> torch.Tensor:
    """Flip each image with probability 1/2; the coin of sample i of global batch ``step`` is fixed."""
    coins = flip_coins(seed, step, offset, x.shape[0], x.device)
    return torch.where(coins.view(-1, 1, 1, 1), x.flip(3), x)


# The statistics buffer: this epoch's loss sum and count, this interval's, and the first bad
# step with its loss (-1: none). float64, so the epoch sum adds exactly as a Python float
# would, whatever the logging interval: a resumed run reproduces it bit for bit.
EPOCH_SUM, EPOCH_COUNT, INTERVAL_SUM, INTERVAL_COUNT, FIRST_BAD, BAD_LOSS = range(6)


@dataclass
class Interval:
    """What the host learns at a logging point (about the interval that ended ``step``)."""

    step: int
    epoch_sum: float
    epoch_count: int
    mean_loss: float | None
    first_bad: int | None
    bad_loss: float
    images_per_sec: float


class DeviceStats:
    def __init__(self, device: torch.device, epoch_sum: float = 0.0, epoch_count: int = 0):
        self.device = device
        self.buf = torch.zeros(6, dtype=torch.float64, device=device)
        self.buf[EPOCH_SUM], self.buf[EPOCH_COUNT], self.buf[FIRST_BAD] = epoch_sum, epoch_count, -1.0
        self._pending: tuple | None = None  # (host copy, event, step, images, seconds)
        self._t_last, self._images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, bad: torch.Tensor, step: int, images: int) -> None:
        """Count one step's global-batch loss (not a bad one's); remember the first bad step."""
        v = loss.detach().double()
        ok = ~bad
        inc = torch.stack([torch.where(ok, v, 0.0), ok.double()])
        self.buf[EPOCH_SUM : EPOCH_COUNT + 1] += inc
        self.buf[INTERVAL_SUM : INTERVAL_COUNT + 1] += inc
        first = bad & (self.buf[FIRST_BAD] < 0)
        self.buf[BAD_LOSS] = torch.where(first, v, self.buf[BAD_LOSS])
        self.buf[FIRST_BAD] = torch.where(first, float(step), self.buf[FIRST_BAD])
        self._images += images

    def skip(self, images: int) -> None:
        self._images += images

    def start_read(self, step: int) -> Interval | None:
        """Start copying the counters to the host; return the previous interval's, now arrived."""
        previous = self.finish_read()
        now = time.perf_counter()
        if self.device.type == "cuda":
            host = torch.empty(self.buf.shape, dtype=self.buf.dtype, pin_memory=True)
            host.copy_(self.buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = self.buf.clone(), None
        self._pending = (host, event, step, self._images, now - self._t_last)
        self._t_last, self._images = now, 0
        self.buf[INTERVAL_SUM : INTERVAL_COUNT + 1] = 0.0
        return previous

    def finish_read(self) -> Interval | None:
        """The interval whose copy was started last (waits for it), or None."""
        if self._pending is None:
            return None
        host, event, step, images, seconds = self._pending
        self._pending = None
        with torch.profiler.record_function(HOST_READ):  # the loop's one read per interval, named for profiling
            if event is not None:
                event.synchronize()
            v = host.numpy().tolist()
        count = int(v[INTERVAL_COUNT])
        return Interval(
            step, v[EPOCH_SUM], int(v[EPOCH_COUNT]), v[INTERVAL_SUM] / count if count else None,
            None if v[FIRST_BAD] < 0 else int(v[FIRST_BAD]), v[BAD_LOSS], images / max(seconds, 1e-9),
        )

    def flush(self, step: int) -> list[Interval]:
        """Everything up to now, read synchronously (epoch ends, saves, stops)."""
        return [i for i in (self.start_read(step), self.finish_read()) if i is not None]

    def new_epoch(self) -> None:
        self.buf[EPOCH_SUM : EPOCH_COUNT + 1] = 0.0


class StepRunner:
    """Runs optimizer steps on the device: input, forward, backward, a guarded update."""

    def __init__(self, parts, forward_module, cfg, world, device: torch.device, amp: torch.dtype | None):
        self.parts, self.forward_module, self.cfg, self.world = parts, forward_module, cfg, world
        self.device, self.amp = device, amp
        self.params = [p for g in parts.optimizer.param_groups for p in g["params"]]
        self.net_params = list(parts.net.parameters())  # clipped; the head is not (arcface_torch's rule)
        self.one = torch.ones((), device=device)
        self._margin_weight: float | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; returns (the global-batch loss, whether the update was skipped), both on the device."""
        loss, global_loss = self.forward(images, labels, step, sizes)
        self.parts.scaler.scale(loss).backward()
        with self.parts.head.optimizer_rows(self.parts.optimizer):  # Partial FC: only the sampled rows
            return global_loss, self._update(global_loss)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward half: (this process's loss to differentiate, the global-batch loss, detached)."""
        x = self._inputs(images, step)
        y = labels.to(self.device, non_blocking=True)
        opt = self.parts.optimizer
        self.parts.schedule.apply(opt, step)
        self._set_margin_weight(step)
        self.parts.head.start_step(step)
        opt.zero_grad(set_to_none=True)
        if self.parts.head.sharded:
            self.parts.head.batch_sizes = sizes  # known on the host: no gather of sizes in the forward
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.forward_module(x, y)
        global_loss = loss.detach()
        if self.world.distributed and not self.parts.head.sharded:
            global_loss = dist_utils.mean_over_ranks(global_loss)
        return loss, global_loss

    def _inputs(self, images: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.cfg
        x = normalize_batch(images.to(self.device, non_blocking=True), self.parts.preprocess)
        x = flip_batch(x, cfg.seed, step, self.world.rank * cfg.batch_size, cfg.batch_size * self.world.world_size)
        return x.contiguous(memory_format=torch.channels_last) if self.parts.channels_last else x

    def _set_margin_weight(self, step: int) -> None:
        from facecli.engine.optim import margin_weight_at

        weight = margin_weight_at(step, self.parts.margin_warmup_steps)
        if weight != self._margin_weight:
            for module in self.parts.model.modules():
                if hasattr(module, "set_margin_weight"):
                    module.set_margin_weight(weight)
            self._margin_weight = weight

    def _clip(self) -> None:
        """Scale the network's gradients to a total norm of at most ``clip_grad_norm``, on the device (no sync)."""
        torch.nn.utils.clip_grad_norm_(self.net_params, self.cfg.clip_grad_norm, error_if_nonfinite=False)

    def _update(self, global_loss: torch.Tensor) -> torch.Tensor:
        """Apply the update unless the loss or a gradient is not finite (decided on the device)."""
        opt, scaler = self.parts.optimizer, self.parts.scaler
        loss_bad = ~torch.isfinite(global_loss)
        if scaler.is_enabled():  # fp16: the scaler skips overflowing steps itself (and lowers its scale)
            if self.cfg.clip_grad_norm:
                scaler.unscale_(opt)
                self._clip()
            scaler.step(opt)
            scaler.update()
            return loss_bad
        found = torch.zeros((), device=self.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.one)
        if self.parts.head.sharded:  # each rank holds other head rows: skip everywhere or nowhere
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        bad = (found > 0) | loss_bad
        if self.cfg.clip_grad_norm:
            self._clip()
        opt.grad_scale, opt.found_inf = None, bad.float()
        opt.step()
        return bad
