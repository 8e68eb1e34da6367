"""The one training loop under every loss.

A step: uint8 images -> device -> normalise -> random horizontal flip -> (channels_last,
autocast) -> embedding network -> loss (margin head + cross-entropy, triplet, ...) ->
backward (GradScaler for fp16) -> guarded update -> lr of the next step. The step reads no
device value (:mod:`facecli.engine.step`); the host reads the statistics once per
``log_every`` steps.

The parts, each with one job: :mod:`~facecli.engine.setup` builds the run from its config,
:mod:`~facecli.engine.runs` names and creates its folder, :mod:`~facecli.engine.checkpoint_manager`
writes and rotates checkpoints and captures RNG state, :mod:`~facecli.engine.step` runs one
step, :mod:`~facecli.engine.hooks` reports and evaluates, :mod:`~facecli.engine.stops` words
why a run stopped. :class:`Trainer` runs the loop over epochs and steps and owns the position
(:class:`~facecli.engine.state.TrainState`).

Exact resume. Everything random is a pure function of (seed, epoch, step): the batch
order (samplers), the flips (a hash of the position) and the schedule. The checkpoint holds
model, loss (CurricularFace's ``t`` included), optimizer, scaler, every rank's torch and
CUDA RNG and the position, so a run stopped after any step and resumed computes the same
steps in the same order as one that never stopped.

Faults. SIGINT/SIGTERM stop at the next step boundary, write ``latest.pt`` there and stop.
A non-finite loss or gradient never changes the weights (the update is skipped on the
device) and stops the run at the next read, before any checkpoint is written after it. A
failed save stops the run: training on without checkpoints would only lose more work later.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from facecli.data.device_decode import to_device_batch
from facecli.data.folders import collate_samples
from facecli.data.workers import resolve_workers
from facecli.engine import distributed as dist_utils
from facecli.engine import elastic, runs, stops
from facecli.engine.checkpoint import load_checkpoint, new_checkpoint
from facecli.engine.checkpoint_manager import CheckpointManager, capture_rng, restore_rng
from facecli.engine.config import TrainConfig, with_absolute_paths
from facecli.engine.device import configure_backends, memory_report, resolve_device
from facecli.engine.hooks import HookContext, Hooks, default_hooks
from facecli.engine.step import DeviceStats, Interval, StepRunner
from facecli.engine.finetune import BackboneFreeze
from facecli.engine.setup import bare_net, build_parts, wrap_for_ddp
from facecli.engine.state import TrainState
from facecli.engine.tracking import MetricsFile, Tracker, scrub
from facecli.errors import UserError
from facecli.hardware import amp_dtype

STEP = "facecli::step"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs: int
    last_loss: float | None
    min_loss: float | None
    evaluation: dict = field(default_factory=dict)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume_from: Path | None = None,
        resume_checkpoint: dict | None = None,
        tracker_factory: Callable | None = None,
        log: Callable[[str], None] = print,
        warn: Callable[[str], None] = print,
        progress_factory: Callable | None = None,
    ):
        self.cfg, self.log, self.warn, self.progress_factory = cfg, log, warn, progress_factory
        self.device, self.world = self._device_and_world(cfg.device)
        self.amp_dtype = amp_dtype(self.device, cfg.amp, cfg.amp_dtype)
        # ``resume_checkpoint``: the dict of ``resume_from`` when the caller has read it already.
        self.resume_ckpt = resume_checkpoint
        if resume_from is None and resume_checkpoint is None:
            resume_from = self._continue_after_restart(cfg)
        if resume_from and self.resume_ckpt is None:
            self.resume_ckpt = load_checkpoint(resume_from, expect_model=cfg.model)
        self.parts = build_parts(cfg, self.world, self.device, self.amp_dtype, self.resume_ckpt, warn)
        if cfg.freeze_backbone_epochs and self.world.distributed:
            raise UserError("--freeze-backbone-epochs trains in one process for now (DDP fixes the trained parameters when it starts).", hint="Fine-tune without torchrun, or without freezing.")
        self.freeze = BackboneFreeze(self.parts.net, cfg.freeze_backbone_epochs)
        self.state = TrainState()
        if self.resume_ckpt:
            self._restore(self.resume_ckpt)
        self.run_dir, self.run_name = self._run_location(resume_from)
        cfg.run_name = self.run_name
        module = wrap_for_ddp(self.parts, self.world, self.device, cfg.sync_bn) if self.world.distributed else self.parts.model
        self.forward_module = torch.compile(module) if cfg.compile else module
        self.checkpoints = CheckpointManager(self.run_dir, self.world, cfg.keep_epochs)
        self.tracker = self._tracker(tracker_factory)
        self._stop_signal: int | None = None
        self._bad_seen: dict[str, None] = {}  # unreadable files met (each is met again every epoch)
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ public face
    @property
    def net(self):
        return bare_net(self.parts)

    @property
    def preprocess(self):
        return self.parts.preprocess

    @property
    def steps_per_epoch(self) -> int:
        return self.parts.steps_per_epoch

    @property
    def step(self) -> int:
        return self.state.step

    def embedder(self):
        """The network as evaluation uses it (same device, precision and workers as training)."""
        from facecli.evaluation.embedding import Embedder

        cfg = self.cfg
        return Embedder(self.net, self.preprocess, self.device, cfg.flip, cfg.eval_batch_size, self._workers(), cfg.amp)

    # ------------------------------------------------------------------ building
    @staticmethod
    def _device_and_world(name: str):
        device = resolve_device(name)
        world = dist_utils.init(device)
        if world.distributed and device.type == "cuda":
            device = resolve_device(f"cuda:{dist_utils.local_device_index(world.local_rank)}")
        configure_backends(device)
        return device, world

    def _continue_after_restart(self, cfg: TrainConfig) -> Path | None:
        """After a torchrun restart (``--max-restarts``): the latest.pt of the run this command
        started, to continue from (:mod:`facecli.engine.elastic`); rank 0 decides for all."""
        restarts = elastic.restart_count()
        if self.world.distributed:  # agents on other nodes may count the restart differently
            restarts = max(dist_utils.gather_objects(restarts, self.world))
        if restarts == 0:
            return None
        found, error = None, None
        if self.world.is_main:
            try:
                found = elastic.run_to_continue(cfg)
            except UserError as e:
                error = (e.message, e.hint)
        found, error = dist_utils.broadcast_object((found, error), self.world)
        if error:
            raise UserError(error[0], hint=error[1])
        if found is None:
            return None
        if found.checkpoint is None:  # lost before its first checkpoint: the same run starts again
            cfg.run_name = found.run_dir.name
        return found.checkpoint

    def _run_location(self, resume_from: Path | None) -> tuple[Path, str]:
        if resume_from:
            run_dir = Path(resume_from).resolve().parent
            return run_dir, run_dir.name
        # rank 0's timestamp on every rank (their clocks may straddle a second)
        name = dist_utils.broadcast_object(self.cfg.run_name or runs.default_run_name(), self.world)
        return runs.new_run_dir(self.cfg.checkpoints_dir, self.cfg.model, name, check_free=self.world.is_main), name

    def _tracker(self, factory) -> Tracker:
        if not self.world.is_main:
            return Tracker(None)
        if factory:
            return factory(self.cfg, self.run_dir, self.run_name, self.world)
        return Tracker(MetricsFile(self.run_dir / "metrics.jsonl"))

    def _workers(self) -> int:
        return resolve_workers(self.cfg.workers, self.world.local_world_size)

    # ------------------------------------------------------------------ state
    def _restore(self, ckpt: dict) -> None:
        parts = self.parts
        parts.net.load_state_dict(ckpt["net_state"])
        if ckpt.get("head_state") is not None:
            parts.head.load_full_state_dict(ckpt["head_state"])
        parts.model.to(self.device)
        parts.head.scatter_optimizer_state(parts.optimizer, ckpt["optimizer_state"])
        if ckpt.get("scaler_state"):
            parts.scaler.load_state_dict(ckpt["scaler_state"])
        self.state = TrainState.from_checkpoint(ckpt)
        if ckpt.get("steps_per_epoch") not in (None, parts.steps_per_epoch):
            raise UserError(
                f"The checkpoint's epochs had {ckpt['steps_per_epoch']} steps but this setup gives {parts.steps_per_epoch}.",
                hint="Resume with the same batch size, data and number of processes as the run.",
            )
        restore_rng(ckpt.get("rng") or {}, self.world, self.device)

    def _checkpoint(self) -> dict | None:
        """This run's state as a checkpoint dict (every rank calls it: a sharded head gathers)."""
        parts, head = self.parts, self.parts.head
        rng = capture_rng(self.world, self.device)
        head_state = head.full_state_dict()
        optimizer_state = head.gather_optimizer_state(parts.optimizer)
        if not self.world.is_main:
            return None
        net = self.net
        return new_checkpoint(
            model=self.cfg.model,
            net=net.config(),
            net_state={k: v.detach().cpu() for k, v in net.state_dict().items()},
            head={"name": self.cfg.model, "num_classes": len(parts.classes), "hparams": head.hparams()},
            head_state=head_state or None,
            optimizer_state=optimizer_state,
            scaler_state=parts.scaler.state_dict(),
            preprocess=parts.preprocess.to_dict(),
            classes=list(parts.classes),
            train_config=scrub(self.cfg.to_dict()),
            steps_per_epoch=parts.steps_per_epoch,
            rng=rng,
            world_size=self.world.world_size,
            init_from=parts.init_from,
            **self.state.to_checkpoint(),
        )

    def _save(self, names: list[str], epoch_file: str | None = None) -> None:
        self._read(self.stats.flush(self.state.step))  # a bad step since the last read stops before any save
        self.checkpoints.save(self._checkpoint, names, epoch_file)

    # ------------------------------------------------------------------ run directory
    def _prepare_run_dir(self) -> None:
        if not self.world.is_main:
            return
        runs.create_run_dir(self.run_dir, self.cfg.checkpoints_dir)
        self.checkpoints.clear_temporaries()
        parts = self.parts
        record = {
            "config": scrub(with_absolute_paths(self.cfg.to_dict())),
            "run_name": self.run_name,
            "classes": len(parts.classes),
            "images": len(parts.dataset),
            "dataset": parts.dataset.describe(),
            "preprocess": parts.preprocess.to_dict(),
            "world_size": self.world.world_size,
            **({"elastic_job_id": elastic.job_id()} if elastic.job_id() else {}),  # found again after a torchrun restart
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
            "init_from": parts.init_from,  # fine-tuning: where the starting weights came from
        }
        runs.write_run_record(self.run_dir, self.cfg, record)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum
            if self.world.is_main:
                self.warn(f"{signal.Signals(signum).name} received: finishing this step and saving latest.pt (again to abort without saving).")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------------ loop
    def _loader(self):
        workers = self._workers()
        kwargs = dict(
            batch_sampler=self.parts.sampler,
            num_workers=workers,
            collate_fn=collate_samples,
            pin_memory=self.device.type == "cuda",
            # Each epoch's iterator draws a seed; from its own generator, not the global torch
            # RNG, whose state (dropout) is saved and restored for exact resume.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
        return torch.utils.data.DataLoader(self.parts.dataset, **kwargs)

    def _hook_context(self) -> HookContext:
        return HookContext(
            cfg=self.cfg, state=self.state, run_dir=self.run_dir, run_name=self.run_name, steps_per_epoch=self.steps_per_epoch,
            tracker=self.tracker, log=self.log, warn=self.warn, embedder=self.embedder, net=self.net,
            dataset=self.parts.dataset, preprocess=self.preprocess, device=self.device,
        )

    def run(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train until ``cfg.epochs`` are done (or a signal, or ``stop_after_steps`` more steps)."""
        self._prepare_run_dir()
        dist_utils.barrier(self.world)
        previous = self._install_signal_handlers()
        self.hooks = default_hooks(self.progress_factory) if self.world.is_main else Hooks([])
        self.ctx = self._hook_context()
        self.stats = DeviceStats(self.device, self.state.epoch_loss_sum, self.state.epoch_loss_count)
        self.runner = StepRunner(self.parts, self.forward_module, self.cfg, self.world, self.device, self.amp_dtype)
        try:
            self._announce()
            finished = self._train(self._loader(), stop_after_steps)
            result = TrainResult(self.run_dir, self.state.step, self.state.epoch, self.last_loss, self.state.min_loss)
            if finished and self.cfg.eval:
                result.evaluation = self.hooks.train_end(self.ctx)
            dist_utils.barrier(self.world)
            return result
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._finish()

    def _announce(self) -> None:
        cfg, s = self.cfg, self.state
        if not self.world.is_main:
            return
        if self.resume_ckpt is not None:
            self.log(f"Resuming {cfg.model} run {self.run_dir} at epoch {s.epoch + 1}, batch {s.batch_in_epoch}, step {s.step}.")
            return
        procs = f" x{self.world.world_size}" if self.world.distributed else ""
        precision = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        self.log(
            f"Training {cfg.model} ({cfg.backbone}, {cfg.embedding_dim}-d) on {self.parts.dataset.describe()}; "
            f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {self.device}{procs}, {precision}. Run: {self.run_dir}"
        )

    def _train(self, loader, stop_after: int | None) -> bool:
        """The epochs; False when stopped early by ``stop_after`` (a signal raises TrainingStopped)."""
        done = 0
        while self.state.epoch < self.cfg.epochs:
            self.parts.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            self.hooks.epoch_start(self.ctx)
            for images, labels, bad in loader:
                if self.cfg.decode == "gpu":
                    images, labels, bad = to_device_batch(images, labels, bad, self.preprocess, self.device)
                self._note_bad_images(bad)
                sizes, stop = dist_utils.agree(self.world, images.shape[0], self._stop_signal is not None)
                if stop:
                    self._stop_here()
                self._step(images, labels, sizes)
                done += 1
                if stop_after is not None and done >= stop_after:
                    self._stop_here(by_limit=True)
                    return False
                every = self.cfg.checkpoint_every
                if every and self.state.step % every == 0 and self.state.batch_in_epoch < self.steps_per_epoch:
                    self._save([runs.LATEST])
            if self.state.batch_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
        return True

    def _step(self, images: torch.Tensor, labels: torch.Tensor, sizes: tuple[int, ...]) -> None:
        with torch.profiler.record_function(STEP):  # named for profiling: what runs per step, reads included
            self._step_body(images, labels, sizes)

    def _step_body(self, images: torch.Tensor, labels: torch.Tensor, sizes: tuple[int, ...]) -> None:
        s = self.state
        n = sum(sizes)
        if min(sizes) < 2:  # a batch that lost its images to decode errors: every rank skips it
            self.stats.skip(n)
        else:
            self.freeze.apply(s.epoch)
            try:
                loss, bad = self.runner(images, labels, s.step, sizes)
            except torch.OutOfMemoryError as e:
                raise stops.out_of_memory(s.step + 1, self.cfg.batch_size, self.device, memory_report(self.device), self.run_dir) from e
            self.stats.add(loss, bad, s.step, n)
        s.step += 1
        s.batch_in_epoch += 1
        if s.step % self.cfg.log_every == 0:
            self._read([self.stats.start_read(s.step)])
        self.hooks.step_end(self.ctx)

    def _read(self, intervals: list[Interval | None]) -> None:
        """Take in what the device counted: stop on a bad step, else log the intervals."""
        for it in intervals:
            if it is None:
                continue
            if it.first_bad is not None:
                raise stops.bad_step(it.first_bad, it.bad_loss, self.steps_per_epoch, self.run_dir, self.cfg.lr)
            self.state.epoch_loss_sum, self.state.epoch_loss_count = it.epoch_sum, it.epoch_count
            if it.mean_loss is not None:
                self.last_loss = it.mean_loss
                record = {
                    "loss": it.mean_loss, "lr": self.parts.schedule.lr_at(it.step - 1), "images_per_sec": it.images_per_sec,
                    "epoch": it.step / self.steps_per_epoch, "step": it.step,
                }
                self.hooks.interval(self.ctx, record)

    def _end_epoch(self) -> None:
        s = self.state
        self._read(self.stats.flush(s.step))
        mean, improved = s.end_epoch(final_head=self._final_head_epoch(s.epoch))
        self.stats.new_epoch()
        added = self.hooks.epoch_end(self.ctx, s.epoch)
        names = [runs.LATEST] + ([runs.MIN_LOSS] if improved else []) + list(added.names)
        self.checkpoints.save(self._checkpoint, names, epoch_file=runs.epoch_file(s.epoch))
        record = {"epoch": s.epoch, "epoch_loss": mean, **added.figures, "min_so_far": improved}
        self.hooks.epoch_saved(self.ctx, record)
        dist_utils.barrier(self.world)

    def _final_head_epoch(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ran with the full margin and scale from its first step."""
        from facecli.engine.optim import margin_weight_at

        return margin_weight_at(epoch * self.steps_per_epoch, self.parts.margin_warmup_steps) >= 1.0

    def _stop_here(self, by_limit: bool = False) -> None:
        """Save at this step boundary; a signal then ends the run with its exit code."""
        if self.state.batch_in_epoch >= self.steps_per_epoch:
            self._end_epoch()
        else:
            self._save([runs.LATEST])
        dist_utils.barrier(self.world)
        if not by_limit:
            raise stops.stopped_by_signal(self._stop_signal, self.state, self.cfg.model, self.run_name)

    def _note_bad_images(self, reasons: list[str]) -> None:
        for reason in reasons:
            self._bad_seen.setdefault(reason, None)

    def _finish(self) -> None:
        if self.world.is_main:
            bad = list(self._bad_seen)
            if bad:
                self.warn(f"Skipped {len(bad)} unreadable image(s) during training, e.g. {'; '.join(bad[:3])}. Delete or re-encode them.")
            self._save_loss_picture()
        if hasattr(self, "hooks"):
            self.hooks.close(self.ctx)
        self.tracker.close()
        dist_utils.shutdown(self.world)

    def _save_loss_picture(self) -> None:
        from facecli.evaluation.reports import save_loss_curve

        try:
            save_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except (OSError, ValueError, RuntimeError) as e:  # a picture must never hide the run's outcome
            self.warn(f"Could not draw {self.run_dir / 'loss.png'}: {e}")

