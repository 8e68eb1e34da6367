"""Is the embedding still spread out? A cheap check at every epoch end, on training images only.

A margin head whose scale and margin are too hard for the data (small sets, too high a
learning rate) can map every face into a narrow cone: the loss stays high, training
"finishes", and verification is near chance with a threshold near cosine 1. This measures,
on a fixed sample of training images (never the evaluation data), in evaluation mode:

* ``mean_cosine``: mean cosine between embeddings of different images (a spread-out
  embedding has ~0; a collapsed one approaches 1);
* ``mean_norm``: the norm of the mean unit embedding (0 when spread, 1 when all equal);
* ``identity_gap``: mean cosine of same-identity pairs minus that of different-identity
  pairs (how well identities separate; about 0 when they do not).

``verdict`` turns them into one warning line with what to try, or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facecli.data.images import normalize_batch

SAMPLE_IDENTITIES = 64  # identities with two images each give the same-identity pairs
SAMPLE_OTHERS = 128  # plus this many random images
# Evaluation mode uses BatchNorm's running statistics, which start at (0, 1) and follow the
# batches with momentum 0.1: before ~50 steps they still carry their start (0.9**50 = 0.5%)
# and any network looks collapsed. The figures are logged from the first epoch; the verdict waits.
MIN_STEPS_FOR_VERDICT = 50
COLLAPSED_COSINE = 0.75
COLLAPSED_NORM = 0.85
# A cone that still separates identities (same-identity pairs 0.15+ closer than others) still
# verifies: early in a healthy run the embedding is often narrow and already useful.
CONE_STILL_SEPARATES = 0.15
NO_SEPARATION_GAP = 0.05


@dataclass
class Spread:
    mean_cosine: float
    mean_norm: float
    identity_gap: float | None
    images: int

    def to_record(self) -> dict:
        out = {"spread/mean_cosine": self.mean_cosine, "spread/mean_norm": self.mean_norm}
        if self.identity_gap is not None:
            out["spread/identity_gap"] = self.identity_gap
        return out

    def summary(self) -> str:
        gap = f", same-vs-different gap {self.identity_gap:.3f}" if self.identity_gap is not None else ""
        return f"embedding spread: mean cosine {self.mean_cosine:.3f}, mean-vector norm {self.mean_norm:.3f}{gap}"


def sample_indices(labels, seed: int) -> np.ndarray:
    """A fixed sample: two images of up to 64 identities that have two, plus up to 128 others."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(labels))
    first: dict[int, int] = {}
    pairs: list[int] = []
    for i in order:
        label = int(labels[i])
        if label in first and first[label] >= 0 and len(pairs) < 2 * SAMPLE_IDENTITIES:
            pairs += [first[label], int(i)]
            first[label] = -1
        elif label not in first:
            first[label] = int(i)
    chosen = set(pairs)
    others = [int(i) for i in order if int(i) not in chosen][:SAMPLE_OTHERS]
    return np.array(pairs + others, dtype=np.int64)


@torch.inference_mode()
def measure(net, dataset, indices: np.ndarray, preprocess, device: torch.device, batch_size: int = 64) -> Spread | None:
    """Embed the sample in evaluation mode and measure how spread it is."""
    images, labels = [], []
    for i in indices:
        img, label, bad = dataset[int(i)]
        img = _decoded(img, preprocess)
        if img is not None:
            images.append(img)
            labels.append(int(label))
    if len(images) < 4:
        return None
    was_training = net.training
    net.eval()
    try:
        out = [net(normalize_batch(torch.stack(images[k : k + batch_size]).to(device), preprocess)).float() for k in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    return spread_of(F.normalize(torch.cat(out), dim=1).cpu(), torch.tensor(labels))


def _decoded(img, preprocess):
    """A sample's uint8 image; with ``--decode gpu`` samples carry encoded bytes, decoded here on the CPU."""
    if img is None or torch.is_tensor(img):
        return img
    from facecli.data.images import decode_image
    from facecli.errors import ImageError

    try:
        return decode_image(img.data, preprocess.image_size, preprocess.crop_fraction, where=img.where)
    except ImageError:
        return None


def spread_of(unit: torch.Tensor, labels: torch.Tensor) -> Spread:
    """The three figures for L2-normalised embeddings (rows) and their identity labels."""
    n = unit.shape[0]
    cos = unit.double() @ unit.double().T
    off = ~torch.eye(n, dtype=torch.bool)
    same = (labels.view(-1, 1) == labels.view(1, -1)) & off
    diff = (labels.view(-1, 1) != labels.view(1, -1))
    gap = float(cos[same].mean() - cos[diff].mean()) if same.any() and diff.any() else None
    return Spread(float(cos[off].mean()), float(unit.double().mean(0).norm()), gap, n)


def verdict(spread: Spread) -> str | None:
    """One warning line when the embedding has collapsed or stopped separating identities."""
    advice = (
        "Try a lower --lr, a longer --warmup-epochs or --margin-warmup-epochs, or a smaller --scale/--margin "
        "(small data sets often need s=30, m=0.3)."
    )
    separates = spread.identity_gap is not None and spread.identity_gap >= CONE_STILL_SEPARATES
    if (spread.mean_cosine > COLLAPSED_COSINE or spread.mean_norm > COLLAPSED_NORM) and not separates:
        return f"The embeddings have collapsed into a narrow cone ({spread.summary()}); verification will be near chance. {advice}"
    if spread.identity_gap is not None and spread.identity_gap < NO_SEPARATION_GAP:
        return f"The embeddings do not separate identities ({spread.summary()}). {advice}"
    return None


def bunched_scores_warning(threshold: float, scores: np.ndarray | None = None) -> str | None:
    """Evaluation's version: a chosen threshold near cosine 1 means bunched scores (collapse)."""
    if threshold > 0.95:
        spread = f" (pair scores {np.percentile(scores, 5):.3f}..{np.percentile(scores, 95):.3f}, 5th-95th percentile)" if scores is not None and len(scores) else ""
        return (
            f"The threshold is cosine {threshold:.3f}: the scores are bunched near 1{spread}, the sign of collapsed embeddings. "
            "Check the training run's 'embedding spread' lines; retrain with a lower --lr or --margin-warmup-epochs."
        )
    return None


def warn_if_bunched(warn, threshold: float, scores: np.ndarray | None = None) -> None:
    message = bunched_scores_warning(threshold, scores)
    if message:
        warn(message)
