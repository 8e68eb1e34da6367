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
import torch
from torch.utils.data import Dataset

from facecli.data.images import Preprocess, decode_image
from facecli.data.workers import resolve_workers
from facecli.data.lfw import PairSet, find_image_root, read_pairs
from facecli.errors import ImageError, UserError
from facecli.evaluation.embedding import embed_dataset, embed_paths, pair_scores
from facecli.evaluation.protocol import VerificationReport, best_threshold, threshold_curve, verify

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


def _scores_for(pair_set: PairSet, net, preprocess, device, flip, batch_size, workers, progress: ProgressFactory, label: str):
    advance = progress(f"embedding {label}", len(pair_set.unique_images)) if progress else None
    emb = embed_paths(net, preprocess, pair_set.unique_images, device, flip, batch_size, workers, advance)
    if emb.bad:
        raise UserError(
            f"{len(emb.bad)} image(s) referenced by {pair_set.source} could not be decoded, e.g. {emb.bad[0]}.",
            hint="Fix or replace them; evaluation never runs on a partial set silently.",
        )
    return pair_scores(emb.vectors, pair_set.index_a, pair_set.index_b), emb.forward_passes


def evaluate_pair_set(
    net: torch.nn.Module,
    preprocess: Preprocess,
    pair_set: PairSet,
    device,
    flip: bool = True,
    batch_size: int | None = None,
    workers: int = 0,
    progress: ProgressFactory = None,
    name: str = "LFW",
) -> PairEvaluation:
    """The View 2 protocol: embed distinct images once, score pairs, 10-fold accuracy."""
    if pair_set.folds < 2:
        # A View 1 file is n same-person pairs then n different-person ones: cutting it into
        # folds would give one-class folds. Its protocol is a threshold from dev-train.
        raise UserError(
            f"{pair_set.source} has a single fold (a View 1 file), so the 10-fold protocol does not apply.",
            hint="Use `facecli tune-threshold --pairs pairsDevTrain.txt --test-pairs pairsDevTest.txt`, or pairs.txt here.",
        )
    t0 = time.perf_counter()
    scores, passes = _scores_for(pair_set, net, preprocess, device, flip, batch_size, workers, progress, name)
    report = verify(scores, pair_set.issame, folds=pair_set.folds, fold_of_pair=pair_set.fold_of_pair)
    return PairEvaluation(
        name, report, scores, np.asarray(pair_set.issame), len(pair_set.unique_images), passes, time.perf_counter() - t0, pair_set.missing
    )


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


def evaluate_bin(
    net, preprocess: Preprocess, path: Path, device, flip=True, batch_size=None, workers=0, progress: ProgressFactory = None
) -> PairEvaluation:
    """An insightface ``.bin`` set (images stored pairwise) by the same 10-fold protocol."""
    from facecli.data.binset import read_bin

    t0 = time.perf_counter()
    bs = read_bin(path)
    advance = progress(f"embedding {bs.name}", len(bs.images)) if progress else None
    emb = embed_dataset(net, preprocess, _BinImages(bs.images, preprocess, bs.name), device, flip, batch_size, workers, advance)
    if emb.bad:
        raise UserError(f"{len(emb.bad)} image(s) in {path} could not be decoded, e.g. {emb.bad[0]}.")
    n = bs.num_pairs
    scores = pair_scores(emb.vectors, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2))
    if n % 10:
        raise UserError(f"{path}: {n} pairs cannot be split into 10 equal folds.")
    report = verify(scores, bs.issame, folds=10)
    return PairEvaluation(bs.name, report, scores, np.asarray(bs.issame), len(bs.images), emb.forward_passes, time.perf_counter() - t0)


def tune_threshold(
    net,
    preprocess: Preprocess,
    train_pairs: PairSet,
    test_pairs: PairSet | None,
    device,
    flip=True,
    batch_size=None,
    workers=0,
    progress: ProgressFactory = None,
) -> ThresholdChoice:
    """Choose the threshold on View 1 training pairs (the rule of ``verify``), test it on View 1 test pairs.

    Images shared by the two files are embedded once.
    """
    t0 = time.perf_counter()
    paths = list(train_pairs.unique_images)
    if test_pairs is not None:
        paths = sorted(set(paths) | set(test_pairs.unique_images))
    where = {p: i for i, p in enumerate(paths)}
    advance = progress("embedding View 1", len(paths)) if progress else None
    emb = embed_paths(net, preprocess, paths, device, flip, batch_size, workers, advance)
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


