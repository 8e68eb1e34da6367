"""The demo: the whole job on the embedded synthetic face set, on a CPU, in minutes.

1. generate the synthetic set (CASIA-WebFace and LFW layouts, held-out identities);
2. measure the untrained network on the LFW-style View 2 pairs (10-fold protocol);
3. train with the real engine (the same code as ``facecli train``);
4. measure the trained network the same way, and show both side by side.

The demo's head uses s=30, m=0.3: the papers' s=64, m=0.5 are tuned for 0.5M images and
converge slowly from scratch on a few thousand. Its other settings are ``DEMO_SETTINGS``;
the demo's flags override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from facecli.backbones import EmbeddingNet
from facecli.data.images import Preprocess
from facecli.data.lfw import find_image_root, read_pairs
from facecli.engine.config import TrainConfig
from facecli.data.workers import resolve_workers
from facecli.engine.trainer import Trainer
from facecli.errors import UserError
from facecli.evaluation.embedding import Embedder
from facecli.evaluation.runner import evaluate_pair_set, lfw_pair_file
from facecli.losses import HEADS, LOSSES


def _marker(path: Path) -> dict:
    """The arguments a finished ``facecli synth`` run recorded (empty if unreadable)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# The demo's own defaults for training settings (each a TrainConfig field, or a loss option).
DEMO_SETTINGS: dict = {
    "backbone": "resnet18", "epochs": 4, "image_size": 48, "batch_size": 64, "lr": 0.1, "workers": 2, "seed": 0,
    "scale": 30.0, "margin": 0.3,
}
HEAD_SETTINGS = ("scale", "margin")  # for margin heads only (not flags: tuned for this set)


def _ensure_synthetic_set(data: Path, identities: int, test_identities: int, images_per_identity: int, seed: int, log, progress) -> None:
    """Generate the set unless a finished one with the same arguments is there."""
    from facecli.data.synth import generate_synthetic_set

    marker = data / "facecli-synth.json"
    wanted = {"identities": identities, "test_identities": test_identities, "images_per_identity": images_per_identity, "image_size": 112, "seed": seed}
    if marker.exists() and all(_marker(marker).get(k) == v for k, v in wanted.items()):
        return
    total = (identities + test_identities) * images_per_identity
    log(f"Generating the synthetic face set in {data} ({total:,} images)...")
    generate_synthetic_set(
        data, identities=identities, test_identities=test_identities, images_per_identity=images_per_identity,
        image_size=112, seed=seed, progress=progress("generating faces", total) if progress else None,
    )


@dataclass
class DemoResult:
    untrained: dict  # PairEvaluation.to_dict() of the untrained network on View 2
    trained: dict  # the same for the trained network (from the end-of-training evaluation)
    run_dir: Path
    dev_test_accuracy: float | None  # View 1 dev-test accuracy at the dev-train threshold
    epochs: int


def run_demo(
    out_dir: Path,
    *,
    model: str = "arcface",
    settings: dict | None = None,
    identities: int = 200,
    test_identities: int = 60,
    images_per_identity: int = 20,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    progress: Callable | None = None,
    train_progress: Callable | None = None,
) -> DemoResult:
    """``settings``: training settings that override ``DEMO_SETTINGS``."""
    out_dir = Path(out_dir)
    data = out_dir / "data"
    lfw_dir = data / "Labeled Faces in the Wild (LFW)"
    chosen = {**DEMO_SETTINGS, **(settings or {})}
    if str(model).strip().lower() not in HEADS:  # e.g. facenet: its margin is a distance, not an angle
        for key in HEAD_SETTINGS:
            chosen.pop(key)
    cfg = TrainConfig.build({  # first: a bad setting is reported before minutes of work
        **chosen, "model": model, "train_dir": str(data / "CASIA-webface"), "lfw_dir": str(lfw_dir), "device": "cpu",
        "checkpoints_dir": str(out_dir / "checkpoints"), "wandb": False, "eval": True,
    })
    _ensure_synthetic_set(data, identities, test_identities, images_per_identity, cfg.seed, log, progress)
    pairs = read_pairs(lfw_pair_file(lfw_dir, "pairs.txt"), find_image_root(lfw_dir))
    torch.manual_seed(cfg.seed)
    untrained_net = EmbeddingNet(cfg.backbone, cfg.embedding_dim, normalize=LOSSES[cfg.model].normalize_embeddings, image_size=cfg.image_size).eval()
    log("Measuring the untrained network on the held-out View 2 pairs...")
    workers = resolve_workers(cfg.workers)
    untrained = evaluate_pair_set(Embedder(untrained_net, Preprocess(cfg.image_size), "cpu", batch_size=256, workers=workers), pairs, progress, name="untrained")

    trainer = Trainer(cfg, log=log, warn=warn, progress_factory=train_progress)
    result = trainer.run()  # ends with View 1 threshold tuning and the View 2 protocol
    if "view2" not in result.evaluation:
        raise UserError(f"The trained model could not be evaluated on {lfw_dir} (see the warnings above).")
    trained = result.evaluation["view2"]
    dev = result.evaluation.get("view1", {}).get("test_accuracy")
    return DemoResult(untrained.to_dict(), trained, result.run_dir, dev, cfg.epochs)
