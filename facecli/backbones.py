"""Backbones (torchvision ResNets and the published face networks) and the embedding network.

Adding a backbone is one registered class: subclass :class:`Backbone`, set ``name``, build
the trunk in ``__init__`` and set ``feature_dim``; ``facecli train --backbone NAME`` then
finds it. For those, the embedding network adds the neck: trunk -> BN -> dropout -> linear
-> BN (the "E" output of ArcFace's networks) for margin heads, or trunk -> linear -> L2
normalisation (FaceNet).

Face networks (:class:`FaceBackbone`: IResNet-18/34/50/100 of ArcFace, MobileFaceNet) end in
their own embedding layer, whose size depends on the final feature map and so on the input
size: they set ``embeds = True``, take ``embedding_dim``, ``dropout`` and ``image_size``, and
the embedding network adds no neck (FaceNet still gets its L2 normalisation).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from facecli.errors import UserError

BACKBONES: dict[str, type["Backbone"]] = {}


def register_backbone(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: make a :class:`Backbone` subclass ``--backbone cls.name``.

    A name already taken is refused: silently replacing ``resnet18`` would also change
    what an existing checkpoint of it is rebuilt with."""
    if cls.name in BACKBONES and BACKBONES[cls.name] is not cls:
        raise UserError(f"@register_backbone: a backbone named {cls.name!r} is already registered ({BACKBONES[cls.name].__name__}); choose another name.")
    BACKBONES[cls.name] = cls
    return cls


class Backbone(nn.Module):
    """A trunk mapping (B, 3, S, S) images to (B, feature_dim) features.

    ``embeds``: the output already is the embedding (a face network's own embedding layer),
    so :class:`EmbeddingNet` adds no neck; such a class is built with ``embedding_dim``,
    ``dropout`` and ``image_size`` besides ``pretrained``.
    """

    name: str = ""
    feature_dim: int = 0
    embeds: bool = False


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


# ----------------------------------------------------------------- face networks
def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True, padding: int | None = None) -> nn.Sequential:
    """Conv (no bias: a BatchNorm follows) -> BN [-> PReLU]: the unit both face networks are made of."""
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2 if padding is None else padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


def _embedding_bn(dim: int) -> nn.BatchNorm1d:
    """The last BatchNorm of the embedding, its scale fixed at 1 (insightface's ``fix_gamma``): only the shift learns."""
    bn = nn.BatchNorm1d(dim)
    bn.weight.requires_grad_(False)
    return bn


def final_map_size(image_size: int, halvings: int = 4) -> int:
    """Side of the last feature map: each stride-2 stage (3x3, padding 1) maps n to ceil(n/2); 112 -> 7, 32 -> 2."""
    side = image_size
    for _ in range(halvings):
        side = (side + 1) // 2
    return side


def _autocast_off(device_type: str):
    """A context with autocast disabled, where autocast exists (not on the meta device used to count FLOPs)."""
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class IRBlock(nn.Module):
    """ArcFace's "improved residual" unit: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            _conv_bn(cin, cout, 3),
            _conv_bn(cout, cout, 3, stride, act=False),
        )
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=False) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's bottleneck with PReLU: 1x1 expand (x t) -> 3x3 depthwise (stride) -> linear 1x1; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class FaceBackbone(Backbone):
    """A published face network, trained from scratch, that ends in its own embedding layer.

    Subclasses give ``_trunk()`` (images -> final feature map) and ``_output()`` (feature map ->
    embedding). The output runs in float32 with autocast off, as insightface's reference does:
    the embedding layer's large reduction (25,088 inputs for IResNet's at 112 px) is where
    bf16/fp16 rounding would cost accuracy.
    """

    embeds = True

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.0, image_size: int = 112, pretrained: bool = False):
        super().__init__()
        if pretrained:
            raise UserError(f"{self.name} has no ImageNet weights: face networks train from scratch.", hint="Train it with --no-pretrained.")
        self.feature_dim = embedding_dim
        self.trunk = self._trunk()
        self.output = self._output(embedding_dim, dropout, final_map_size(image_size))
        for m in self.modules():  # He initialisation: PReLU starts at slope 0.25, close to the ReLU it assumes
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _trunk(self) -> nn.Module:
        """Abstract: each registered face backbone builds its body (stem and stages)."""
        raise NotImplementedError

    def _output(self, embedding_dim: int, dropout: float, side: int) -> nn.Module:
        """Abstract: each builds its embedding layer on the ``side`` x ``side`` final map ("E" or GDC)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        with _autocast_off(features.device.type):  # bf16/fp16 features up to float32; float64 stays float64
            return self.output(features.to(torch.promote_types(features.dtype, torch.float32)))


