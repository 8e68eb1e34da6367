"""IJB-B / IJB-C 1:1 template verification, the protocol of insightface's ``eval_ijbc.py``.

Written from that protocol (not copied), step by step:

1. every distinct ``loose_crop`` image is aligned to the ArcFace template with its five
   landmarks and embedded once: ``f = net(x) + net(flip x)`` (their "F2");
2. ``f`` stays unnormalised (their "N1", default) or is L2-normalised (``normalize=True``);
3. ``f`` is multiplied by the image's detector score ("D1", default) or not;
4. per template, the features of each media (the same video or photo id) are averaged, the
   media averages summed, and the sum L2-normalised;
5. a pair's score is the cosine (dot product) of its two template features;
6. the ROC is sklearn's ``roc_curve(labels, scores)`` (default ``drop_intermediate=True``:
   vertices collinear with both neighbours are dropped, then (0, 0) prepended), and the
   AUC the trapezoid area under it;
7. TAR at FAR = 1e-6 ... 1e-1 is read off that ROC exactly as their code does: the vertex
   whose FPR is NEAREST the target (``argmin |fpr - far|``, so possibly a little above it),
   ties going to the highest TPR (they search the reversed curve and keep the first
   minimum). On a set with too few impostor pairs for a FAR (fewer than 1/FAR), that FAR
   is the nearest vertex, which is usually (0, 0) or the first false accept: the JSON also
   gives ``impostor_pairs`` so a reader can tell.

Image features come from a cache keyed by the network's weights and the image list, saved
after every chunk, so an interrupted run restarts where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from facecli.data.ijb import AlignedCrops, IjbMeta
from facecli.errors import UserError

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CACHE_FORMAT = 1


# --------------------------------------------------------------------------- protocol


def image_features(raw: np.ndarray, detector_scores: np.ndarray, normalize: bool = False, detector_score: bool = True) -> np.ndarray:
    """Steps 2-3: the flip-summed features as the templates pool them (float64)."""
    f = np.asarray(raw, dtype=np.float64)
    if normalize:
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    if detector_score:
        f = f * np.asarray(detector_scores, dtype=np.float64)[:, None]
    return f


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # a zero row stays zero, as sklearn's normalize leaves it


def template_features(face_features: np.ndarray, face_template: np.ndarray, face_media: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: (sorted template ids, unit template features); one row of ``face_features`` per face row."""
    templates, t_index = np.unique(face_template, return_inverse=True)
    pairs = np.stack([t_index, np.asarray(face_media)], axis=1)
    groups, g_index = np.unique(pairs, axis=0, return_inverse=True)
    g_index = g_index.reshape(-1)
    dim = face_features.shape[1]
    sums = np.zeros((len(groups), dim))
    np.add.at(sums, g_index, face_features)
    counts = np.bincount(g_index, minlength=len(groups)).astype(np.float64)
    media_means = sums / counts[:, None]
    pooled = np.zeros((len(templates), dim))
    np.add.at(pooled, groups[:, 0], media_means)
    return templates, _l2(pooled)


def template_pair_scores(templates: np.ndarray, features: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Step 5: cosine of each pair's template features."""
    a = features[np.searchsorted(templates, t1)]
    b = features[np.searchsorted(templates, t2)]
    return np.einsum("ij,ij->i", a, b)


def sklearn_roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 6: ``sklearn.metrics.roc_curve`` with its defaults, re-implemented (sklearn is no dependency)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise UserError("IJB pairs need both genuine (label 1) and impostor (label 0) pairs.")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last_of_value = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_value].astype(np.float64)
    fps = 1.0 + last_of_value - tps
    thresholds = s[last_of_value]
    if len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_fars(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[float, float]:
    """Step 7: the TPR of the vertex nearest each FAR; among equally near ones, the last (highest TPR)."""
    out = {}
    for far in fars:
        gap = np.abs(fpr - far)
        out[float(far)] = float(tpr[np.flatnonzero(gap == gap.min())[-1]])
    return out


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


@dataclass
class IjbReport:
    target: str
    normalize: bool
    detector_score: bool
    tar_at_far: dict[float, float]
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    templates: int
    distinct_images: int = 0
    embedded_now: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.target,
            "protocol": "insightface eval_ijbc: F2 (flip summed), "
            + ("normalised images" if self.normalize else "N1 (unnormalised)")
            + (", D1 (detector score)" if self.detector_score else ", no detector score"),
            "tar_at_far": {f"{far:g}": v for far, v in self.tar_at_far.items()},
            "auc": self.auc,
            "pairs": int(len(self.scores)),
            "genuine_pairs": int(self.labels.sum()),
            "impostor_pairs": int((~self.labels).sum()),
            "templates": int(self.templates),
            "distinct_images": int(self.distinct_images),
            "embedded_now": int(self.embedded_now),
            "forward_passes": int(self.forward_passes),
            "seconds": round(float(self.seconds), 3),
            **self.extra,
        }