def view1_dev_accuracy(net, preprocess, lfw_dir: Path, device, cfg, warn=print) -> float | None:
    """Dev-test accuracy with the threshold tuned on dev-train: the model-selection signal."""
    try:
        root = find_image_root(lfw_dir)
        train = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTrain.txt"), root)
        test = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTest.txt"), root)
    except UserError as e:
        warn(f"View 1 evaluation skipped: {e}")
        return None
    choice = tune_threshold(net, preprocess, train, test, device, cfg.flip, cfg.eval_batch_size, resolve_workers(cfg.workers))
    return choice.test_accuracy


def write_json(path: Path, data: dict) -> None:
    from facecli.engine.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def save_pictures(ev: PairEvaluation, out_dir: Path, stem: str) -> list[Path]:
    from facecli.evaluation.reports import save_histogram, save_roc

    threshold = float(np.median(ev.report.fold_thresholds))
    return [
        save_roc(ev.report, out_dir / f"{stem}_roc.png", title=ev.name),
        save_histogram(ev.scores, ev.issame, out_dir / f"{stem}_scores.png", threshold, title=f"{ev.name} pair scores"),
    ]


def end_of_training_evaluation(trainer, warn=print, log=print) -> dict:
    """Tune the threshold on View 1 (stored in the checkpoints), then report View 2 and ``.bin`` sets."""
    from facecli.engine.checkpoint import set_threshold
    from facecli.evaluation.reports import save_threshold_curve

    cfg = trainer.cfg
    net = trainer._eval_net()
    run_dir = trainer.run_dir
    results: dict = {}
    device = trainer.device
    workers = resolve_workers(cfg.workers)
    if cfg.lfw_dir:
        lfw_dir = Path(cfg.lfw_dir)
        try:
            root = find_image_root(lfw_dir)
            dev_train = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTrain.txt"), root)
            dev_test = read_pairs(lfw_pair_file(lfw_dir, "pairsDevTest.txt"), root)
            choice = tune_threshold(net, trainer.preprocess, dev_train, dev_test, device, cfg.flip, cfg.eval_batch_size, workers)
            trainer.threshold = choice.threshold
            # Tuned on the final weights: it belongs to latest.pt only (min_loss.pt and best.pt
            # hold earlier weights; `facecli tune-threshold FILE --save` gives them their own).
            set_threshold(run_dir / "latest.pt", choice.threshold, "View 1 pairsDevTrain.txt")
            results["view1"] = choice.to_dict()
            curve = save_threshold_curve(choice.candidates, choice.accuracies, choice.threshold, run_dir / "view1_threshold.png")
            trainer.tracker.log({"view1/threshold": choice.threshold, "view1/dev_test_accuracy": choice.test_accuracy}, trainer.step)
            trainer.tracker.image("view1/threshold_curve", curve, trainer.step)
            finite = np.isfinite(choice.candidates)
            trainer.tracker.line(
                "view1/accuracy_vs_threshold", choice.candidates[finite], choice.accuracies[finite], "threshold", "accuracy", trainer.step
            )
            log(f"View 1: threshold {choice.threshold:.4f} (dev-train accuracy {choice.train_accuracy:.4f}), dev-test accuracy {choice.test_accuracy:.4f}")
        except UserError as e:
            warn(f"View 1 threshold tuning skipped: {e}")
        try:
            pairs = read_pairs(lfw_pair_file(lfw_dir, "pairs.txt"), find_image_root(lfw_dir))
            ev = evaluate_pair_set(net, trainer.preprocess, pairs, device, cfg.flip, cfg.eval_batch_size, workers, name="LFW")
            results["view2"] = ev.to_dict()
            pictures = save_pictures(ev, run_dir, "lfw")
            trainer.tracker.log({"lfw/accuracy": ev.report.accuracy, "lfw/accuracy_std": ev.report.accuracy_std, "lfw/auc": ev.report.auc}, trainer.step)
            trainer.tracker.image("lfw/roc", pictures[0], trainer.step)
            log(f"LFW View 2: accuracy {100 * ev.report.accuracy:.2f} ± {100 * ev.report.accuracy_std:.2f}% (10-fold), AUC {ev.report.auc:.4f}")
        except UserError as e:
            warn(f"View 2 evaluation skipped: {e}")
    for bin_path in cfg.val_bins:
        try:
            ev = evaluate_bin(net, trainer.preprocess, Path(bin_path), device, cfg.flip, cfg.eval_batch_size, workers)
            results[ev.name] = ev.to_dict()
            trainer.tracker.log({f"{ev.name}/accuracy": ev.report.accuracy}, trainer.step)
            log(f"{ev.name}: accuracy {100 * ev.report.accuracy:.2f} ± {100 * ev.report.accuracy_std:.2f}%")
        except UserError as e:
            warn(f"{bin_path} skipped: {e}")
    if results:
        write_json(run_dir / "evaluation.json", results)
        trainer.tracker.summary({k: v.get("accuracy", v.get("test_accuracy")) for k, v in results.items()})
    return results
