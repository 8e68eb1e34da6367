"""Fine-tuning: a run whose network starts from another run's checkpoint (``--init-from``),
with a new head for its own identities, and optionally its body frozen for the first epochs
(``--freeze-backbone-epochs``) so that the new head does not wreck the trained features
while it is still random."""

from __future__ import annotations

from pathlib import Path


from facecli.backbones import EmbeddingNet
from facecli.data.images import Preprocess
from facecli.engine.checkpoint import load_checkpoint
from facecli.errors import CheckpointError, UserError


def read_source(path: str | Path) -> dict:
    """The checkpoint to start from (a facecli checkpoint with a network), or a one-line error."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("net"), dict) or "net_state" not in ckpt:
        raise CheckpointError(f"--init-from {str(path)!r} holds no facecli network.", hint="Name a run's latest.pt, best.pt or epoch_NNN.pt.")
    return ckpt


def check_compatible(source: dict, path: str | Path, backbone: str, embedding_dim: int, image_size: int, normalize: bool) -> None:
    """The source network must be the one this run builds: same backbone, embedding size, input
    size, and embedding layer (FaceNet's L2-normalised one differs from the margin heads')."""
    net = source["net"]
    if bool(net.get("normalize")) != normalize:
        kind = lambda n: "an L2-normalised (facenet)" if n else "a margin-head"  # noqa: E731
        raise UserError(
            f"--init-from {str(path)!r} is {kind(net.get('normalize'))} network, this run trains {kind(normalize)} one: their embedding layers differ.",
            hint="Fine-tune it with the kind of loss it was trained with.",
        )
    given = {"backbone": backbone, "embedding size": embedding_dim, "image size": image_size}
    found = {
        "backbone": net.get("backbone"),
        "embedding size": net.get("embedding_dim"),
        "image size": int(net.get("image_size", source.get("preprocess", {}).get("image_size", image_size))),
    }
    for what, value in given.items():
        if found[what] != value:
            flag = {"backbone": "--backbone", "embedding size": "--embedding-dim", "image size": "--image-size"}[what]
            raise UserError(
                f"--init-from {str(path)!r}: that network's {what} is {found[what]}, this run's is {value}.",
                hint=f"Use {flag} {found[what]} to fine-tune it.",
            )


def start_from(net: EmbeddingNet, source: dict) -> None:
    """Copy the source network's weights (BatchNorm statistics included) into ``net``."""
    net.load_state_dict(source["net_state"])


def source_preprocess(source: dict, size: int, crop_fraction: float | None) -> Preprocess:
    """This run's input size and crop with the source's pixel normalisation (the weights expect it)."""
    pre = Preprocess.from_dict(source["preprocess"])
    return Preprocess(size, crop_fraction, pre.mean, pre.std)


def provenance(source: dict, path: str | Path) -> dict:
    """What a fine-tuned checkpoint records about where its starting weights came from."""
    cfg = source.get("train_config") or {}
    return {
        "path": str(Path(path).resolve()),
        "model": source.get("model"),
        "run_name": cfg.get("run_name"),
        "step": source.get("step"),
        "classes": len(source.get("classes") or []),
        "init_from": source.get("init_from"),  # a chain of fine-tunings keeps its history
    }


class BackboneFreeze:
    """Keeps the network's body frozen (no gradient, BatchNorm statistics fixed) while
    ``epoch < epochs``; the head and the embedding layer train throughout. Applied before
    every step: evaluation in the middle of a run sets the whole network back to train mode."""

    def __init__(self, net: EmbeddingNet, epochs: int):
        self.body = net.body() if epochs > 0 else None
        self.epochs = epochs
        self.frozen: bool | None = None

    def apply(self, epoch: int) -> None:
        if self.body is None:
            return
        frozen = epoch < self.epochs
        if frozen != self.frozen:
            for p in self.body.parameters():
                p.requires_grad_(not frozen)
                if frozen:
                    p.grad = None
            self.frozen = frozen
            if not frozen:
                self.body.train(True)
        if frozen and self.body.training:
            self.body.eval()


__all__ = ["BackboneFreeze", "check_compatible", "provenance", "read_source", "source_preprocess", "start_from"]
