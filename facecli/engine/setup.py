"""Building a run from its configuration: data, network, loss, sampler, optimizer, schedule.

Everything here is decided once, before the first step; :class:`RunParts` holds it. The
loss is whatever the registry builds for ``cfg.model`` (a margin head, FaceNet's triplet
loss, or a plugin's), or the class-sharded head under DDP: all share one interface
(:class:`facecli.losses.Loss`), so nothing here or in the loop asks which model it has.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from facecli.backbones import EmbeddingNet
from facecli.data import build_train_dataset
from facecli.data.folders import read_identity_list
from facecli.data.images import Preprocess
from facecli.data.samplers import PKBatchSampler, ShuffledBatchSampler
from facecli.engine import distributed as dist_utils
from facecli.engine import finetune
from facecli.engine.config import TrainConfig
from facecli.engine.optim import Schedule, build_optimizer
from facecli.errors import UserError
from facecli.losses import LOSSES, Loss, build_loss

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class NetWithLoss(nn.Module):
    """Embedding network plus its loss: what DistributedDataParallel wraps."""

    def __init__(self, net: EmbeddingNet, head: Loss):
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(self.net(x), labels)


@dataclass
class RunParts:
    preprocess: Preprocess
    dataset: Any
    classes: list[str]
    net: EmbeddingNet
    head: Loss
    model: NetWithLoss
    sampler: Any
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    margin_warmup_steps: int
    channels_last: bool  # images and weights in NHWC (cfg.channels_last; default: on CUDA)
    init_from: dict | None = None  # where a fine-tuned network's starting weights came from

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()


def build_parts(cfg: TrainConfig, world, device: torch.device, amp: torch.dtype | None, resume_ckpt: dict | None, warn: Callable) -> RunParts:
    if cfg.decode == "gpu" and device.type != "cuda":
        raise UserError(f"--decode gpu needs a CUDA device; this run is on {device}.", hint="Use --decode cpu (the default).")
    torch.manual_seed(cfg.seed)
    source = _fine_tuning_source(cfg, resume_ckpt)
    preprocess = _preprocess(cfg, resume_ckpt, source)
    dataset = _dataset(cfg, preprocess, resume_ckpt, world, warn)
    classes = list(dataset.classes)
    loss_cls = LOSSES[cfg.model]
    net = EmbeddingNet(
        cfg.backbone, cfg.embedding_dim, normalize=loss_cls.normalize_embeddings, pretrained=cfg.pretrained and not resume_ckpt and not source,
        dropout=cfg.dropout, image_size=cfg.image_size,
    )
    if source is not None:
        finetune.start_from(net, source)
    init_from = finetune.provenance(source, cfg.init_from) if source is not None else (resume_ckpt or {}).get("init_from")
    head = _head(cfg, world, len(classes))
    if cfg.scale_warmup and cfg.margin_warmup_epochs > 0:
        set_warmup_scale(head, adacos_scale(len(classes)))
    model = NetWithLoss(net, head).to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world.distributed:
        # Same initial weights everywhere (DDP also broadcasts rank 0's), then per-rank
        # randomness (dropout) that does not repeat the same mask on every rank.
        torch.manual_seed(cfg.seed + world.rank)
    sampler = _sampler(cfg, dataset, world, loss_cls.batch_layout)
    spe = sampler.batches_per_epoch()
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    schedule = Schedule(cfg.scheduler, cfg.lr, cfg.epochs * spe, spe, cfg.warmup_epochs, cfg.milestones)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    warm = int(round(cfg.margin_warmup_epochs * spe))
    return RunParts(preprocess, dataset, classes, net, head, model, sampler, optimizer, schedule, scaler, warm, channels_last, init_from)


def _fine_tuning_source(cfg: TrainConfig, resume_ckpt: dict | None) -> dict | None:
    """The checkpoint ``--init-from`` names, checked against this run's network (None when not
    fine-tuning, or when resuming: the run's own checkpoint then holds the weights)."""
    if not cfg.init_from or resume_ckpt:
        return None
    source = finetune.read_source(cfg.init_from)
    finetune.check_compatible(source, cfg.init_from, cfg.backbone, cfg.embedding_dim, cfg.image_size, LOSSES[cfg.model].normalize_embeddings)
    return source