def score_ijb(meta: IjbMeta, raw: np.ndarray, normalize: bool = False, detector_score: bool = True) -> IjbReport:
    """Steps 2-7 from the per-image flip-summed features ``raw`` (one row per distinct image)."""
    per_image = image_features(raw, meta.detector_scores, normalize, detector_score)
    templates, feats = template_features(per_image[meta.face_image], meta.face_template, meta.face_media)
    scores = template_pair_scores(templates, feats, meta.pair_t1, meta.pair_t2)
    fpr, tpr, _ = sklearn_roc(meta.pair_label, scores)
    return IjbReport(meta.target, normalize, detector_score, tar_at_fars(fpr, tpr), roc_auc(fpr, tpr), fpr, tpr, scores,
                     meta.pair_label, len(templates))


# --------------------------------------------------------------------------- embedding, with a restartable cache


def cache_key(weights_fingerprint: str, preprocess: dict, meta: IjbMeta, crops_dir: Path) -> str:
    """What the features depend on: the weights, the input pipeline, the images and their landmarks."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, weights_fingerprint, preprocess, str(Path(crops_dir).resolve())], sort_keys=True).encode())
    h.update("\n".join(meta.image_names).encode())
    h.update(np.ascontiguousarray(meta.landmarks).tobytes())
    return h.hexdigest()[:24]


def _load_cache(path: Path | None, names: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    done = np.zeros(len(names), dtype=bool)
    if path is None or not path.is_file():
        return None, done
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT or len(z["done"]) != len(names):
                return None, done
            return z["features"].copy(), z["done"].copy()
    except (OSError, ValueError, KeyError):
        return None, done  # a torn or foreign file: start over, it is only a cache


def _save_cache(path: Path | None, features: np.ndarray, done: np.ndarray) -> None:
    if path is None:
        return
    from facecli.engine.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, format=np.array(CACHE_FORMAT), features=features, done=done))


@dataclass
class RawFeatures:
    features: np.ndarray  # (I, D) float32 flip-summed, unnormalised
    embedded_now: int
    forward_passes: int


def embed_ijb(embedder, meta: IjbMeta, crops_dir: Path, cache: Path | None = None,
              progress: Callable[[int], None] | None = None, chunk: int = 8192) -> RawFeatures:
    """Each distinct image once (minus those already in ``cache``), saving the cache after every chunk."""
    features, done = _load_cache(cache, meta.image_names)
    todo = np.flatnonzero(~done)
    if progress and done.any():
        progress(int(done.sum()))
    dataset = AlignedCrops(crops_dir, meta.image_names, meta.landmarks, embedder.preprocess.image_size)
    passes = 0
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        emb = embedder.dataset(_Subset(dataset, rows), progress)
        if emb.bad:
            raise UserError(f"{len(emb.bad)} IJB image(s) could not be read, e.g. {emb.bad[0]}", hint="Fix or replace them.")
        if features is None:
            features = np.zeros((len(meta.image_names), emb.vectors.shape[1]), dtype=np.float32)
        features[rows] = emb.vectors
        done[rows] = True
        passes += emb.forward_passes
        _save_cache(cache, features, done)
    return RawFeatures(features, len(todo), passes)


class _Subset(AlignedCrops):
    """Rows ``rows`` of a dataset, re-indexed 0..n-1 (what the embedder expects)."""

    def __init__(self, base: AlignedCrops, rows: np.ndarray):
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        image, _, problem = self.base[int(self.rows[index])]
        return image, index, problem


def evaluate_ijb(embedder, meta: IjbMeta, crops_dir: Path, cache: Path | None, progress=None,
                 normalize: bool = False, detector_score: bool = True) -> tuple[IjbReport, RawFeatures]:
    t0 = time.perf_counter()
    raw = embed_ijb(embedder, meta, crops_dir, cache, progress)
    report = score_ijb(meta, raw.features, normalize, detector_score)
    report.distinct_images, report.embedded_now, report.forward_passes = len(meta.image_names), raw.embedded_now, raw.forward_passes
    report.seconds = time.perf_counter() - t0
    return report, raw
