"""The training configuration: every choice of a run, validated once, saved with it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from facecli.errors import UserError

MODELS = ("sphereface", "cosface", "arcface", "curricularface", "facenet")
MARGIN_MODELS = MODELS[:4]


@dataclass
class TrainConfig:
    model: str
    train_dir: str | None = None
    identities_file: str | None = None
    lfw_dir: str | None = None
    backbone: str = "resnet50"
    pretrained: bool = False
    embedding_dim: int | None = None  # 512 for margin heads, 128 for FaceNet
    dropout: float = 0.0
    epochs: int = 20
    batch_size: int = 128
    lr: float | None = None  # 0.1 for SGD, 1e-3 for AdamW
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    margin_warmup_epochs: float | None = None  # None: the first 30% of the epochs (margin heads)
    milestones: list[int] | None = None
    margin: float | None = None  # head margin, or the triplet margin for FaceNet (0.2)
    scale: float | None = None
    curricular_momentum: float | None = None
    images_per_identity: int = 4  # K of FaceNet's P x K batches
    image_size: int = 112
    crop_fraction: float | None = None
    device: str = "auto"
    amp: bool = True
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    workers: int = 4
    seed: int = 0
    run_name: str | None = None
    checkpoints_dir: str = "checkpoints"
    checkpoint_every: int = 0  # steps between mid-epoch latest.pt saves (0: epoch ends only)
    keep_epochs: int = 3
    eval: bool = True
    eval_every: int = 0
    flip: bool = True
    eval_batch_size: int | None = None  # None: as large as the device takes (see evaluation.embedding)
    val_bins: list[str] = field(default_factory=list)
    sharded_head: bool = False
    wandb: bool | None = None
    wandb_artifacts: bool = False
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise UserError(f"Unknown model {self.model!r}.", hint=f"Choose one of: {', '.join(MODELS)}.")
        if self.embedding_dim is None:
            self.embedding_dim = 128 if self.model == "facenet" else 512
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adamw" else 0.1
        if self.margin_warmup_epochs is None:
            self.margin_warmup_epochs = 0.0 if self.model == "facenet" else round(0.3 * self.epochs, 3)
        if self.margin_warmup_epochs < 0:
            raise UserError(f"--margin-warmup-epochs must not be negative, got {self.margin_warmup_epochs}.")
        if self.eval_batch_size is not None and (not isinstance(self.eval_batch_size, int) or self.eval_batch_size <= 0):
            raise UserError(f"--eval-batch-size must be a positive integer, got {self.eval_batch_size}.")
        for name in ("epochs", "batch_size", "image_size", "embedding_dim", "keep_epochs", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}.")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.workers < 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise UserError("--weight-decay, --warmup-epochs, --workers, --checkpoint-every and --eval-every must not be negative.")
        if self.image_size < 16:
            raise UserError(f"--image-size must be at least 16, got {self.image_size}.")
        if self.crop_fraction is not None and not (0 < self.crop_fraction <= 1):
            raise UserError(f"--crop-fraction must be in (0, 1], got {self.crop_fraction}.")
        if not (0 <= self.dropout < 1):
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"Unknown device {self.device!r}.", hint="Use auto, cpu, cuda or cuda:N.")
        if self.model == "facenet":
            if self.margin is not None and not (0 < self.margin <= 4):
                raise UserError(f"FaceNet's triplet --margin must be in (0, 4], got {self.margin}.")
            if self.scale is not None:
                raise UserError("--scale applies to margin heads, not FaceNet.")
            if self.sharded_head:
                raise UserError("--sharded-head applies to margin heads, not FaceNet.")
        elif self.curricular_momentum is not None and self.model != "curricularface":
            raise UserError("--curricular-momentum applies to curricularface only.")
        else:
            from facecli.losses import build_head

            build_head(self.model, 2, 2, **self.head_hparams())  # range checks before any data is read

    def head_hparams(self) -> dict[str, Any]:
        hp: dict[str, Any] = {"scale": self.scale, "margin": self.margin}
        if self.model == "curricularface":
            hp["momentum"] = self.curricular_momentum
        return hp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in d.items() if k in names}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