class IResNet(FaceBackbone):
    """LResNetE-IR of the ArcFace paper (insightface's IResNet): 3x3 stride-1 stem, no max-pool,
    four stride-2 stages of :class:`IRBlock` (64/128/256/512 channels), "E" output
    BN2d-dropout-flatten-FC-BN1d on the input/16 final map (7x7 at 112 px)."""

    stages: tuple[int, int, int, int] = (2, 2, 2, 2)
    widths = (64, 128, 256, 512)

    def _trunk(self) -> nn.Module:
        layers: list[nn.Module] = [_conv_bn(3, 64, 3)]
        cin = 64
        for blocks, width in zip(self.stages, self.widths):
            layers += [IRBlock(cin, width, 2)] + [IRBlock(width, width, 1) for _ in range(blocks - 1)]
            cin = width
        return nn.Sequential(*layers)

    def _output(self, embedding_dim: int, dropout: float, side: int) -> nn.Module:
        c = self.widths[-1]
        return nn.Sequential(
            nn.BatchNorm2d(c), nn.Dropout(dropout), nn.Flatten(), nn.Linear(c * side * side, embedding_dim), _embedding_bn(embedding_dim)
        )


@register_backbone
class IResNet18(IResNet):
    name, stages = "iresnet18", (2, 2, 2, 2)


@register_backbone
class IResNet34(IResNet):
    name, stages = "iresnet34", (3, 4, 6, 3)


@register_backbone
class IResNet50(IResNet):
    name, stages = "iresnet50", (3, 4, 14, 3)


@register_backbone
class IResNet100(IResNet):
    name, stages = "iresnet100", (3, 13, 30, 3)


@register_backbone
class MobileFaceNet(FaceBackbone):
    """MobileFaceNet (Chen et al., CCBR 2018, Table 1): conv3x3/2, depthwise 3x3, bottlenecks
    (expansion t, channels c, repeats n, stride s) as below, conv1x1 to 512, then the GDC output:
    a linear global depthwise conv over the whole input/16 map, BN, (dropout,) linear, BN.
    With a 128-d embedding it is the paper's 0.99M-parameter network."""

    name = "mobilefacenet"
    bottlenecks = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def _trunk(self) -> nn.Module:
        layers: list[nn.Module] = [_conv_bn(3, 64, 3, 2), _conv_bn(64, 64, 3, groups=64)]
        cin = 64
        for t, c, n, s in self.bottlenecks:
            layers += [InvertedResidual(cin if i == 0 else c, c, s if i == 0 else 1, t) for i in range(n)]
            cin = c
        return nn.Sequential(*layers)

    def _output(self, embedding_dim: int, dropout: float, side: int) -> nn.Module:
        # conv1x1 to 512 is the trunk's last layer in the paper; insightface computes it in float32 with the GDC, so it lives here
        return nn.Sequential(
            _conv_bn(128, 512, 1),
            _conv_bn(512, 512, side, groups=512, act=False, padding=0),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512, embedding_dim, bias=False),
            _embedding_bn(embedding_dim),
        )


def build_backbone(name: str, pretrained: bool = False, *, embedding_dim: int = 512, dropout: float = 0.0, image_size: int = 112) -> Backbone:
    """The registered backbone ``name``; the embedding options reach only backbones that build their own embedding."""
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}.", hint=f"Choose one of: {', '.join(sorted(BACKBONES))}.")
    cls = BACKBONES[name]
    if cls.embeds:
        return cls(embedding_dim=embedding_dim, dropout=dropout, image_size=image_size, pretrained=pretrained)
    return cls(pretrained=pretrained)


class EmbeddingNet(nn.Module):
    """Backbone plus embedding layer: the part of a face model that is kept after training."""

    def __init__(
        self,
        backbone: str = "resnet50",
        embedding_dim: int = 512,
        normalize: bool = False,
        pretrained: bool = False,
        dropout: float = 0.0,
        image_size: int = 112,
    ):
        super().__init__()
        if embedding_dim < 2:
            raise UserError(f"--embedding-dim must be at least 2, got {embedding_dim}.")
        self.backbone_name = backbone
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.image_size = image_size
        self.backbone = build_backbone(backbone, pretrained, embedding_dim=embedding_dim, dropout=dropout, image_size=image_size)
        self.neck = nn.Identity() if self.backbone.embeds else _neck(self.backbone.feature_dim, embedding_dim, normalize, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.neck(self.backbone(x))
        if self.normalize:
            z = F.normalize(z.float(), dim=1)
        return z

    def body(self) -> nn.Module:
        """The layers before the embedding layer (what fine-tuning may freeze): a face network's
        trunk, or the whole generic backbone (its embedding layer is the neck)."""
        if not self.backbone.embeds:
            return self.backbone
        trunk = getattr(self.backbone, "trunk", None)
        if trunk is None:
            raise UserError(f"Backbone {self.backbone_name} does not say which layers come before its embedding layer (no .trunk).", hint="Fine-tune it without --freeze-backbone-epochs.")
        return trunk

    def config(self) -> dict:
        """What :func:`facecli.engine.checkpoint.build_net_from_checkpoint` needs to rebuild this network."""
        return {"backbone": self.backbone_name, "embedding_dim": self.embedding_dim, "normalize": self.normalize, "image_size": self.image_size}


def _neck(features: int, embedding_dim: int, normalize: bool, dropout: float) -> nn.Module:
    """The embedding layer put on a generic trunk: linear for FaceNet, else BN-dropout-linear-BN (ArcFace's "E")."""
    if normalize:
        return nn.Linear(features, embedding_dim)
    return nn.Sequential(
        nn.BatchNorm1d(features),
        nn.Dropout(dropout),
        nn.Linear(features, embedding_dim, bias=False),
        nn.BatchNorm1d(embedding_dim),
    )
