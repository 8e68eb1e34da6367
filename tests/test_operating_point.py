"""tune-threshold --far: threshold at a target FAR, identity-bootstrap intervals, held-out FAR, --save."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli


def _people(n_people=60, per=6, dim=16, spread=0.9, seed=0):
    """Unit embeddings of people: a centre per person plus noise (some people noisier than others)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, dim))
    noise = rng.uniform(0.5, 1.5, n_people) * spread
    labels = np.repeat(np.arange(n_people), per)
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * noise[labels, None]
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_threshold_is_the_smallest_with_calibration_far_at_most_target():
    from facecli.evaluation.operating_point import operating_point

    x, y = _people()
    op = operating_point(x, y, far=0.01, bootstrap=50, seed=3)
    # brute force over every pair among the calibration people (the split: a seeded permutation, half held out)
    shuffled = np.random.default_rng(3).permutation(np.unique(y))
    rows = np.arange(len(y))
    cal_people = shuffled[30:]
    cal = rows[np.isin(y, cal_people)]
    s = x[cal] @ x[cal].T
    iu = np.triu_indices(len(cal), k=1)
    same = (y[cal][:, None] == y[cal][None, :])[iu]
    scores = s[iu]
    imp = np.sort(scores[~same])
    far_at = lambda t: np.mean(imp >= t)  # noqa: E731
    assert far_at(op.threshold) <= 0.01 < far_at(imp[imp < op.threshold].max())
    assert op.tar == pytest.approx(np.mean(scores[same] >= op.threshold))
    assert op.far == pytest.approx(far_at(op.threshold))


def test_held_out_far_lies_in_the_reported_interval_on_synthetic_people():
    from facecli.evaluation.operating_point import operating_point

    x, y = _people(n_people=120, per=5)
    op = operating_point(x, y, far=1e-2, bootstrap=200, seed=0)
    assert op.measurable
    assert op.far_ci[0] < op.far <= 1e-2 < op.far_ci[1]
    assert op.far_prediction[0] <= op.heldout_far <= op.far_prediction[1] and op.heldout_within
    assert op.far_prediction[0] < op.far_ci[0] and op.far_ci[1] < op.far_prediction[1]
    assert op.tar_ci[0] <= op.tar <= op.tar_ci[1]


def test_bootstrap_resamples_people_not_pairs():
    """Half the people always match, half never: thousands of pairs, but only 12 people's worth of evidence."""
    from facecli.evaluation.operating_point import operating_point

    rng = np.random.default_rng(1)
    n, per, dim = 24, 12, 32
    labels = np.repeat(np.arange(n), per)
    centres = rng.normal(size=(n, dim))
    noise = np.where(np.arange(n) % 2 == 0, 0.05, 10.0)  # even people: tight clusters; odd: pure noise
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * noise[labels, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    op = operating_point(x, labels, far=0.05, bootstrap=200, seed=0)
    # per-pair resampling of ~800 genuine pairs would give a TAR interval about +-3 points wide
    assert op.tar_ci[1] - op.tar_ci[0] > 0.25


def test_far_too_small_for_the_pairs_is_flagged():
    from facecli.evaluation.operating_point import operating_point

    x, y = _people(n_people=8, per=3)
    op = operating_point(x, y, far=1e-4, bootstrap=20)
    assert not op.measurable


def test_tune_threshold_far_cli_saves_operating_point_and_view1_clears_it(synth_lfw_dir, trained_checkpoint, tmp_path):
    import shutil

    from facecli.engine.checkpoint import load_checkpoint

    ck = tmp_path / "m.pt"
    shutil.copy(trained_checkpoint, ck)
    folders = synth_lfw_dir / "lfw_funneled"
    r = cli("tune-threshold", ck, "--far", "0.05", "--folders", folders, "--workers", "0", "--bootstrap", "50", "--save", "--json", tmp_path / "op.json")
    assert r.exit_code == 0, r.output
    assert "impostor pairs" in r.output and "held out" in r.output
    data = json.loads((tmp_path / "op.json").read_text())
    ckpt = load_checkpoint(ck)
    assert ckpt["threshold"] == pytest.approx(data["threshold"])
    assert ckpt["threshold_far"] == 0.05 and ckpt["threshold_far_ci"] == pytest.approx(data["far_ci"])
    assert "--far 0.05" in ckpt["threshold_source"]
    # the same people through LFW mode (peopleDevTest.txt people) also runs
    r = cli("tune-threshold", ck, "--far", "0.05", "--lfw-dir", synth_lfw_dir, "--workers", "0", "--bootstrap", "20")
    assert r.exit_code == 0, r.output
    # an accuracy (View 1) threshold replaces it and drops the FAR keys
    r = cli("tune-threshold", ck, "--lfw-dir", synth_lfw_dir, "--workers", "0", "--save")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(ck)
    assert "threshold_far" not in ckpt and "threshold_far_ci" not in ckpt


def test_onnx_export_carries_the_operating_point(trained_checkpoint, tmp_path):
    import shutil

    from facecli.engine.checkpoint import set_threshold
    from facecli.export import onnx_metadata
    from facecli.models import load_model

    ck = tmp_path / "m.pt"
    shutil.copy(trained_checkpoint, ck)
    set_threshold(ck, 0.42, "test", far=1e-3, far_ci=(5e-4, 2e-3))
    meta = json.loads(onnx_metadata(load_model(ck), str(ck), "weights-fingerprint")["facecli"])
    assert meta["threshold"] == 0.42 and meta["threshold_far"] == 1e-3 and meta["threshold_far_ci"] == [5e-4, 2e-3]
    assert meta["threshold_source"] == "test"