def adacos_scale(num_classes: int) -> float:
    """AdaCos's fixed scale sqrt(2) ln(C - 1) (Zhang et al., CVPR 2019, Eq. 13): the scale at
    which the softmax of C classes is neither flat nor saturated when all cosines are near 0."""
    return math.sqrt(2.0) * math.log(max(num_classes - 1, 2))


def set_warmup_scale(model: torch.nn.Module, scale: float) -> None:
    for module in model.modules():
        if hasattr(module, "warmup_scale"):
            module.warmup_scale = scale


def _preprocess(cfg: TrainConfig, resume_ckpt: dict | None, source: dict | None = None) -> Preprocess:
    if resume_ckpt:
        return Preprocess.from_dict(resume_ckpt["preprocess"])
    if source is not None:
        return finetune.source_preprocess(source, cfg.image_size, cfg.crop_fraction)
    mean_std = IMAGENET_MEAN_STD if cfg.pretrained else ((0.5,) * 3, (0.5,) * 3)
    return Preprocess(cfg.image_size, cfg.crop_fraction, *mean_std)


def _dataset(cfg: TrainConfig, preprocess: Preprocess, resume_ckpt: dict | None, world, warn: Callable):
    classes = resume_ckpt["classes"] if resume_ckpt else None
    identities = read_identity_list(cfg.identities_file) if cfg.identities_file and classes is None else None
    dataset = build_train_dataset(Path(cfg.train_dir), preprocess, classes=classes, identities=identities, decode=cfg.decode)
    empty = list(getattr(dataset, "empty_files", []))
    if empty and world.is_main:
        warn(f"Skipped {len(empty)} empty image file(s), e.g. {', '.join(empty[:3])}. Delete or replace them.")
    return dataset


def _head(cfg: TrainConfig, world, num_classes: int) -> Loss:
    if cfg.sharded_head and world.distributed:
        from facecli.engine.sharded_head import ShardedMarginHead

        head = ShardedMarginHead(cfg.model, cfg.embedding_dim, num_classes, world, **cfg.loss_hparams())
        if cfg.sample_rate < 1:
            head.sample_classes(cfg.sample_rate, cfg.seed)
        return head
    head = build_loss(cfg.model, cfg.embedding_dim, num_classes, **cfg.loss_hparams())
    if cfg.sample_rate >= 1:
        return head
    if world.distributed:  # every rank would hold (and sample) all the classes: shard them instead
        raise UserError("--sample-rate below 1 under torchrun needs --sharded-head.", hint="Add --sharded-head (each process then samples its own classes).")
    from facecli.engine.partial_fc import SampledMarginHead

    return SampledMarginHead(head, cfg.sample_rate, cfg.seed)


def _sampler(cfg: TrainConfig, dataset, world, layout: str):
    if layout == "pk":
        return PKBatchSampler(dataset.labels, cfg.batch_size, cfg.images_per_identity, cfg.seed, world.rank, world.world_size)
    return ShuffledBatchSampler(len(dataset), cfg.batch_size, cfg.seed, world.rank, world.world_size)


def wrap_for_ddp(parts: RunParts, world, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module the loop calls: DDP around what is replicated, the loss sharded or not.

    BatchNorm statistics stay per process unless ``sync_bn`` (as large-scale trainers run:
    128-256 images per GPU are plenty); with it, N processes compute what one process with
    the global batch would (SyncBatchNorm on CUDA, an all-reduce BatchNorm on gloo).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    convert = (lambda m: dist_utils.convert_sync_batchnorm(m, device)) if sync_bn else (lambda m: m)
    if parts.head.sharded:
        # Each rank owns its slice of the class weights; only the network is replicated. The
        # sharded loss is the global-batch mean on every rank and each rank's backward gives
        # its part of the network's gradient: DDP must sum, not average.
        parts.model.net = DDP(convert(parts.net), device_ids=ids)
        parts.model.net.register_comm_hook(None, dist_utils.allreduce_sum_hook)
        return parts.model
    if parts.head.batch_statistics:
        parts.head.follow_global_batch(dist_utils.sum_over_ranks)
    parts.head.set_process_rank(world.rank)
    parts.model = convert(parts.model)
    return DDP(parts.model, device_ids=ids)


def bare_net(parts: RunParts) -> EmbeddingNet:
    """The embedding network without its DDP wrapper (for evaluation and checkpoints)."""
    net = parts.model.net
    return net.module if hasattr(net, "module") else net
