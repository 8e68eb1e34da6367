"""Operating points at a target false-accept rate, with identity-level uncertainty.

"Which threshold gives at most one false accept in 10,000 on my people, and how sure is
that?" From embeddings of people (identity labels):

* the identities are split at random (seeded) into a calibration half and a held-out half;
* pairs within each half: every genuine pair, and a seeded sample of impostor pairs;
* the threshold is the smallest one whose calibration FAR is <= the target
  (same iff ``score >= t``; ``t`` sits just above the score of the first impostor it rejects);
* 95% intervals come from a bootstrap over IDENTITIES (a person drawn k times counts each
  of their pairs k times; an impostor pair of two people drawn j and k times counts j*k
  times), not over pairs, since one person's photos are not independent trials:
  the threshold and its TAR are re-chosen on each replicate; the FAR interval is the
  spread of the chosen threshold's FAR over the replicates (where the FAR of the
  population these people come from lies);
* the FAR and TAR the threshold gives on the held-out people are reported beside them,
  with the interval a held-out group of that size should fall in: a second sample has its
  own sampling error, so the prediction interval widens the FAR interval's deviations by
  ``sqrt(1 + n_calibration / n_heldout)`` (sqrt(2) for equal halves). Comparing the
  held-out FAR with the plain confidence interval would fail about one time in six even
  when everything is right.

With fewer calibration impostor pairs than 1/FAR the target cannot be measured (the
threshold lands above every impostor); ``measurable`` says so and the command warns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facecli.errors import UserError


@dataclass
class PairSample:
    """Pairs of one group of people: row indices, the people of both sides, same or not."""

    a: np.ndarray
    b: np.ndarray
    person_a: np.ndarray
    person_b: np.ndarray
    same: np.ndarray

    @property
    def genuine(self) -> int:
        return int(self.same.sum())

    @property
    def impostor(self) -> int:
        return int((~self.same).sum())


def sample_pairs(labels: np.ndarray, people: np.ndarray, impostors: int, rng: np.random.Generator) -> PairSample:
    """All genuine pairs among ``people``'s images and up to ``impostors`` random distinct-person pairs."""
    rows = np.flatnonzero(np.isin(labels, people))
    ga, gb = [], []
    for p in people:
        r = rows[labels[rows] == p]
        i, j = np.triu_indices(len(r), k=1)
        ga.append(r[i]), gb.append(r[j])
    ga = np.concatenate(ga) if ga else np.zeros(0, np.int64)
    gb = np.concatenate(gb) if gb else np.zeros(0, np.int64)
    n = len(rows)
    total_impostor = (n * (n - 1) - sum(int((labels[rows] == p).sum()) ** 2 - int((labels[rows] == p).sum()) for p in people)) // 2
    if total_impostor <= impostors:
        i, j = np.triu_indices(n, k=1)
        keep = labels[rows[i]] != labels[rows[j]]
        ia, ib = rows[i[keep]], rows[j[keep]]
    else:
        ia, ib = _random_impostors(rows, labels, impostors, rng)
    a = np.concatenate([ga, ia]).astype(np.int64)
    b = np.concatenate([gb, ib]).astype(np.int64)
    return PairSample(a, b, labels[a], labels[b], labels[a] == labels[b])


