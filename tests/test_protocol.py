"""The LFW verification protocol against hand-computed values and a brute-force reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecli.evaluation.protocol import best_threshold, roc_curve, threshold_curve, verify

T, F = True, False


# --------------------------------------------------------------------------- building blocks


def test_threshold_curve_candidates_and_accuracies():
    # distinct scores 0.1 < 0.4 < 0.8: candidates u1-1, midpoints, un+1
    cands, accs = threshold_curve([0.1, 0.4, 0.4, 0.8], [F, T, F, T])
    np.testing.assert_allclose(cands, [-0.9, 0.25, 0.6, 1.8], rtol=0, atol=1e-15)
    # all "same": 2/4; t=0.25: 0.1F, 0.4T, 0.8T right; t=0.6: 0.1F, 0.4F, 0.8T right; none: 2/4
    np.testing.assert_array_equal(accs, [0.5, 0.75, 0.75, 0.5])


def test_best_threshold_ties_go_to_smallest_candidate():
    thr, acc = best_threshold([0.1, 0.4, 0.4, 0.8], [F, T, F, T])
    assert thr == pytest.approx(0.25, abs=1e-15)
    assert acc == 0.75


def test_best_threshold_separable_is_middle_of_gap():
    thr, acc = best_threshold([2.0, 3.0, 7.0, 9.0], [F, F, T, T])
    assert (thr, acc) == (5.0, 1.0)


def test_best_threshold_one_class():
    assert best_threshold([1.0, 2.0], [T, T]) == (0.0, 1.0)  # u1 - 1: all "same"
    assert best_threshold([1.0, 2.0], [F, F]) == (3.0, 1.0)  # un + 1: all "different"


def test_midpoint_of_adjacent_floats_still_separates():
    a = 1.0
    b = float(np.nextafter(a, 2.0))  # (a + b) / 2 rounds down onto a
    thr, acc = best_threshold([a, b], [F, T])
    assert acc == 1.0 and thr == b


def test_huge_scores_keep_outer_candidates_outside():
    s = 1e17  # u + 1 == u in float64
    cands, accs = threshold_curve([s], [F])
    assert cands[0] < s < cands[1]
    np.testing.assert_array_equal(accs, [0.0, 1.0])


# --------------------------------------------------------------------------- folds


def test_folds_separable_threshold_is_middle_of_gap():
    scores = [9, 7, 2, 1, 8, 6, 4, 3]
    issame = [T, T, F, F, T, T, F, F]
    rep = verify(scores, issame, folds=2)
    # fold 0 trains on {8,6 | 4,3}: gap 4..6 -> 5; fold 1 trains on {9,7 | 2,1}: gap 2..7 -> 4.5
    np.testing.assert_array_equal(rep.fold_thresholds, [5.0, 4.5])
    np.testing.assert_array_equal(rep.fold_accuracies, [1.0, 1.0])
    assert rep.accuracy == 1.0 and rep.accuracy_std == 0.0
    assert rep.auc == 1.0 and rep.eer == 0.0


def test_folds_overlapping_with_ties():
    # fold A = [9T 3T 5F 1F], fold B = [8T 4T 6F 2F]
    scores = [9, 3, 5, 1, 8, 4, 6, 2]
    issame = [T, T, F, F, T, T, F, F]
    rep = verify(scores, issame, folds=2)
    # A's threshold from B (2F 4T 6F 8T): candidates 1,3,5,7,9 correct 2,3,2,3,2 -> tie -> 3;
    #   on A: 9T ok, 3T ok (3 >= 3), 5F wrong, 1F ok -> 3/4
    # B's threshold from A (1F 3T 5F 9T): candidates 0,2,4,7,10 correct 2,3,2,3,2 -> 2;
    #   on B: 8T ok, 4T ok, 6F wrong, 2F wrong (2 >= 2) -> 2/4
    np.testing.assert_array_equal(rep.fold_thresholds, [3.0, 2.0])
    np.testing.assert_array_equal(rep.fold_accuracies, [0.75, 0.5])
    assert rep.accuracy == 0.625
    assert rep.accuracy_std == 0.125
    assert rep.pairs == 8 and rep.folds == 2


def test_three_folds():
    # fold 0 = [5T 1F], fold 1 = [4T 2F], fold 2 = [1T 3F]
    scores = [5, 1, 4, 2, 1, 3]
    issame = [T, F, T, F, T, F]
    rep = verify(scores, issame, folds=3)
    # fold 0 from {4T 2F 1T 3F}: cands 0,1.5,2.5,3.5,5 correct 2,1,2,3,2 -> 3.5; on fold 0: both right
    # fold 1 from {5T 1F 1T 3F}: distinct 1(T,F) 3F 5T: cands 0,2,4,6 correct 2,2,3,2 -> 4; 4T right, 2F right
    # fold 2 from {5T 1F 4T 2F}: cands 0,1.5,3,4.5,6 correct 2,3,4,3,2 -> 3; 1T wrong, 3F wrong
    np.testing.assert_array_equal(rep.fold_thresholds, [3.5, 4.0, 3.0])
    np.testing.assert_array_equal(rep.fold_accuracies, [1.0, 1.0, 0.0])
    assert rep.accuracy == pytest.approx(2 / 3)
    assert rep.accuracy_std == pytest.approx(np.sqrt(2 / 9))


def test_fold_of_pair_replaces_blocks():
    scores = [9, 3, 5, 1, 8, 4, 6, 2]
    issame = [T, T, F, F, T, T, F, F]
    blocks = verify(scores, issame, folds=2)
    same = verify(scores, issame, folds=2, fold_of_pair=[0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(blocks.fold_thresholds, same.fold_thresholds)
    # interleaved folds, unequal sizes allowed: fold 0 = [9T 5F 8T], fold 1 = [3T 1F 4T 6F 2F]
    rep = verify(scores, issame, folds=2, fold_of_pair=[0, 1, 0, 1, 0, 1, 1, 1])
    ref = _brute_verify(np.array(scores, float), np.array(issame), np.array([0, 1, 0, 1, 0, 1, 1, 1]), 2)
    np.testing.assert_array_equal(rep.fold_thresholds, ref[0])
    np.testing.assert_array_equal(rep.fold_accuracies, ref[1])


# --------------------------------------------------------------------------- ROC summaries


def test_auc_eer_tar_with_ties():
    # same: 3 2 2, different: 2 1
    scores = [3, 2, 2, 2, 1]
    issame = [T, T, T, F, F]
    rep = verify(scores, issame, folds=5, far_levels=(1e-3, 0.49, 0.5))
    # Mann-Whitney: (3>2)+(3>1)+(2=2)/2+(2>1)+(2=2)/2+(2>1) = 5 of 6
    assert rep.auc == pytest.approx(5 / 6, abs=1e-15)
    # ROC: (0,0) (0,1/3) (1/2,1) (1,1)
    np.testing.assert_allclose(rep.roc.fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(rep.roc.tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_array_equal(rep.roc.thresholds, [4, 3, 2, 1])
    # FAR - FRR = fpr + tpr - 1: -2/3 at (0,1/3), +1/2 at (1/2,1): a = (2/3)/(7/6) = 4/7,
    # FAR = 4/7 * 1/2 = 2/7 and TAR = 1/3 + 4/7 * 2/3 = 5/7, so FRR = 2/7 too
    assert rep.eer == pytest.approx(2 / 7, abs=1e-15)
    assert rep.tar_at_far == pytest.approx({1e-3: 1 / 3, 0.49: 1 / 3, 0.5: 1.0})


def test_eer_at_a_vertex():
    # same 3 1, different 2 0: ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FAR = FRR = .5 at (.5,.5)
    rep = verify([3, 1, 2, 0], [T, T, F, F], folds=2)
    assert rep.eer == 0.5
    assert rep.auc == 0.75
    assert rep.tar_at_far == {1e-3: 0.5, 1e-2: 0.5}


def test_one_class_is_nan_not_a_crash():
    rep = verify([1.0, 2.0, 3.0, 4.0], [T, T, T, T], folds=2)
    assert np.isnan(rep.auc) and np.isnan(rep.eer)
    assert all(np.isnan(v) for v in rep.tar_at_far.values())
    assert np.isnan(rep.roc.fpr).all() and not np.isnan(rep.roc.tpr).any()
    # fold 0 [1,2] trained on [3,4] all same -> threshold 2: 1 wrong, 2 right
    np.testing.assert_array_equal(rep.fold_accuracies, [0.5, 1.0])
    d = rep.to_dict()
    assert d["auc"] is None and d["eer"] is None and d["tar_at_far"] == {"0.001": None, "0.01": None}
    json.dumps(d, allow_nan=False)
    # only different pairs: the other axis is undefined
    rep = verify([1.0, 2.0], [F, F], folds=2)
    assert np.isnan(rep.roc.tpr).all() and np.isnan(rep.auc)


def test_to_dict_is_plain_json():
    rep = verify([9, 3, 5, 1, 8, 4, 6, 2], [T, T, F, F, T, T, F, F], folds=2)
    d = rep.to_dict(include_roc=True)
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["accuracy"] == 0.625 and back["fold_accuracies"] == [0.75, 0.5]
    assert back["fold_thresholds"] == [3.0, 2.0]
    assert set(back["tar_at_far"]) == {"0.001", "0.01"}
    assert len(back["roc"]["fpr"]) == 9  # 8 distinct scores + (0,0)
    assert type(d["pairs"]) is int and type(d["accuracy"]) is float
    assert "roc" not in rep.to_dict()


@pytest.mark.parametrize(
    "scores, issame, folds, kwargs, match",
    [
        ([1, 2, 3], [T, F, T], 2, {}, "equal folds"),
        ([1, 2, 3, 4], [T, F, T], 2, {}, "issame has 3"),
        ([1, np.nan, 3, 4], [T, F, T, F], 2, {}, "NaN"),
        ([1, np.inf, 3, 4], [T, F, T, F], 2, {}, "infinite"),
        ([1, 2, 3, 4], [T, F, T, F], 1, {}, "at least 2"),
        ([], [], 2, {}, "no pairs"),
        ([1, 2, 3, 4], [T, F, T, F], 2, {"fold_of_pair": [0, 0, 0, 0]}, "no pairs"),
        ([1, 2, 3, 4], [T, F, T, F], 2, {"fold_of_pair": [0, 1, 2, 1]}, r"\[0, 2\)"),
        ([1, 2, 3, 4], [T, F, T, F], 2, {"fold_of_pair": [0, 1]}, "shape"),
        ([1, 2, 3, 4], [T, F, 2, F], 2, {}, "boolean"),
    ],
)
def test_value_errors(scores, issame, folds, kwargs, match):
    with pytest.raises(ValueError, match=match):
        verify(scores, issame, folds, **kwargs)


# --------------------------------------------------------------------------- brute force


def _brute_best(s, y):
    """O(n * candidates): every candidate tried directly."""
    u = sorted(set(s.tolist()))
    cands = [u[0] - 1.0] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [u[-1] + 1.0]
    best_t, best_acc = None, -1.0
    for t in cands:
        acc = float(np.mean((s >= t) == y))
        if acc > best_acc:
            best_t, best_acc = t, acc
    return best_t, best_acc


def _brute_verify(s, y, fid, folds):
    thrs, accs = [], []
    for f in range(folds):
        t, _ = _brute_best(s[fid != f], y[fid != f])
        thrs.append(t)
        accs.append(float(np.mean((s[fid == f] >= t) == y[fid == f])))
    return np.array(thrs), np.array(accs)


def _brute_summary(s, y, fars):
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    auc = float(np.mean((diff > 0) + 0.5 * (diff == 0)))
    ts = [np.inf] + sorted(set(s.tolist()), reverse=True)
    fpr = np.array([np.mean(neg >= t) for t in ts])
    tpr = np.array([np.mean(pos >= t) for t in ts])
    eer = None
    for k in range(len(ts) - 1):  # segment where FAR - FRR changes sign
        d0, d1 = fpr[k] - (1 - tpr[k]), fpr[k + 1] - (1 - tpr[k + 1])
        if d0 <= 0 <= d1 and d1 != d0:
            a = -d0 / (d1 - d0)
            eer = fpr[k] + a * (fpr[k + 1] - fpr[k])
            break
    tar = {x: max(tp for fp, tp in zip(fpr, tpr) if fp <= x) for x in fars}
    return auc, eer, tar


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    folds = int(rng.integers(2, 11))
    n = folds * int(rng.integers(2, 40))
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    if seed % 2:  # coarse integer scores: many ties within and across classes
        s = rng.integers(0, 12, size=n).astype(float) + 3 * y
    else:
        s = rng.normal(size=n) + 1.2 * y
    if y.all() or not y.any():
        y[0] = not y[0]
    fars = (1e-3, 1e-2, 0.1, 0.3)
    rep = verify(s, y, folds=folds, far_levels=fars)
    thrs, accs = _brute_verify(s, y, np.repeat(np.arange(folds), n // folds), folds)
    np.testing.assert_array_equal(rep.fold_thresholds, thrs)
    np.testing.assert_array_equal(rep.fold_accuracies, accs)
    assert rep.accuracy == pytest.approx(accs.mean(), abs=1e-15)
    assert rep.accuracy_std == pytest.approx(accs.std(), abs=1e-15)
    auc, eer, tar = _brute_summary(s, y, fars)
    assert rep.auc == pytest.approx(auc, abs=1e-12)
    assert rep.eer == pytest.approx(eer, abs=1e-12)
    assert rep.tar_at_far == pytest.approx(tar, abs=1e-15)
    # the building blocks agree with the brute-force search on all pairs
    assert best_threshold(s, y) == pytest.approx(_brute_best(s, y), abs=0)
    cands, curve = threshold_curve(s, y)
    assert len(cands) == len(np.unique(s)) + 1 and np.all(np.diff(cands) > 0)
    assert curve.max() == best_threshold(s, y)[1]
    roc = roc_curve(s, y)
    np.testing.assert_array_equal(roc.fpr, rep.roc.fpr)
