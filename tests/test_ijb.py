"""IJB-B/C 1:1 protocol (eval-ijb) against a naive reference written here, on a generated IJB-format set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, one_line_error

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def ijb_dir(synth_lfw_dir, tmp_path_factory) -> Path:
    from facecli.data.ijb import build_ijb_from_folders

    out = tmp_path_factory.mktemp("ijb") / "IJBC"
    build_ijb_from_folders(synth_lfw_dir, out, "IJBC", seed=0, templates_per_identity=3)
    return out


# --------------------------------------------------------------------------- the naive reference


def _rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def naive_ijb(ijb_dir: Path, raw_by_name: dict, normalize: bool, detector_score: bool) -> tuple[dict, float]:
    """Loops over faces, templates, media and pairs, as eval_ijbc.py reads: no shared code with facecli."""
    faces = _rows(ijb_dir / "meta" / "ijbc_name_5pts_score.txt")
    tid_mid = _rows(ijb_dir / "meta" / "ijbc_face_tid_mid.txt")
    feats = []
    for row in faces:
        f = np.array(raw_by_name[row[0]], dtype=np.float64)
        if normalize:
            f = f / np.sqrt(np.sum(f * f))
        if detector_score:
            f = f * float(row[-1])
        feats.append(f)
    templates = {}
    for f, (_, t, m) in zip(feats, tid_mid):
        templates.setdefault(int(t), {}).setdefault(int(m), []).append(f)
    template_feat = {}
    for t, media in templates.items():
        total = 0
        for m, fs in media.items():
            total = total + sum(fs) / len(fs)
        template_feat[t] = total / np.sqrt(np.sum(total * total))
    scores, labels = [], []
    for a, b, y in _rows(ijb_dir / "meta" / "ijbc_template_pair_label.txt"):
        scores.append(float(np.sum(template_feat[int(a)] * template_feat[int(b)])))
        labels.append(int(y))
    return naive_tar_auc(scores, labels)


def naive_tar_auc(scores, labels) -> tuple[dict, float]:
    """sklearn's roc_curve (drop_intermediate) and eval_ijbc's nearest-FPR reading, with loops."""
    pos = sum(labels)
    neg = len(labels) - pos
    points = []  # (fp, tp) at each distinct score, highest first
    for thr in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= thr and y == 1)
        fp = sum(1 for s, y in zip(scores, labels) if s >= thr and y == 0)
        points.append((fp, tp))
    kept = [points[0]]
    for i in range(1, len(points) - 1):
        (f0, t0), (f1, t1), (f2, t2) = points[i - 1], points[i], points[i + 1]
        if (f2 - f1) != (f1 - f0) or (t2 - t1) != (t1 - t0):
            kept.append(points[i])
    if len(points) > 1:
        kept.append(points[-1])
    curve = [(0.0, 0.0)] + [(fp / neg, tp / pos) for fp, tp in kept]
    tar = {}
    for far in FARS:
        best = None
        for k in range(len(curve) - 1, -1, -1):  # eval_ijbc searches the reversed curve, first minimum wins
            gap = abs(curve[k][0] - far)
            if best is None or gap < best[0]:
                best = (gap, curve[k][1])
        tar[far] = best[1]
    auc = sum((curve[k][0] - curve[k - 1][0]) * (curve[k][1] + curve[k - 1][1]) / 2 for k in range(1, len(curve)))
    return tar, auc


# --------------------------------------------------------------------------- protocol vs reference


@pytest.mark.parametrize("normalize,detector_score", [(False, True), (True, True), (False, False), (True, False)])
def test_protocol_matches_naive_reference(ijb_dir, normalize, detector_score):
    from facecli.data.ijb import read_ijb_meta
    from facecli.evaluation.ijb import score_ijb

    meta = read_ijb_meta(ijb_dir, "IJBC")
    assert len(meta.face_image) > len(meta.image_names)  # some images are on several rows
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(len(meta.image_names), 8)) * rng.uniform(0.2, 3.0, size=(len(meta.image_names), 1))
    report = score_ijb(meta, raw, normalize, detector_score)
    tar, auc = naive_ijb(ijb_dir, dict(zip(meta.image_names, raw)), normalize, detector_score)
    for far in FARS:
        assert report.tar_at_far[far] == pytest.approx(tar[far], abs=1e-6), far
    assert report.auc == pytest.approx(auc, abs=1e-6)


def test_media_pooling_and_switches_change_the_scores(ijb_dir):
    """The set exercises what the reference checks: several images per media, N1 and D1 matter."""
    from facecli.data.ijb import read_ijb_meta
    from facecli.evaluation.ijb import image_features, template_features

    meta = read_ijb_meta(ijb_dir, "IJBC")
    pairs = np.stack([meta.face_template, meta.face_media], 1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert counts.max() >= 2 and (np.unique(pairs[:, 0], return_counts=True)[1] > 2).any()
    raw = np.random.default_rng(2).normal(size=(len(meta.image_names), 8))
    feats = image_features(raw, meta.detector_scores)[meta.face_image]
    _, pooled = template_features(feats, meta.face_template, meta.face_media)
    _, flat = template_features(feats, meta.face_template, np.arange(len(feats)))  # every face its own media
    assert np.abs(pooled - flat).max() > 1e-3


def test_roc_with_ties_and_collinear_runs_matches_reference():
    from facecli.evaluation.ijb import roc_auc, sklearn_roc, tar_at_fars

    rng = np.random.default_rng(3)
    labels = (rng.random(4000) < 0.1).astype(int)
    scores = np.round(rng.normal(size=4000) + 1.5 * labels, 1)  # heavy ties
    scores[:50] = 9.0  # a block of impostors and genuines sharing the top score
    fpr, tpr, _ = sklearn_roc(labels, scores)
    tar, auc = naive_tar_auc(scores.tolist(), labels.tolist())
    got = tar_at_fars(fpr, tpr)
    assert got == pytest.approx(tar, abs=1e-12)
    assert roc_auc(fpr, tpr) == pytest.approx(auc, abs=1e-12)


def test_collinear_roc_vertices_are_dropped_as_sklearn_does():
    """A diagonal run (one impostor and one genuine per score) around FAR 1e-2: sklearn drops its middle vertices."""
    from facecli.evaluation.ijb import sklearn_roc, tar_at_fars

    rng = np.random.default_rng(4)
    scores = [100.0 - k for k in range(5)] + [50.0 - k for k in range(10) for _ in range(2)]
    labels = [0] * 5 + [0, 1] * 10
    scores += (-1 - rng.random(995)).tolist()
    labels += [0] * 985 + [1] * 10
    fpr, tpr, _ = sklearn_roc(labels, scores)
    assert not np.isclose(fpr, 0.01).any()  # the vertex at FAR 1e-2 (tp 5) is gone
    tar, _ = naive_tar_auc(scores, labels)
    assert tar_at_fars(fpr, tpr)[1e-2] == pytest.approx(tar[1e-2]) and tar[1e-2] != 0.25


# --------------------------------------------------------------------------- end to end through the CLI


def test_eval_ijb_cli_matches_reference_and_embeds_each_image_once(ijb_dir, trained_checkpoint, tmp_path, monkeypatch):
    from facecli.data import ijb as ijb_data

    seen = []
    original = ijb_data.AlignedCrops.__getitem__
    monkeypatch.setattr(ijb_data.AlignedCrops, "__getitem__", lambda self, i: (seen.append(self.names[i]), original(self, i))[1])
    r = cli("eval-ijb", trained_checkpoint, "--ijb-dir", ijb_dir, "--json", tmp_path / "r.json", "--save-features", tmp_path / "f.npz", "--workers", "0")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    z = np.load(tmp_path / "f.npz")
    names = [str(n) for n in z["names"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen)) == data["distinct_images"]
    assert data["forward_passes"] == 2 * data["distinct_images"]
    assert not np.allclose(np.linalg.norm(z["features"], axis=1), 1.0, atol=1e-3)  # before any normalisation
    assert (tmp_path / "r_roc.png").stat().st_size > 0
    raw = dict(zip(names, z["features"]))
    for flags, normalize, det in ((), False, True), (("--normalize-images",), True, True), (("--no-detector-score",), False, False):
        seen.clear()
        out = tmp_path / f"r{len(flags)}{det}.json"
        r = cli("eval-ijb", trained_checkpoint, "--ijb-dir", ijb_dir, "--json", out, "--workers", "0", *flags)
        assert r.exit_code == 0, r.output
        got = json.loads(out.read_text())
        assert seen == [] and got["embedded_now"] == 0  # all from the feature cache
        tar, auc = naive_ijb(ijb_dir, raw, normalize, det)
        for far in FARS:
            assert got["tar_at_far"][f"{far:g}"] == pytest.approx(tar[far], abs=1e-6)
        assert got["auc"] == pytest.approx(auc, abs=1e-6)


def _copy_set(ijb_dir: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(ijb_dir, dst)
    return dst


@pytest.mark.parametrize(
    "file,line_no,new_line,expect",
    [
        ("ijbc_name_5pts_score.txt", 3, "x.jpg 1 2 3", "expected 12 fields"),
        ("ijbc_name_5pts_score.txt", 2, None, "is not a number"),
        ("ijbc_face_tid_mid.txt", 4, "1_1.jpg 1 one", "is not an integer"),
        ("ijbc_template_pair_label.txt", 5, "1 2 7", "label"),
        ("ijbc_template_pair_label.txt", 6, "1 99999 0", "template 99999"),
    ],
)
def test_malformed_meta_line_is_one_line_naming_file_and_line(ijb_dir, trained_checkpoint, tmp_path, file, line_no, new_line, expect):
    d = _copy_set(ijb_dir, tmp_path / "bad")
    path = d / "meta" / file
    lines = path.read_text().splitlines()
    if new_line is None:
        fields = lines[line_no - 1].split()
        fields[4] = "nan?"
        new_line = " ".join(fields)
    lines[line_no - 1] = new_line
    path.write_text("\n".join(lines) + "\n")
    msg = one_line_error(cli("eval-ijb", trained_checkpoint, "--ijb-dir", d, "--workers", "0"))
    assert f"{file}:{line_no}:" in msg and expect in msg


def test_missing_meta_file_or_image_is_one_line(ijb_dir, trained_checkpoint, tmp_path):
    d = _copy_set(ijb_dir, tmp_path / "IJBC")
    first = _rows(d / "meta" / "ijbc_name_5pts_score.txt")[0][0]
    (d / "loose_crop" / first).unlink()
    msg = one_line_error(cli("eval-ijb", trained_checkpoint, "--ijb-dir", d, "--workers", "0"))
    assert first in msg and "ijbc_name_5pts_score.txt:1" in msg
    msg = one_line_error(cli("eval-ijb", trained_checkpoint, "--ijb-dir", d, "--workers", "0", "--target", "IJBB"))
    assert "ijbb_name_5pts_score.txt" in msg and "missing" in msg
    # IJB_release itself (the parent of IJBC/) is accepted: the IJBC sub-folder is read
    msg = one_line_error(cli("eval-ijb", trained_checkpoint, "--ijb-dir", tmp_path, "--workers", "0"))
    assert first in msg and "ijbc_name_5pts_score.txt:1" in msg


def test_ijb_from_folders_cli_writes_the_layout(synth_lfw_dir, tmp_path):
    r = cli("ijb-from-folders", synth_lfw_dir, tmp_path / "out", "--max-identities", "4", "--target", "IJBB")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "out" / "meta").iterdir()} == {
        "ijbb_name_5pts_score.txt", "ijbb_face_tid_mid.txt", "ijbb_template_pair_label.txt"}
    msg = one_line_error(cli("ijb-from-folders", synth_lfw_dir, tmp_path / "out"))
    assert "already holds" in msg


def test_interrupted_embedding_restarts_from_the_cache(ijb_dir, trained_checkpoint, tmp_path):
    from facecli.data.ijb import read_ijb_meta
    from facecli.models import load_model
    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.ijb import embed_ijb

    meta = read_ijb_meta(ijb_dir, "IJBC")
    fm = load_model(trained_checkpoint)
    embedder = Embedder(fm.net, fm.preprocess, "cpu", True, 8, 0, normalize=False)
    cache = tmp_path / "feats.npz"
    seen = [0]

    def stop_after_two_chunks(n):
        seen[0] += n
        if seen[0] >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_ijb(embedder, meta, ijb_dir / "loose_crop", cache, stop_after_two_chunks, chunk=16)
    resumed = embed_ijb(embedder, meta, ijb_dir / "loose_crop", cache, chunk=16)
    assert resumed.embedded_now == len(meta.image_names) - 16  # the first chunk was saved before the stop
    fresh = embed_ijb(embedder, meta, ijb_dir / "loose_crop", None, chunk=16)
    np.testing.assert_allclose(resumed.features, fresh.features, atol=1e-5)
