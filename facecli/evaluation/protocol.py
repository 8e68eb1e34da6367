"""The LFW verification protocol: k-fold threshold selection plus ROC summaries.

Everything is plain numpy in float64 so results do not depend on the device or on
the dtype the embeddings were computed in.

Accuracy (the number papers report). Pairs are split into ``folds`` groups; by
default ``folds`` consecutive equal blocks in the given (``pairs.txt``) order, which
are the official LFW folds. For each fold the threshold is chosen on the *other*
folds and applied to the held-out fold, so no pair is scored by a threshold that saw
it. Candidate thresholds for a training set with distinct scores u_1 < ... < u_n are
``u_1 - 1``, every midpoint ``(u_i + u_{i+1}) / 2`` and ``u_n + 1``; a pair is
declared "same" iff ``score >= t``. The chosen threshold is the candidate with the
highest training accuracy, ties going to the smallest candidate (on separable data
this is the middle of the gap). Only the n + 1 candidates matter because accuracy
is constant between consecutive distinct scores; counting them with one sort and
cumulative sums makes a fold O(n log n).

Over all pairs (no folds): the ROC with vertices at "same iff score >= t" for every
distinct score plus (0, 0) and (1, 1); ``auc`` (trapezoidal, which equals the
Mann-Whitney probability P(s_same > s_diff) + 0.5 P(s_same == s_diff)); ``eer`` (where
false-accept rate equals false-reject rate, linearly interpolated along the ROC
polyline); ``tar_at_far[x]`` (the best true-accept rate among ROC vertices whose
false-accept rate is <= x, no interpolation, so it is an achievable operating point).

Undefined values: when all pairs belong to one class, the ROC axis of the missing
class, ``auc``, ``eer`` and ``tar_at_far`` are ``nan`` (``None`` in ``to_dict``).
Fold accuracies stay defined: a threshold is always chosen and applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

DEFAULT_FAR_LEVELS = (1e-3, 1e-2)


class Roc(NamedTuple):
    """ROC vertices in order of decreasing threshold: from (0, 0) to (1, 1)."""

    fpr: np.ndarray  # false-accept rate at each vertex
    tpr: np.ndarray  # true-accept rate at each vertex
    thresholds: np.ndarray  # "same iff score >= threshold" gives that vertex


@dataclass(frozen=True)
class VerificationReport:
    """The result of :func:`verify`; ``to_dict`` is what goes into results files."""

    fold_accuracies: np.ndarray  # fraction correct on each held-out fold
    fold_thresholds: np.ndarray  # threshold chosen on the other folds, per fold
    accuracy: float  # mean of fold_accuracies
    accuracy_std: float  # population std (ddof=0) of fold_accuracies
    auc: float
    eer: float
    tar_at_far: dict  # {far (float): tar (float)}
    roc: Roc
    pairs: int
    folds: int

    def to_dict(self, include_roc: bool = False) -> dict:
        """Plain JSON-able types; ``nan`` becomes ``None``, FAR keys become strings like '0.001'."""
        out = {
            "pairs": int(self.pairs),
            "folds": int(self.folds),
            "accuracy": _clean(self.accuracy),
            "accuracy_std": _clean(self.accuracy_std),
            "auc": _clean(self.auc),
            "eer": _clean(self.eer),
            "tar_at_far": {_far_key(far): _clean(tar) for far, tar in self.tar_at_far.items()},
            "fold_accuracies": [_clean(a) for a in self.fold_accuracies],
            "fold_thresholds": [_clean(t) for t in self.fold_thresholds],
        }
        if include_roc:
            out["roc"] = {
                "fpr": [_clean(v) for v in self.roc.fpr],
                "tpr": [_clean(v) for v in self.roc.tpr],
                "thresholds": [_clean(v) for v in self.roc.thresholds],
            }
        return out


def _clean(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _far_key(far: float) -> str:
    return f"{float(far):g}"


# --------------------------------------------------------------------------- checks


def _as_inputs(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores, bool labels), both 1-D and equally long."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(issame)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and issame must be 1-D, got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise ValueError(f"scores has {len(s)} entries but issame has {len(y)}")
    if len(s) == 0:
        raise ValueError("no pairs to evaluate")
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("issame must be boolean (or 0/1)")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN (diverged model or empty embeddings?)")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are infinite")
    return s, y


# --------------------------------------------------------------------------- building blocks


class _Tally(NamedTuple):
    """Per-candidate counts; candidate k has exactly the k smallest distinct scores below it."""

    candidates: np.ndarray  # (m + 1,) ascending
    distinct: np.ndarray  # (m,) ascending distinct scores
    same_below: np.ndarray  # (m + 1,) same pairs with score < candidate k
    diff_below: np.ndarray  # (m + 1,) different pairs with score < candidate k
    positives: int
    negatives: int


def _tally(s: np.ndarray, y: np.ndarray) -> _Tally:
    u, inverse = np.unique(s, return_inverse=True)
    m = len(u)
    same_per = np.bincount(inverse[y], minlength=m)
    diff_per = np.bincount(inverse[~y], minlength=m)
    same_below = np.concatenate(([0], np.cumsum(same_per)))
    diff_below = np.concatenate(([0], np.cumsum(diff_per)))

    cand = np.empty(m + 1, dtype=np.float64)
    low, high = u[0] - 1.0, u[-1] + 1.0
    # With huge magnitudes +-1 is absorbed by rounding; step to the next float instead.
    cand[0] = low if low < u[0] else np.nextafter(u[0], -np.inf)
    cand[m] = high if high > u[-1] else np.nextafter(u[-1], np.inf)
    if m > 1:
        # 0.5*a + 0.5*b == (a + b) / 2 exactly (one rounding) but cannot overflow. A
        # midpoint of two adjacent floats may round down onto u_i; u_{i+1} then gives the
        # same split under "score >= t".
        mid = 0.5 * u[:-1] + 0.5 * u[1:]
        cand[1:m] = np.where(mid > u[:-1], mid, u[1:])
    return _Tally(cand, u, same_below, diff_below, int(y.sum()), int((~y).sum()))


def _correct_counts(t: _Tally) -> np.ndarray:
    """Pairs classified correctly at each candidate: different below it, same at or above."""
    return t.diff_below + (t.positives - t.same_below)


def threshold_curve(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    """All candidate thresholds (ascending) and the accuracy of "same iff score >= t" at each."""
    s, y = _as_inputs(scores, issame)
    t = _tally(s, y)
    return t.candidates, _correct_counts(t) / float(len(s))


def best_threshold(scores, issame) -> tuple[float, float]:
    """The most accurate candidate threshold (ties: the smallest) and its accuracy on these pairs."""
    s, y = _as_inputs(scores, issame)
    return _best(s, y)


def _best(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    t = _tally(s, y)
    correct = _correct_counts(t)
    k = int(np.argmax(correct))  # first maximum == smallest candidate, on exact integer counts
    return float(t.candidates[k]), float(correct[k]) / float(len(s))


def roc_curve(scores, issame) -> Roc:
    """ROC vertices from (0, 0) (threshold above every score) to (1, 1) (the smallest score)."""
    s, y = _as_inputs(scores, issame)
    return _roc(_tally(s, y))[0]


def _roc(t: _Tally) -> tuple[Roc, np.ndarray, np.ndarray]:
    """Also returns the integer (false-accept, true-accept) counts at each vertex."""
    m = len(t.distinct)
    k = np.arange(m, -1, -1)  # candidate index of each vertex, (0, 0) first
    tp = t.positives - t.same_below[k]
    fp = t.negatives - t.diff_below[k]
    thresholds = np.concatenate(([t.candidates[m]], t.distinct[::-1]))
    nan = np.full(m + 1, np.nan)
    tpr = tp / t.positives if t.positives else nan
    fpr = fp / t.negatives if t.negatives else nan.copy()
    return Roc(fpr, tpr, thresholds), fp, tp


def _auc(fp: np.ndarray, tp: np.ndarray, positives: int, negatives: int) -> float:
    if positives == 0 or negatives == 0:
        return float("nan")
    # Trapezoids in integer counts: a tied block (fp and tp both step) adds half its area,
    # which is exactly the 0.5 * P(equal) term of Mann-Whitney.
    area2 = np.sum(np.diff(fp) * (tp[1:] + tp[:-1]))
    return float(area2) / (2.0 * positives * negatives)


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    # g = FAR - FRR = fpr + tpr - 1 goes strictly up from -1 at (0,0) to +1 at (1,1),
    # because every vertex moves at least one rate: a single crossing.
    g = fpr + tpr - 1.0
    k = int(np.searchsorted(g, 0.0, side="left"))
    if g[k] == 0.0:
        return float(fpr[k])
    a = -g[k - 1] / (g[k] - g[k - 1])
    return float(fpr[k - 1] + a * (fpr[k] - fpr[k - 1]))


def _tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    ok = fpr <= far
    return float(tpr[ok].max())  # (0, 0) is always a vertex, so ok is never empty


# --------------------------------------------------------------------------- protocol


def fold_ids_for(n_pairs: int, folds: int) -> np.ndarray:
    """Fold index of every pair when the folds are ``folds`` consecutive equal blocks."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if n_pairs % folds:
        raise ValueError(f"{n_pairs} pairs cannot be split into {folds} equal folds")
    return np.repeat(np.arange(folds), n_pairs // folds)


def verify(
    scores,
    issame,
    folds: int = 10,
    *,
    fold_of_pair: np.ndarray | Sequence[int] | None = None,
    far_levels: Sequence[float] = DEFAULT_FAR_LEVELS,
) -> VerificationReport:
    """Run the k-fold LFW protocol (see module docstring) and summarise the ROC of all pairs.

    ``fold_of_pair`` (ints in ``[0, folds)``) replaces the equal consecutive blocks; pass
    ``PairSet.fold_of_pair`` so that pairs dropped for missing images do not shift the
    remaining pairs into other folds. Every fold must keep at least one pair.
    """
    s, y = _as_inputs(scores, issame)
    if isinstance(folds, bool) or int(folds) != folds:
        raise ValueError(f"folds must be an integer, got {folds!r}")
    folds = int(folds)
    if fold_of_pair is None:
        fid = fold_ids_for(len(s), folds)
    else:
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        fid = np.asarray(fold_of_pair)
        if fid.shape != s.shape:
            raise ValueError(f"fold_of_pair has shape {fid.shape}, scores {s.shape}")
        if not np.issubdtype(fid.dtype, np.integer) or fid.min() < 0 or fid.max() >= folds:
            raise ValueError(f"fold_of_pair must hold integers in [0, {folds})")
        sizes = np.bincount(fid, minlength=folds)
        if (sizes == 0).any():
            raise ValueError(f"folds {np.flatnonzero(sizes == 0).tolist()} have no pairs")

    accs = np.empty(folds, dtype=np.float64)
    thrs = np.empty(folds, dtype=np.float64)
    for f in range(folds):  # ten folds: a loop over folds, vectorised inside
        test = fid == f
        thr, _ = _best(s[~test], y[~test])
        thrs[f] = thr
        accs[f] = np.mean((s[test] >= thr) == y[test])

    tally = _tally(s, y)
    roc, fp, tp = _roc(tally)
    return VerificationReport(
        fold_accuracies=accs,
        fold_thresholds=thrs,
        accuracy=float(accs.mean()),
        accuracy_std=float(accs.std(ddof=0)),
        auc=_auc(fp, tp, tally.positives, tally.negatives),
        eer=_eer(roc.fpr, roc.tpr),
        tar_at_far={float(x): _tar_at_far(roc.fpr, roc.tpr, float(x)) for x in far_levels},
        roc=roc,
        pairs=len(s),
        folds=folds,
    )
