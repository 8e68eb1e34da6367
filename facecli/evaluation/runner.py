"""Running the protocols with a network: View 2 accuracy, View 1 threshold, ``.bin`` sets.

Commands and the trainer call these; they own no protocol logic (that is
:mod:`facecli.evaluation.protocol`) and no pixel logic (that is :mod:`facecli.data`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from facecli.data.images import Preprocess, decode_image
from facecli.data.lfw import PairSet, find_image_root, read_pairs
from facecli.errors import ImageError, UserError
from facecli.evaluation.embedding import Embedder, pair_scores
from facecli.evaluation.protocol import VerificationReport, best_threshold, threshold_curve, verify
from facecli.evaluation.quality import pair_quality

ProgressFactory = Callable[[str, int], Callable[[int], None]] | None


@dataclass
class PairEvaluation:
    """One verification set evaluated: protocol report plus what it cost."""

    name: str
    report: VerificationReport
    scores: np.ndarray
    issame: np.ndarray
    unique_images: int
    forward_passes: int
    seconds: float
    missing: int = 0
    bad: list[str] = field(default_factory=list)
    # (P,) each pair's quality: its worse face's feature norm (for the error-versus-reject curve)
    pair_quality: np.ndarray | None = None

    def to_dict(self) -> dict:
        d = self.report.to_dict()
        d.update(
            name=self.name,
            pairs=int(len(self.scores)),
            unique_images=int(self.unique_images),
            forward_passes=int(self.forward_passes),
            seconds=round(float(self.seconds), 3),
            missing_pairs=int(self.missing),
        )
        return d


@dataclass
class ThresholdChoice:
    threshold: float
    train_accuracy: float
    candidates: np.ndarray
    accuracies: np.ndarray
    test_accuracy: float | None
    train_pairs: int
    test_pairs: int
    forward_passes: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "threshold": float(self.threshold),
            "train_accuracy": float(self.train_accuracy),
            "test_accuracy": None if self.test_accuracy is None else float(self.test_accuracy),
            "train_pairs": int(self.train_pairs),
            "test_pairs": int(self.test_pairs),
            "forward_passes": int(self.forward_passes),
            "seconds": round(float(self.seconds), 3),
        }


def _scores_for(pair_set: PairSet, embedder: Embedder, progress: ProgressFactory, label: str):
    advance = progress(f"embedding {label}", len(pair_set.unique_images)) if progress else None
    emb = embedder.paths(pair_set.unique_images, advance)
    if emb.bad:
        raise UserError(
            f"{len(emb.bad)} image(s) referenced by {pair_set.source} could not be decoded, e.g. {emb.bad[0]}.",
            hint="Fix or replace them; evaluation never runs on a partial set silently.",
        )
    quality = pair_quality(emb.quality, pair_set.index_a, pair_set.index_b) if emb.quality is not None else None
    return pair_scores(emb.vectors, pair_set.index_a, pair_set.index_b), emb.forward_passes, quality


def evaluate_pair_set(embedder: Embedder, pair_set: PairSet, progress: ProgressFactory = None, name: str = "LFW") -> PairEvaluation:
    """The View 2 protocol: embed distinct images once, score pairs, 10-fold accuracy."""
    if pair_set.folds < 2:
        # A View 1 file is n same-person pairs then n different-person ones: cutting it into
        # folds would give one-class folds. Its protocol is a threshold from dev-train.
        raise UserError(
            f"{pair_set.source} has a single fold (a View 1 file), so the 10-fold protocol does not apply.",
            hint="Use `facecli tune-threshold --pairs pairsDevTrain.txt --test-pairs pairsDevTest.txt`, or pairs.txt here.",
        )
    t0 = time.perf_counter()
    scores, passes, quality = _scores_for(pair_set, embedder, progress, name)
    report = verify(scores, pair_set.issame, folds=pair_set.folds, fold_of_pair=pair_set.fold_of_pair)
    return PairEvaluation(
        name, report, scores, np.asarray(pair_set.issame), len(pair_set.unique_images), passes, time.perf_counter() - t0, pair_set.missing,
        pair_quality=quality,
    )


def evaluate_lfw_view2(embedder: Embedder, lfw_dir: Path, progress: ProgressFactory = None) -> PairEvaluation:
    """View 2 of the LFW folder (``pairs.txt``)."""
    pairs = read_pairs(lfw_pair_file(lfw_dir, "pairs.txt"), find_image_root(lfw_dir))
    return evaluate_pair_set(embedder, pairs, progress, name="LFW")


class _BinImages(Dataset):
    def __init__(self, images: list[bytes], preprocess: Preprocess, name: str):
        self.images, self.preprocess, self.name = images, preprocess, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.images[i], self.preprocess.image_size, self.preprocess.crop_fraction, where=f"{self.name}[{i}]")
        except ImageError as e:
            return None, i, str(e)
        return img, i, None


def evaluate_bin(embedder: Embedder, path: Path, progress: ProgressFactory = None) -> PairEvaluation:
    """An insightface ``.bin`` set (images stored pairwise) by the same 10-fold protocol."""
    from facecli.data.binset import read_bin

    t0 = time.perf_counter()
    bs = read_bin(path)
    advance = progress(f"embedding {bs.name}", len(bs.images)) if progress else None
    emb = embedder.dataset(_BinImages(bs.images, embedder.preprocess, bs.name), advance)
    if emb.bad:
        raise UserError(f"{len(emb.bad)} image(s) in {path} could not be decoded, e.g. {emb.bad[0]}.")
    n = bs.num_pairs
    scores = pair_scores(emb.vectors, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2))
    if n % 10:
        raise UserError(f"{path}: {n} pairs cannot be split into 10 equal folds.")
    report = verify(scores, bs.issame, folds=10)
    return PairEvaluation(bs.name, report, scores, np.asarray(bs.issame), len(bs.images), emb.forward_passes, time.perf_counter() - t0)


def evaluate_bins(embedder: Embedder, paths, warn=print, progress: ProgressFactory = None) -> list[PairEvaluation]:
    """Every ``.bin`` set that can be evaluated; one that cannot is warned about and skipped."""
    results = []
    for path in paths:
        try:
            results.append(evaluate_bin(embedder, Path(path), progress))
        except UserError as e:
            warn(f"{path} skipped: {e}")
    return results


def tune_threshold(embedder: Embedder, train_pairs: PairSet, test_pairs: PairSet | None, progress: ProgressFactory = None) -> ThresholdChoice:
    """Choose the threshold on View 1 training pairs (the rule of ``verify``), test it on View 1 test pairs.

    Images shared by the two files are embedded once.
    """
    t0 = time.perf_counter()
    paths = list(train_pairs.unique_images)
    if test_pairs is not None:
        paths = sorted(set(paths) | set(test_pairs.unique_images))
    where = {p: i for i, p in enumerate(paths)}
    advance = progress("embedding View 1", len(paths)) if progress else None
    emb = embedder.paths(paths, advance)
    if emb.bad:
        raise UserError(f"{len(emb.bad)} View 1 image(s) could not be decoded, e.g. {emb.bad[0]}.")

    def scores_of(ps: PairSet) -> np.ndarray:
        remap = np.array([where[p] for p in ps.unique_images], dtype=np.int64)
        return pair_scores(emb.vectors, remap[ps.index_a], remap[ps.index_b])

    train_scores = scores_of(train_pairs)
    thr, train_acc = best_threshold(train_scores, train_pairs.issame)
    candidates, accuracies = threshold_curve(train_scores, train_pairs.issame)
    test_acc = None
    if test_pairs is not None:
        test_acc = float(np.mean((scores_of(test_pairs) >= thr) == np.asarray(test_pairs.issame)))
    return ThresholdChoice(
        float(thr), float(train_acc), candidates, accuracies, test_acc, len(train_pairs), 0 if test_pairs is None else len(test_pairs),
        emb.forward_passes, time.perf_counter() - t0,
    )


def tune_view1(embedder: Embedder, lfw_dir: Path, progress: ProgressFactory = None) -> ThresholdChoice:
    """The threshold on ``pairsDevTrain.txt``, its accuracy on ``pairsDevTest.txt``: View 1's protocol."""
    root = find_image_root(lfw_dir)
    train = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTrain.txt"), root)
    test = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTest.txt"), root)
    return tune_threshold(embedder, train, test, progress)


