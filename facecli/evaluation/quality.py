"""Face quality from the feature norm (MagFace, AdaFace): the decision rule and the
error-versus-reject curve (ERC).

A network trained with a head that reads the embedding's norm (``magface``, ``adaface``)
makes that norm grow with how recognisable the face is, so the norm before L2
normalisation (``Embeddings.quality``) is a quality score for free. A decision on a face
below ``min_quality`` is not taken ("low quality"): deciding on it is where most errors are.

The ERC (Grother and Tabassi, 2007) shows whether the score does that job: with the
threshold fixed where the false-accept rate on all pairs is ``far`` (1e-3), the pairs of
lowest quality (a pair's quality is its worse face's) are rejected, 0 to 50% of them, and the
false non-match rate of the genuine pairs left is drawn. A useful score makes it fall.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facecli.evaluation.operating_point import threshold_at_far

LOW_QUALITY = "low quality"


def quality_problem(model: str) -> str | None:
    """Why a network trained with the loss ``model`` has no quality score (None: it has one).
    A network that L2-normalises its own output (FaceNet's) gives every face norm 1: a
    --min-quality or an ERC on it would be a wrong answer without a warning. (Heads that do
    not train the norm, e.g. ArcFace, give a weaker score than MagFace/AdaFace, but a score.)"""
    from facecli.losses import LOSSES

    cls = LOSSES.get(str(model))
    if cls is not None and cls.normalize_embeddings:
        return f"A {model} network L2-normalises its own output: every face's norm is 1, so it has no quality score."
    return None


def verdict(similarity: float, threshold: float, qualities, min_quality: float | None = None) -> str:
    """"same" or "different" at ``threshold``, or "low quality" (no decision) when any face's
    quality is below ``min_quality`` (NaN quality counts as low)."""
    if min_quality is not None:
        q = np.asarray(qualities, dtype=np.float64)
        if not np.all(q >= min_quality):  # also catches NaN
            return LOW_QUALITY
    return "same" if similarity >= threshold else "different"


def pair_quality(quality: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """A pair is as good as its worse face."""
    return np.minimum(quality[index_a], quality[index_b])


@dataclass
class ErrorRejectCurve:
    far: float
    threshold: float  # fixed on all pairs: FAR <= ``far`` there
    reject: list[float]  # fraction of the pairs rejected, lowest quality first
    fnmr: list[float]  # false non-match rate of the genuine pairs kept
    genuine_kept: list[int]
    pairs: int
    genuine_pairs: int
    impostor_pairs: int

    def fnmr_at(self, fraction: float) -> float:
        """FNMR with ``fraction`` of the pairs rejected (the nearest point drawn)."""
        return self.fnmr[int(np.argmin(np.abs(np.asarray(self.reject) - fraction)))]

    def to_dict(self) -> dict:
        return asdict(self)


def error_reject_curve(scores: np.ndarray, issame: np.ndarray, quality: np.ndarray, far: float = 1e-3,
                       max_reject: float = 0.5, points: int = 51) -> ErrorRejectCurve:
    """FNMR at the FAR-``far`` threshold as the lowest-quality pairs are rejected (0 .. ``max_reject``)."""
    scores, issame, quality = np.asarray(scores, np.float64), np.asarray(issame, bool), np.asarray(quality, np.float64)
    if not (len(scores) == len(issame) == len(quality)) or issame.all() or not issame.any():
        raise ValueError("error_reject_curve needs scores, labels and qualities of the same pairs, genuine and impostor")
    impostor = np.sort(scores[~issame])[::-1]
    t = threshold_at_far(impostor, np.ones_like(impostor), far)
    order = np.argsort(quality, kind="stable")  # lowest quality first; ties keep the pair order
    reject = np.linspace(0.0, max_reject, points)
    fnmr, kept = [], []
    for fraction in reject:
        keep = order[int(round(fraction * len(scores))):]
        genuine = scores[keep][issame[keep]]
        kept.append(int(len(genuine)))
        fnmr.append(float(np.mean(genuine < t)) if len(genuine) else float("nan"))
    return ErrorRejectCurve(far, float(t), [float(r) for r in reject], fnmr, kept, int(len(scores)), int(issame.sum()), int((~issame).sum()))


def erc_of(evaluation, far: float = 1e-3) -> ErrorRejectCurve:
    """The error-versus-reject curve of an evaluated pair set (``runner.PairEvaluation``, e.g.
    LFW View 2 from ``evaluate_lfw_view2``): what ``eval-lfw --erc`` draws."""
    if evaluation.pair_quality is None:
        raise ValueError("this evaluation carries no pair qualities")
    return error_reject_curve(evaluation.scores, evaluation.issame, evaluation.pair_quality, far=far)


def write_erc(curve: ErrorRejectCurve, png: Path, json_path: Path, title: str = "Error versus reject") -> tuple[Path, Path]:
    """The curve as a PNG and as JSON, each written to a temporary name and renamed."""
    from facecli.evaluation.reports import _plt
    from facecli.io import atomic_write

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(100 * np.asarray(curve.reject), 100 * np.asarray(curve.fnmr), lw=1.5, marker=".")
    ax.set_xlabel("pairs rejected, lowest quality first (%)")
    ax.set_ylabel(f"FNMR at FAR {curve.far:g} (%)")
    ax.set_title(f"{title}: threshold {curve.threshold:.4f}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png, json_path = Path(png), Path(json_path)
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    data = json.dumps(curve.to_dict(), indent=2).encode()
    atomic_write(json_path, lambda f: f.write(data))
    return png, json_path
