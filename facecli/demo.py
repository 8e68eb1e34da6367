"""The demo: the whole job on the embedded synthetic face set, on a CPU, in minutes.

1. generate the synthetic set (CASIA-WebFace and LFW layouts, held-out identities);
2. measure the untrained network on the LFW-style View 2 pairs (10-fold protocol);
3. train with the real engine (the same code as ``facecli train``);
4. measure the trained network the same way, and show both side by side.

The demo's head uses s=30, m=0.3 with one warm-up epoch: the papers' s=64, m=0.5 are
tuned for 0.5M images and converge slowly from scratch on a few thousand.
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
from facecli.engine.trainer import Trainer
from facecli.errors import UserError
from facecli.evaluation.runner import evaluate_pair_set, lfw_pair_file


def _marker(path: Path) -> dict:
    """The arguments a finished ``facecli synth`` run recorded (empty if unreadable)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class DemoResult:
    untrained: dict  # PairEvaluation.to_dict() of the untrained network on View 2
    trained: dict  # the same for the trained network (from the end-of-training evaluation)
    run_dir: Path
    dev_test_accuracy: float | None  # View 1 dev-test accuracy at the dev-train threshold


def run_demo(
    out_dir: Path,
    *,
    model: str = "arcface",
    backbone: str = "resnet18",
    epochs: int = 4,
    image_size: int = 48,
    scale: float | None = 30.0,
    margin: float | None = 0.3,
    batch_size: int = 64,
    lr: float = 0.1,
    identities: int = 200,
    test_identities: int = 60,
    images_per_identity: int = 20,
    seed: int = 0,
    workers: int = 2,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    progress: Callable | None = None,
    train_progress: Callable | None = None,
) -> DemoResult:
    from facecli.data.synth import generate_synthetic_set

    out_dir = Path(out_dir)
    data = out_dir / "data"
    marker = data / "facecli-synth.json"
    wanted = {"identities": identities, "test_identities": test_identities, "images_per_identity": images_per_identity,
              "image_size": 112, "seed": seed}
    if not marker.exists() or any(_marker(marker).get(k) != v for k, v in wanted.items()):
        total = (identities + test_identities) * images_per_identity
        log(f"Generating the synthetic face set in {data} ({total:,} images)...")
        generate_synthetic_set(
            data, identities=identities, test_identities=test_identities, images_per_identity=images_per_identity,
            image_size=112, seed=seed, progress=progress("generating faces", total) if progress else None,
        )
    lfw_dir = data / "Labeled Faces in the Wild (LFW)"
    pairs = read_pairs(lfw_pair_file(lfw_dir, "pairs.txt"), find_image_root(lfw_dir))

    cfg = TrainConfig(
        model=model, train_dir=str(data / "CASIA-webface"), lfw_dir=str(lfw_dir), backbone=backbone, epochs=epochs,
        batch_size=batch_size, lr=lr, warmup_epochs=1.0 if epochs > 2 else 0.0, image_size=image_size, device="cpu",
        scale=scale if model != "facenet" else None, margin=margin if model != "facenet" else None,
        workers=workers, seed=seed, checkpoints_dir=str(out_dir / "checkpoints"), wandb=False, eval=True,
    )
    preprocess = Preprocess(image_size)
    torch.manual_seed(seed)
    untrained_net = EmbeddingNet(backbone, cfg.embedding_dim, normalize=model == "facenet", image_size=image_size).eval()
    log("Measuring the untrained network on the held-out View 2 pairs...")
    untrained = evaluate_pair_set(untrained_net, preprocess, pairs, "cpu", True, 256, workers,
                                  progress, name="untrained")

    trainer = Trainer(cfg, log=log, warn=warn, progress_factory=train_progress)
    result = trainer.run()  # ends with View 1 threshold tuning and the View 2 protocol
    if "view2" not in result.evaluation:
        raise UserError(f"The trained model could not be evaluated on {lfw_dir} (see the warnings above).")
    trained = result.evaluation["view2"]
    dev = result.evaluation.get("view1", {}).get("test_accuracy")
    return DemoResult(untrained.to_dict(), trained, result.run_dir, dev)