def resolve_pairs_arg(given: Path | None, lfw_dir: Path, default: str) -> Path:
    """``--pairs``/``--test-pairs``: a path as given if it exists, else that name in the LFW folder."""
    if given is None:
        return lfw_pair_file(lfw_dir, default)
    given = Path(given)
    if given.is_file() or given.is_absolute() or len(given.parts) > 1:
        if not given.is_file():
            raise UserError(f"Pairs file {str(given)!r} does not exist.")
        return given
    return lfw_pair_file(lfw_dir, given.name)


def lfw_pair_file(lfw_dir: Path, name: str) -> Path:
    """A protocol file beside the image folder (``pairs.txt`` and friends) or inside it."""
    lfw_dir = Path(lfw_dir)
    for candidate in (lfw_dir / name, find_image_root(lfw_dir).parent / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{name} not found in {str(lfw_dir)!r}.", hint="Pass the file explicitly (--pairs / --test-pairs).")


def write_json(path: Path, data: dict) -> None:
    from facecli.io import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def save_pictures(ev: PairEvaluation, out_dir: Path, stem: str) -> list[Path]:
    from facecli.evaluation.reports import save_histogram, save_roc

    threshold = float(np.median(ev.report.fold_thresholds))
    return [
        save_roc(ev.report, out_dir / f"{stem}_roc.png", title=ev.name),
        save_histogram(ev.scores, ev.issame, out_dir / f"{stem}_scores.png", threshold, title=f"{ev.name} pair scores"),
    ]
