"""Backbones (a registry of torchvision ResNets) and the embedding network built on them.

Adding a backbone is one registered class: subclass :class:`Backbone`, set ``name``, build
the trunk in ``__init__`` and set ``feature_dim``; ``facecli train --backbone NAME`` then
finds it. The embedding network is trunk -> BN -> dropout -> linear -> BN (the "E" output
of ArcFace's networks) for margin heads, or trunk -> linear -> L2 normalisation (FaceNet).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from facecli.errors import UserError

BACKBONES: dict[str, type["Backbone"]] = {}


def register_backbone(cls: type["Backbone"]) -> type["Backbone"]:
    BACKBONES[cls.name] = cls
    return cls


class Backbone(nn.Module):
    """A trunk mapping (B, 3, S, S) images to (B, feature_dim) features."""

    name: str = ""
    feature_dim: int = 0


class TorchvisionResNet(Backbone):
    """A torchvision ResNet without its ImageNet classifier."""

    arch: str = ""
    weights: str = "IMAGENET1K_V1"

    def __init__(self, pretrained: bool = False):
        super().__init__()
        builder = getattr(torchvision.models, self.arch)
        weights = None
        if pretrained:
            weights = torchvision.models.get_model_weights(self.arch)[self.weights]
            try:
                net = builder(weights=weights)
            except Exception as e:  # no network, proxy, corrupt cache: all the user's to fix
                hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
                raise UserError(
                    f"ImageNet weights for {self.name} could not be loaded ({type(e).__name__}).",
                    hint=f"Download {weights.url} to {hub} on a machine with internet, or train with --no-pretrained.",
                ) from e
        else:
            net = builder(weights=None)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.trunk = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


@register_backbone
class ResNet18(TorchvisionResNet):
    name, arch = "resnet18", "resnet18"


@register_backbone
class ResNet34(TorchvisionResNet):
    name, arch = "resnet34", "resnet34"


@register_backbone
class ResNet50(TorchvisionResNet):
    name, arch, weights = "resnet50", "resnet50", "IMAGENET1K_V2"


@register_backbone
class ResNet101(TorchvisionResNet):
    name, arch, weights = "resnet101", "resnet101", "IMAGENET1K_V2"


def build_backbone(name: str, pretrained: bool = False) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}.", hint=f"Choose one of: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name](pretrained=pretrained)


class EmbeddingNet(nn.Module):
    """Backbone plus embedding layer: the part of a face model that is kept after training."""

    def __init__(
        self,
        backbone: str = "resnet50",
        embedding_dim: int = 512,
        normalize: bool = False,
        pretrained: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embedding_dim < 2:
            raise UserError(f"--embedding-dim must be at least 2, got {embedding_dim}.")
        self.backbone_name = backbone
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.backbone = build_backbone(backbone, pretrained=pretrained)
        f = self.backbone.feature_dim
        if normalize:
            self.neck = nn.Linear(f, embedding_dim)
        else:
            self.neck = nn.Sequential(
                nn.BatchNorm1d(f),
                nn.Dropout(dropout),
                nn.Linear(f, embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.neck(self.backbone(x))
        if self.normalize:
            z = F.normalize(z.float(), dim=1)
        return z

    def config(self) -> dict:
        return {"backbone": self.backbone_name, "embedding_dim": self.embedding_dim, "normalize": self.normalize}