def _random_impostors(rows: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` distinct unordered impostor pairs drawn uniformly (rejection of same-person and repeats)."""
    n = len(rows)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < count:
        need = count - len(chosen)
        i = rng.integers(0, n, size=2 * need + 16)
        j = rng.integers(0, n, size=2 * need + 16)
        for x, y in zip(i.tolist(), j.tolist()):
            if labels[rows[x]] != labels[rows[y]]:
                chosen.add((min(x, y), max(x, y)))
                if len(chosen) == count:
                    break
    pairs = np.array(sorted(chosen), dtype=np.int64)
    return rows[pairs[:, 0]], rows[pairs[:, 1]]


def pair_scores(vectors: np.ndarray, pairs: PairSample) -> np.ndarray:
    out = np.empty(len(pairs.a))
    for s in range(0, len(out), 200_000):  # bounded memory for millions of pairs
        e = s + 200_000
        out[s:e] = np.einsum("ij,ij->i", vectors[pairs.a[s:e]].astype(np.float64), vectors[pairs.b[s:e]].astype(np.float64))
    return out


def threshold_at_far(impostor_desc: np.ndarray, weights_desc: np.ndarray, far: float) -> float:
    """Smallest threshold whose weighted FAR is <= ``far``; ``impostor_desc`` sorted high to low."""
    cum = np.cumsum(weights_desc)
    total = cum[-1]
    boundary = np.r_[impostor_desc[1:] != impostor_desc[:-1], True]  # accept whole tie groups or none
    ok = np.flatnonzero(boundary & (cum <= far * total * (1 + 1e-12)))
    accepted = 0 if len(ok) == 0 else int(ok[-1]) + 1
    if accepted == len(impostor_desc):
        return float(impostor_desc[-1])
    return float(np.nextafter(impostor_desc[accepted], np.inf))


def _weighted_rate(scores: np.ndarray, weights: np.ndarray, t: float) -> float:
    total = weights.sum()
    return float(weights[scores >= t].sum() / total) if total > 0 else float("nan")


@dataclass
class OperatingPoint:
    far_target: float
    threshold: float
    tar: float
    far: float  # calibration FAR at the threshold
    threshold_ci: tuple[float, float]
    tar_ci: tuple[float, float]
    far_ci: tuple[float, float]
    far_prediction: tuple[float, float]  # where a held-out group's FAR should lie (95%)
    heldout_far: float
    heldout_tar: float
    calibration: dict
    heldout: dict
    bootstrap: int
    seed: int

    @property
    def measurable(self) -> bool:
        return self.calibration["impostor_pairs"] * self.far_target >= 1

    @property
    def heldout_within(self) -> bool:
        return bool(self.far_prediction[0] <= self.heldout_far <= self.far_prediction[1])

    def to_dict(self) -> dict:
        return {
            "far_target": self.far_target, "threshold": self.threshold, "tar": self.tar, "far": self.far,
            "threshold_ci": list(self.threshold_ci), "tar_ci": list(self.tar_ci), "far_ci": list(self.far_ci),
            "far_prediction": list(self.far_prediction),
            "heldout_far": self.heldout_far, "heldout_tar": self.heldout_tar, "heldout_far_within_ci": self.heldout_within,
            "measurable": self.measurable, "calibration": self.calibration, "heldout": self.heldout,
            "bootstrap": self.bootstrap, "seed": self.seed,
        }


def _bootstrap(scores, pairs: PairSample, people: np.ndarray, far: float, t: float, reps: int, rng) -> np.ndarray:
    """(reps, 3): threshold, TAR and FAR-at-``t`` of each identity resample."""
    ka, kb = np.searchsorted(people, pairs.person_a), np.searchsorted(people, pairs.person_b)  # people is sorted
    imp = ~pairs.same
    order = np.argsort(-scores[imp], kind="mergesort")
    imp_desc, ia, ib = scores[imp][order], ka[imp][order], kb[imp][order]
    gen, ga = scores[pairs.same], ka[pairs.same]
    out = np.empty((reps, 3))
    for r in range(reps):
        c = np.bincount(rng.integers(0, len(people), len(people)), minlength=len(people)).astype(np.float64)
        w_imp = c[ia] * c[ib]
        tb = threshold_at_far(imp_desc, w_imp, far) if w_imp.sum() > 0 else np.nan
        out[r] = tb, _weighted_rate(gen, c[ga], tb), _weighted_rate(imp_desc, w_imp, t)
    return out


def _summary(pairs: PairSample, people) -> dict:
    return {"identities": int(len(people)), "genuine_pairs": pairs.genuine, "impostor_pairs": pairs.impostor}


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def operating_point(vectors: np.ndarray, labels: np.ndarray, far: float, impostors: int = 1_000_000, bootstrap: int = 300,
                    seed: int = 0, heldout_fraction: float = 0.5) -> OperatingPoint:
    """The threshold for ``far`` on calibration people, its 95% identity-bootstrap intervals, and its held-out FAR."""
    if not 0 < far < 1:
        raise UserError(f"--far must be between 0 and 1, got {far:g}.")
    labels = np.asarray(labels)
    people = np.unique(labels)
    if len(people) < 4:
        raise UserError(f"A FAR operating point needs at least 4 identities (2 to calibrate, 2 held out), got {len(people)}.")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(people)
    n_hold = min(len(people) - 2, max(2, int(round(heldout_fraction * len(people)))))
    cal_people, hold_people = np.sort(shuffled[n_hold:]), np.sort(shuffled[:n_hold])
    cal = sample_pairs(labels, cal_people, impostors, rng)
    hold = sample_pairs(labels, hold_people, impostors, rng)
    if cal.genuine == 0 or cal.impostor == 0:
        raise UserError("The calibration people have no genuine pairs (every identity needs 2 or more images).")
    cs, hs = pair_scores(vectors, cal), pair_scores(vectors, hold)
    imp = np.sort(cs[~cal.same])[::-1]
    t = threshold_at_far(imp, np.ones(len(imp)), far)
    boot = _bootstrap(cs, cal, cal_people, far, t, bootstrap, rng)
    cal_far = float(np.mean(cs[~cal.same] >= t))
    far_ci = _interval(boot[:, 2])
    widen = np.sqrt(1 + len(cal_people) / len(hold_people))
    far_prediction = (max(0.0, cal_far + widen * (far_ci[0] - cal_far)), cal_far + widen * (far_ci[1] - cal_far))
    return OperatingPoint(
        far, t, float(np.mean(cs[cal.same] >= t)), cal_far,
        _interval(boot[:, 0]), _interval(boot[:, 1]), far_ci, far_prediction,
        float(np.mean(hs[~hold.same] >= t)) if hold.impostor else float("nan"),
        float(np.mean(hs[hold.same] >= t)) if hold.genuine else float("nan"),
        _summary(cal, cal_people), _summary(hold, hold_people), bootstrap, seed,
    )


def identity_images(folders) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, identity label per image, identity names) of a folder of identity folders."""
    from pathlib import Path

    from facecli.data.images import is_image_file

    root = Path(folders)
    if not root.is_dir():
        raise UserError(f"--folders {root}: not a folder (give a folder of identity folders).")
    paths, labels, names = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in folder.iterdir() if f.is_file() and is_image_file(f))
        if files:
            labels += [len(names)] * len(files)
            paths += files
            names.append(folder.name)
    if len(names) < 4:
        raise UserError(f"--folders {root}: needs at least 4 identity folders with images, found {len(names)}.")
    return paths, np.asarray(labels, dtype=np.int64), names


def lfw_people_images(lfw_dir, people_file) -> tuple[list[str], np.ndarray, list[str]]:
    """The images of the people listed in an LFW people file (``peopleDevTest.txt``: people not in DevTrain)."""
    from pathlib import Path

    from facecli.data.lfw import find_image_root, image_path

    root = find_image_root(lfw_dir)
    paths, labels, names = [], [], []
    rows = [line.split() for line in Path(people_file).read_text().splitlines() if line.strip()]
    for n, row in enumerate(rows[1:], 2):
        if len(row) != 2 or not row[1].isdigit():
            raise UserError(f"{people_file}:{n}: expected 'name count', got {' '.join(row)!r}.")
        files = [str(image_path(root, row[0], k)) for k in range(1, int(row[1]) + 1)]
        labels += [len(names)] * len(files)
        paths += files
        names.append(row[0])
    return paths, np.asarray(labels, dtype=np.int64), names
