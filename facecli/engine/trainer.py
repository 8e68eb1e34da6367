"""The one training loop under all five models.

A step: uint8 images -> device -> normalise -> random horizontal flip -> (channels_last,
autocast) -> embedding network -> margin head + cross-entropy, or semi-hard triplet loss
-> backward (GradScaler for fp16) -> optimizer -> lr of the next step.

Exact resume. Everything random is a pure function of (seed, epoch, step): the batch
order (samplers), the flips (a generator seeded per step) and the schedule (a function of
the step). The checkpoint holds model, head (CurricularFace's ``t`` included), optimizer,
scaler, the torch RNG (dropout) and the position (epoch, batch within the epoch, global
step, the epoch's running loss). A run stopped after any step and resumed computes the
same steps in the same order as one that never stopped.

Faults. SIGINT/SIGTERM finish the current step, write ``latest.pt`` at that step and stop.
A non-finite loss stops the run before the bad update and leaves the last checkpoint as
it was. A failed save (disk full, permissions) stops the run: training on without
checkpoints would only lose more work later.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from facecli.backbones import EmbeddingNet
from facecli.data import build_train_dataset
from facecli.data.folders import collate_samples, read_identity_list
from facecli.data.images import Preprocess, normalize_batch
from facecli.data.samplers import PKBatchSampler, ShuffledBatchSampler
from facecli.engine import distributed as dist_utils
from facecli.engine.checkpoint import load_checkpoint, new_checkpoint, save_checkpoint
from facecli.engine.config import TrainConfig
from facecli.engine.optim import Schedule, build_optimizer
from facecli.engine.tracking import MetricsFile, Tracker, scrub
from facecli.errors import TrainingStopped, UserError
from facecli.losses import build_head, semihard_triplet_loss

STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {name!r} is not a device.", hint="Use auto, cpu, cuda or cuda:N.") from e
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported.", hint="Use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but CUDA is not available on this machine.", hint="Use --device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; fp32 (None) on the CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


def flip_batch(x: torch.Tensor, seed: int, step: int, offset: int, global_batch: int) -> torch.Tensor:
    """Flip each image with probability 1/2; the coin of sample i of global batch ``step`` is fixed."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 2]).generate_state(1)[0]))
    coins = torch.rand(global_batch, generator=g)[offset : offset + x.shape[0]] < 0.5
    return torch.where(coins.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


class FaceModelForTraining(nn.Module):
    """Embedding network plus its loss: what DistributedDataParallel wraps."""

    def __init__(self, net: EmbeddingNet, head: nn.Module | None, triplet_margin: float):
        super().__init__()
        self.net = net
        self.head = head
        self.triplet_margin = triplet_margin

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.net(x)
        if self.head is None:
            return semihard_triplet_loss(emb.float(), labels, margin=self.triplet_margin)
        if getattr(self.head, "sharded", False):
            return self.head.loss(emb, labels)  # the global-batch loss, same on every rank
        return F.cross_entropy(self.head(emb, labels), labels)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs: int
    last_loss: float | None
    min_loss: float | None
    evaluation: dict = field(default_factory=dict)


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume_from: Path | None = None,
        resume_checkpoint: dict | None = None,
        tracker_factory: Callable[[TrainConfig, Path, str, "dist_utils.World"], Tracker] | None = None,
        log: Callable[[str], None] = print,
        warn: Callable[[str], None] = print,
        progress_factory: Callable | None = None,
    ):
        self.cfg = cfg
        self.log = log
        self.warn = warn
        self.progress_factory = progress_factory
        self.device = resolve_device(cfg.device)
        self.world = dist_utils.init(self.device.type)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.amp_dtype = amp_dtype(self.device, cfg.amp)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self._stop_signal: int | None = None
        # ``resume_checkpoint``: the dict of ``resume_from`` when the caller has loaded it already
        # (a ResNet-50 run over 10k identities is ~0.3 GB: read it once, not twice).
        self.resume_ckpt = resume_checkpoint
        if resume_from and self.resume_ckpt is None:
            self.resume_ckpt = load_checkpoint(resume_from, expect_model=cfg.model)

        torch.manual_seed(cfg.seed)
        classes = self.resume_ckpt["classes"] if self.resume_ckpt else None
        identities = read_identity_list(cfg.identities_file) if cfg.identities_file and classes is None else None
        if self.resume_ckpt:
            self.preprocess = Preprocess.from_dict(self.resume_ckpt["preprocess"])
        else:
            mean_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if cfg.pretrained else ((0.5,) * 3, (0.5,) * 3)
            self.preprocess = Preprocess(cfg.image_size, cfg.crop_fraction, *mean_std)
        self.dataset = build_train_dataset(Path(cfg.train_dir), self.preprocess, classes=classes, identities=identities)
        self.classes = list(self.dataset.classes)
        empty = list(getattr(self.dataset, "empty_files", []))
        if empty and self.world.is_main:
            self.warn(f"Skipped {len(empty)} empty image file(s), e.g. {', '.join(empty[:3])}. Delete or replace them.")

        self.net = EmbeddingNet(
            cfg.backbone, cfg.embedding_dim, normalize=cfg.model == "facenet", pretrained=cfg.pretrained and not self.resume_ckpt, dropout=cfg.dropout,
            image_size=cfg.image_size,
        )
        self.head = None
        if cfg.model != "facenet":
            if cfg.sharded_head and self.world.distributed:
                from facecli.engine.sharded_head import ShardedMarginHead

                self.head = ShardedMarginHead(cfg.model, cfg.embedding_dim, len(self.classes), self.world, **cfg.head_hparams())
            else:
                self.head = build_head(cfg.model, cfg.embedding_dim, len(self.classes), **cfg.head_hparams())
        triplet_margin = cfg.margin if (cfg.model == "facenet" and cfg.margin is not None) else 0.2
        self.model = FaceModelForTraining(self.net, self.head, triplet_margin).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.world.distributed:
            # Same initial weights everywhere (DDP also broadcasts rank 0's), then per-rank
            # randomness (dropout) that does not repeat the same mask on every rank.
            torch.manual_seed(cfg.seed + self.world.rank)

        bs = cfg.batch_size
        if cfg.model == "facenet":
            self.sampler = PKBatchSampler(self.dataset.labels, bs, cfg.images_per_identity, cfg.seed, self.world.rank, self.world.world_size)
        else:
            self.sampler = ShuffledBatchSampler(len(self.dataset), bs, cfg.seed, self.world.rank, self.world.world_size)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
        self.schedule = Schedule(
            cfg.scheduler, cfg.lr, cfg.epochs * self.steps_per_epoch, self.steps_per_epoch, cfg.warmup_epochs, cfg.milestones
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        # position
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.min_loss: float | None = None
        self.best_dev_accuracy: float | None = None
        self.bad_images = 0  # distinct unreadable files seen (each is met again every epoch)
        self.bad_examples: list[str] = []
        self._bad_seen: set[str] = set()
        self.history: list[dict] = []
        self.threshold: float | None = None

        if self.resume_ckpt:
            self._restore(self.resume_ckpt)
            self.run_dir = Path(resume_from).resolve().parent
            self.run_name = self.run_dir.name
        else:
            # rank 0's timestamp on every rank (their clocks may straddle a second)
            self.run_name = dist_utils.broadcast_object(cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"), self.world)
            if not self.run_name or "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
                raise UserError(f"--run-name {self.run_name!r} is not a plain name.", hint="Use letters, digits, '-', '_' or '.'.")
            self.run_dir = Path(cfg.checkpoints_dir) / cfg.model / self.run_name
            if self.world.is_main and (self.run_dir / "latest.pt").exists():
                raise UserError(
                    f"Run directory {str(self.run_dir)!r} already holds a run.",
                    hint=f"Continue it with `facecli resume {cfg.model} --run {self.run_name}` or choose another --run-name.",
                )
        self.cfg.run_name = self.run_name

        self.train_module: nn.Module = self.model
        if self.world.distributed:
            self._wrap_ddp()
        self.forward_module = torch.compile(self.train_module) if cfg.compile else self.train_module

        self.tracker = (
            tracker_factory(cfg, self.run_dir, self.run_name, self.world)
            if (tracker_factory and self.world.is_main)
            else Tracker(MetricsFile(self.run_dir / "metrics.jsonl") if self.world.is_main else None)
        )

    # ----------------------------------------------------------------- state
    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # BatchNorm statistics over the global batch (SyncBatchNorm on CUDA, an all-reduce
        # BatchNorm on gloo): N processes then compute what one process with the global batch would.
        if getattr(self.head, "sharded", False):
            # Each rank owns its slice of the class weights; only the network is replicated. The
            # sharded loss is the global-batch mean on every rank and each rank's backward gives
            # its part of the network's gradient: DDP must sum, not average.
            self.model.net = DDP(dist_utils.convert_sync_batchnorm(self.model.net, self.device), device_ids=ids)
            self.model.net.register_comm_hook(None, dist_utils.allreduce_sum_hook)
            self.train_module = self.model
        else:
            self.model = dist_utils.convert_sync_batchnorm(self.model, self.device)
            self.train_module = DDP(self.model, device_ids=ids)

    def _net_state(self) -> dict:
        net = self.model.net.module if hasattr(self.model.net, "module") else self.model.net
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def _head_state(self) -> dict | None:
        if self.head is None:
            return None
        if hasattr(self.head, "full_state_dict"):
            return self.head.full_state_dict()
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}

    def _checkpoint(self) -> dict:
        net = self.model.net.module if hasattr(self.model.net, "module") else self.model.net
        rng = {"torch": torch.get_rng_state()}
        if self.world.distributed and getattr(self, "_rng_per_rank", None):
            rng["torch_per_rank"] = list(self._rng_per_rank)
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return new_checkpoint(
            model=self.cfg.model,
            net=net.config(),
            net_state=self._net_state(),
            head={
                "name": self.cfg.model,
                "num_classes": len(self.classes),
                "hparams": self.head.hparams() if self.head is not None else {"margin": self.model.triplet_margin},
            },
            head_state=self._head_state(),
            optimizer_state=self._sharded_optimizer_state() if getattr(self.head, "sharded", False) else self.optimizer.state_dict(),
            scaler_state=self.scaler.state_dict(),
            preprocess=self.preprocess.to_dict(),
            classes=list(self.classes),
            train_config=scrub(self.cfg.to_dict()),
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            step=self.step,
            steps_per_epoch=self.steps_per_epoch,
            epoch_loss_sum=self.epoch_loss_sum,
            epoch_loss_count=self.epoch_loss_count,
            min_loss=self.min_loss,
            best_dev_accuracy=self.best_dev_accuracy,
            threshold=self.threshold,
            rng=rng,
            world_size=self.world.world_size,
        )

    def _sharded_optimizer_state(self) -> dict:
        return self.head.gather_optimizer_state(self.optimizer)

    def _restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["net_state"])
        if self.head is not None and ckpt.get("head_state") is not None:
            if hasattr(self.head, "load_full_state_dict"):
                self.head.load_full_state_dict(ckpt["head_state"])
            else:
                self.head.load_state_dict(ckpt["head_state"])
        self.model.to(self.device)
        if self.cfg.sharded_head and hasattr(self.head, "scatter_optimizer_state"):
            self.head.scatter_optimizer_state(self.optimizer, ckpt["optimizer_state"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if ckpt.get("scaler_state"):
            self.scaler.load_state_dict(ckpt["scaler_state"])
        self.epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.step = int(ckpt["step"])
        self.epoch_loss_sum = float(ckpt.get("epoch_loss_sum", 0.0))
        self.epoch_loss_count = int(ckpt.get("epoch_loss_count", 0))
        self.min_loss = ckpt.get("min_loss")
        self.best_dev_accuracy = ckpt.get("best_dev_accuracy")
        self.threshold = ckpt.get("threshold")
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise UserError(
                f"The checkpoint's epochs had {ckpt['steps_per_epoch']} steps but this setup gives {self.steps_per_epoch}.",
                hint="Resume with the same batch size, data and number of processes as the run.",
            )
        rng = ckpt.get("rng") or {}
        per_rank = rng.get("torch_per_rank")
        if per_rank and len(per_rank) == self.world.world_size:
            torch.set_rng_state(per_rank[self.world.rank])
        elif "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _save(self, names: list[str], epoch_file: str | None = None) -> None:
        """Write the current state once and link it under every name (all atomic)."""
        if self.world.distributed:
            # every rank's RNG (dropout masks differ per rank), so that resume is exact under DDP too
            states = [None] * self.world.world_size
            torch.distributed.all_gather_object(states, torch.get_rng_state())
            self._rng_per_rank = states
        sharded = getattr(self.head, "sharded", False)
        if not self.world.is_main and not sharded:
            return
        ckpt = self._checkpoint()  # sharded head: gathers weights and optimizer state (every rank takes part)
        if not self.world.is_main:
            return
        first = epoch_file or names[0]
        save_checkpoint(ckpt, self.run_dir / first)
        for name in names:
            if name != first:
                _link_or_copy(self.run_dir / first, self.run_dir / name)
        if epoch_file:
            # Newest last by write time: after `resume --from min_loss` the epochs of the
            # abandoned continuation are older than the ones this run writes now.
            epochs = sorted(self.run_dir.glob("epoch_*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
            keep = {self.run_dir / epoch_file}
            stale = [p for p in epochs if p not in keep][: max(0, len(epochs) - self.cfg.keep_epochs)]
            for old in stale:
                old.unlink(missing_ok=True)

    def _write_config(self) -> None:
        import json

        from facecli.engine.checkpoint import atomic_write

        data = {
            "config": scrub(self.cfg.to_dict()),
            "run_name": self.run_name,
            "classes": len(self.classes),
            "images": len(self.dataset),
            "dataset": self.dataset.describe(),
            "preprocess": self.preprocess.to_dict(),
            "world_size": self.world.world_size,
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
        }
        atomic_write(self.run_dir / "config.json", lambda f: f.write(json.dumps(data, indent=2).encode()))

    # ----------------------------------------------------------------- signals
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum
            if self.world.is_main:
                self.warn(f"{signal.Signals(signum).name} received: finishing this step and saving latest.pt (again to abort without saving).")

        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, handler)
        return previous

    # ----------------------------------------------------------------- loop
    def _loader(self):
        workers = self.cfg.workers
        kwargs = dict(
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_samples,
            pin_memory=self.device.type == "cuda",
            # Each epoch's iterator draws a seed; from its own generator, not the global torch
            # RNG, whose state (dropout) is saved and restored for exact resume.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
        return torch.utils.data.DataLoader(self.dataset, **kwargs)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = images.to(self.device, non_blocking=True)
        y = labels.to(self.device, non_blocking=True)
        x = normalize_batch(x, self.preprocess)
        global_batch = cfg.batch_size * self.world.world_size
        x = flip_batch(x, cfg.seed, self.step, self.world.rank * cfg.batch_size, global_batch)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.schedule.apply(self.optimizer, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.forward_module(x, y)
        return loss

    def run(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train until ``cfg.epochs`` are done (or a signal, or ``stop_after_steps`` more steps)."""
        cfg = self.cfg
        if self.world.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(
                    f"Cannot create the run directory {str(self.run_dir)!r} under CHECKPOINTS_DIR / --checkpoints-dir "
                    f"{str(cfg.checkpoints_dir)!r} ({e.strerror or e}).",
                    hint="Point CHECKPOINTS_DIR or --checkpoints-dir at a writable folder.",
                ) from e
            for stale in self.run_dir.glob(".*.tmp"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
            self._write_config()
        dist_utils.barrier(self.world)
        previous = self._install_signal_handlers()
        loader = self._loader()
        last_loss = None
        steps_this_call = 0
        try:
            if self.resume_ckpt is None and self.world.is_main:
                self.log(
                    f"Training {cfg.model} ({cfg.backbone}, {cfg.embedding_dim}-d) on {self.dataset.describe()}; "
                    f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {self.device}"
                    f"{' x' + str(self.world.world_size) if self.world.distributed else ''}"
                    f"{', ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else ', fp32'}. Run: {self.run_dir}"
                )
            elif self.world.is_main:
                self.log(f"Resuming {cfg.model} run {self.run_dir} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}, step {self.step}.")
            progress = self.progress_factory() if (self.progress_factory and self.world.is_main) else None
            if progress is not None:
                progress.start()
            while self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                task = None
                if progress is not None:
                    task = progress.add_task(
                        f"epoch {self.epoch + 1}/{cfg.epochs}", total=self.steps_per_epoch, completed=self.batch_in_epoch, loss="", lr="", ips=""
                    )
                t_window, n_window = time.perf_counter(), 0
                for images, labels, bad in loader:
                    if bad:
                        for reason in bad:
                            if reason not in self._bad_seen:
                                self._bad_seen.add(reason)
                                if len(self.bad_examples) < 5:
                                    self.bad_examples.append(reason)
                        self.bad_images = len(self._bad_seen)
                    # every rank must agree, or DDP's gradient all-reduce would wait forever
                    if dist_utils.any_true(images.shape[0] < 2, self.world, self.device):
                        loss = None
                    else:
                        loss = self._train_step(images, labels)
                        if self.world.distributed and not getattr(self.head, "sharded", False):
                            # the global-batch loss; a non-finite loss on any rank stops every rank
                            loss_value = dist_utils.mean_over_ranks(loss.detach(), self.world)
                        else:
                            loss_value = float(loss.detach())
                        if not math.isfinite(loss_value):
                            raise TrainingStopped(
                                f"Loss became {loss_value} at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1}); "
                                f"stopped before the bad update. The last good checkpoint in {self.run_dir} is kept. "
                                f"Try a lower learning rate (e.g. --lr {cfg.lr / 10:g}) and resume or restart.",
                                exit_code=4,
                            )
                        self.scaler.scale(loss).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        last_loss = loss_value
                        self.epoch_loss_sum += loss_value
                        self.epoch_loss_count += 1
                    self.step += 1
                    self.batch_in_epoch += 1
                    steps_this_call += 1
                    n_window += images.shape[0] * self.world.world_size
                    if self.world.is_main and (self.step % cfg.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch):
                        now = time.perf_counter()
                        ips = n_window / max(now - t_window, 1e-9)
                        t_window, n_window = now, 0
                        lr = self.schedule.lr_at(self.step - 1)
                        self.tracker.log({"loss": last_loss, "lr": lr, "images_per_sec": ips, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch}, self.step)
                        if task is not None:
                            progress.update(task, loss=f"loss {last_loss:.4f}" if last_loss is not None else "", lr=f"lr {lr:.2e}", ips=f"{ips:,.0f} img/s")
                    if task is not None:
                        progress.advance(task)
                    stop = dist_utils.any_true(self._stop_signal is not None, self.world, self.device)
                    limit = stop_after_steps is not None and steps_this_call >= stop_after_steps
                    if stop or limit:
                        if self.batch_in_epoch >= self.steps_per_epoch:
                            self._end_epoch()
                        else:
                            self._save(["latest.pt"])
                        dist_utils.barrier(self.world)
                        if stop:
                            code = STOP_EXIT_CODES.get(self._stop_signal or signal.SIGINT, 130)
                            raise TrainingStopped(
                                f"Stopped at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch}); "
                                f"latest.pt saved. Continue with `facecli resume {cfg.model} --run {self.run_name} --from latest`.",
                                exit_code=code,
                            )
                        return self._result(last_loss)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                        self._save(["latest.pt"])
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch()
                if task is not None:
                    progress.remove_task(task)
            if progress is not None:
                progress.stop()
            result = self._result(last_loss)
            if cfg.eval and self.world.is_main:
                result.evaluation = self._final_evaluation()
            dist_utils.barrier(self.world)
            return result
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.bad_images and self.world.is_main:
                self.warn(
                    f"Skipped {self.bad_images} unreadable image(s) during training, e.g. {'; '.join(self.bad_examples[:3])}. "
                    "Delete or re-encode them."
                )
            if self.world.is_main:
                self._save_loss_picture()
            self.tracker.close()

    def _save_loss_picture(self) -> None:
        from facecli.evaluation.reports import save_loss_curve

        try:
            save_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except (OSError, ValueError, RuntimeError) as e:  # a picture must never hide the run's outcome
            self.warn(f"Could not draw {self.run_dir / 'loss.png'}: {e}")

    def _end_epoch(self) -> None:
        cfg = self.cfg
        mean_loss = self.epoch_loss_sum / max(1, self.epoch_loss_count)
        finished = self.epoch + 1
        record = {"epoch": finished, "epoch_loss": mean_loss}
        improved = self.min_loss is None or mean_loss < self.min_loss
        if improved:
            self.min_loss = mean_loss
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        names = ["latest.pt"] + (["min_loss.pt"] if improved else [])
        dev_acc = None
        if cfg.eval_every and finished % cfg.eval_every == 0 and self.world.is_main:
            dev_acc = self._dev_accuracy()
            if dev_acc is not None:
                record["dev_accuracy"] = dev_acc
                if self.best_dev_accuracy is None or dev_acc > self.best_dev_accuracy:
                    self.best_dev_accuracy = dev_acc
                    names.append("best.pt")
            record.update(self._val_bin_accuracies())
        self._save(names, epoch_file=f"epoch_{finished:03d}.pt")
        if self.world.is_main:
            self.history.append(record)
            self.tracker.log(record, self.step)
            self.log(
                f"epoch {finished}/{cfg.epochs}: mean loss {mean_loss:.4f}"
                + (f", View 1 dev-test accuracy {dev_acc:.4f}" if dev_acc is not None else "")
                + (" (min so far)" if improved else "")
            )
            if cfg.wandb_artifacts:
                self.tracker.artifact(self.run_dir / "latest.pt", f"{cfg.model}-{self.run_name}")
        dist_utils.barrier(self.world)

    def _result(self, last_loss: float | None) -> TrainResult:
        return TrainResult(self.run_dir, self.step, self.epoch, last_loss, self.min_loss)

    # ----------------------------------------------------------------- evaluation hooks
    def _eval_net(self) -> nn.Module:
        net = self.model.net.module if hasattr(self.model.net, "module") else self.model.net
        return net

    def _dev_accuracy(self) -> float | None:
        from facecli.evaluation.runner import view1_dev_accuracy

        if not self.cfg.lfw_dir:
            return None
        return view1_dev_accuracy(self._eval_net(), self.preprocess, Path(self.cfg.lfw_dir), self.device, self.cfg, warn=self.warn)

    def _val_bin_accuracies(self) -> dict:
        """``{"<set>/accuracy": ...}`` for every ``--val-bin`` set (10-fold protocol); logged with the epoch."""
        from facecli.evaluation.runner import evaluate_bin

        out: dict = {}
        for bin_path in self.cfg.val_bins:
            try:
                ev = evaluate_bin(
                    self._eval_net(), self.preprocess, Path(bin_path), self.device, self.cfg.flip, self.cfg.eval_batch_size, min(self.cfg.workers, 4)
                )
            except UserError as e:
                self.warn(f"{bin_path} skipped: {e}")
                continue
            out[f"{ev.name}/accuracy"] = ev.report.accuracy
            self.log(f"{ev.name}: accuracy {100 * ev.report.accuracy:.2f} ± {100 * ev.report.accuracy_std:.2f}%")
        return out

    def _final_evaluation(self) -> dict:
        from facecli.evaluation.runner import end_of_training_evaluation

        if not self.cfg.lfw_dir and not self.cfg.val_bins:
            self.log("No LFW folder given (--lfw-dir or DATASET_PATH): skipping the end-of-training evaluation.")
            return {}
        return end_of_training_evaluation(self, warn=self.warn, log=self.log)


def _link_or_copy(src: Path, dst: Path) -> None:
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
        from facecli.engine.checkpoint import CheckpointSaveError

        raise CheckpointSaveError(f"Could not write {dst}: {e.strerror or e}.", hint="The previous checkpoint is kept.") from e
