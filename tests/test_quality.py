"""The quality score (the feature norm before L2 normalisation): in embed's outputs, the
--min-quality decision rule, and the error-versus-reject curve (PNG + JSON)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import cli
from facecli.data.folders import ImageFiles
from facecli.data.images import normalize_batch
from facecli.evaluation.quality import LOW_QUALITY, error_reject_curve, pair_quality, verdict, write_erc
from facecli.models import load_model


def _images(synth_root, n=3):
    return sorted((synth_root / "CASIA-webface").rglob("*.jpg"))[:n]


def test_embed_writes_each_face_s_norm_before_normalisation_as_quality(synth_root, trained_checkpoint, tmp_path):
    files = _images(synth_root)
    out = tmp_path / "e.npz"
    result = cli("embed", trained_checkpoint, *files, "--out", out, "--no-flip", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = np.load(out)
    model = load_model(trained_checkpoint)
    with torch.no_grad():
        pixels = torch.stack([ImageFiles(files, model.preprocess)[i][0] for i in range(len(files))])
        raw = model.net.eval()(normalize_batch(pixels, model.preprocess))
    assert data["quality"].shape == (len(files),) and data["quality"].dtype == np.float32
    np.testing.assert_allclose(data["quality"], raw.norm(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(data["embeddings"], torch.nn.functional.normalize(raw, dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(data["quality"], 1.0)

    # With flip the score is the norm of the mean of f(x) and f(flip x); the CSV has the column too.
    out_csv = tmp_path / "e.csv"
    assert cli("embed", trained_checkpoint, *files, "--out", out_csv, "--device", "cpu").exit_code == 0
    with torch.no_grad():
        x = normalize_batch(pixels, model.preprocess)
        both = (model.net(x) + model.net(x.flip(3))) / 2
    rows = list(csv.DictReader(out_csv.open()))
    np.testing.assert_allclose([float(r["quality"]) for r in rows], both.norm(dim=1).numpy(), rtol=1e-5)


def test_verdict_takes_no_decision_below_the_minimum_quality():
    assert verdict(0.8, 0.5, [30.0, 25.0]) == "same"
    assert verdict(0.2, 0.5, [30.0, 25.0], min_quality=20.0) == "different"
    assert verdict(0.8, 0.5, [30.0, 19.9], min_quality=20.0) == LOW_QUALITY
    assert verdict(0.8, 0.5, [float("nan"), 25.0], min_quality=20.0) == LOW_QUALITY
    assert verdict(0.8, 0.5, [20.0, 20.0], min_quality=20.0) == "same"  # at the minimum: decided


def test_error_reject_curve_by_hand(tmp_path):
    # 2000 impostors in [-0.5, 0.3): FAR 1e-3 lets the top 2 through -> threshold just above the 3rd highest.
    rng = np.random.default_rng(0)
    impostor = np.sort(rng.uniform(-0.5, 0.3, 2000))
    # 10 genuine pairs: the 4 of lowest quality score below every impostor (misses), the rest match.
    genuine = np.array([0.1, -0.2, 0.0, 0.2, 0.9, 0.8, 0.95, 0.7, 0.85, 0.9])
    scores = np.r_[genuine, impostor]
    issame = np.r_[np.ones(10, bool), np.zeros(2000, bool)]
    quality = np.r_[np.array([1.0, 2.0, 3.0, 4.0, 50, 60, 70, 80, 90, 95]), rng.uniform(5, 100, 2000)]
    curve = error_reject_curve(scores, issame, quality, far=1e-3)
    assert curve.threshold == pytest.approx(np.nextafter(impostor[-3], np.inf))
    assert np.mean(impostor >= curve.threshold) <= 1e-3
    assert curve.reject[0] == 0.0 and curve.reject[-1] == 0.5 and len(curve.reject) == 51
    assert curve.fnmr[0] == pytest.approx(0.4)  # 4 misses of 10 genuine pairs
    # Rejecting the 0.2% lowest-quality pairs (4 of 2010: exactly the 4 misses) leaves no miss.
    at = curve.reject.index(min(curve.reject, key=lambda r: abs(r - 0.01)))
    assert curve.fnmr[at] == 0.0 and curve.genuine_kept[at] == 6
    assert curve.fnmr_at(0.5) == 0.0 and curve.genuine_pairs == 10 and curve.impostor_pairs == 2000

    png, js = write_erc(curve, tmp_path / "erc.png", tmp_path / "erc.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["fnmr"] == curve.fnmr


def test_a_pair_is_as_good_as_its_worse_face():
    q = np.array([5.0, 1.0, 9.0])
    np.testing.assert_array_equal(pair_quality(q, np.array([0, 2]), np.array([1, 0])), [1.0, 5.0])


def test_lfw_view2_evaluation_carries_pair_qualities_for_the_curve(synth_lfw_dir, trained_checkpoint, tmp_path):
    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.quality import erc_of
    from facecli.evaluation.runner import evaluate_lfw_view2

    model = load_model(trained_checkpoint)
    ev = evaluate_lfw_view2(Embedder(model.net, model.preprocess, torch.device("cpu")), synth_lfw_dir)
    assert ev.pair_quality.shape == ev.scores.shape and np.isfinite(ev.pair_quality).all() and ev.pair_quality.min() > 0
    curve = erc_of(ev)
    assert curve.pairs == len(ev.scores) and curve.genuine_pairs == int(ev.issame.sum())
    assert curve.fnmr[0] == pytest.approx(np.mean(ev.scores[ev.issame] < curve.threshold))
    png, js = write_erc(curve, tmp_path / "lfw_erc.png", tmp_path / "lfw_erc.json")
    assert png.stat().st_size > 0 and json.loads(js.read_text())["pairs"] == len(ev.scores)


def test_compare_shows_quality_and_takes_no_decision_below_min_quality(synth_root, trained_checkpoint, tmp_path, capsys):
    from facecli.engine.checkpoint import load_checkpoint, save_checkpoint
    from facecli.errors import UserError
    from facecli.evaluation.embed_files import run_embed
    from facecli.evaluation.quality import quality_problem

    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["threshold"] = -1.0  # any two faces are "same" at this threshold, unless a quality gate stops it
    path = tmp_path / "t.pt"
    save_checkpoint(ckpt, path)
    files = _images(synth_root, 2)
    args = (path, files, None, True, None, True, None, "cpu", 0, None)
    assert run_embed(*args) == 0
    plain = capsys.readouterr().out
    assert "quality: " in plain and "same (threshold -1.0000)" in plain
    q = [float(v) for v in plain.split("quality: ")[1].splitlines()[0].split(",")]
    run_embed(*args, min_quality=min(q) + 0.01)  # printed to 2 decimals
    assert "low quality (threshold -1.0000, min quality" in capsys.readouterr().out
    run_embed(*args, min_quality=min(q) - 0.01)
    assert "same (threshold" in capsys.readouterr().out

    assert quality_problem("facenet") and quality_problem("magface") is None and quality_problem("arcface") is None
    ckpt["model"] = "facenet"
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match="no quality score"):
        run_embed(*args, min_quality=1.0)


def test_identify_answers_low_quality_below_the_minimum():
    from facecli.gallery import UNKNOWN, build_gallery, identify

    e = np.eye(3, dtype=np.float32)
    gallery = build_gallery(["ann", "bob"], [0, 1], e[:2], ["a.jpg", "b.jpg"], identity={}, detector=None)
    probes = np.stack([e[0], e[1], e[2]])
    plain = identify(gallery, probes, threshold=0.5)
    assert [r.answer for r in plain] == ["ann", "bob", UNKNOWN] and plain[0].quality is None
    gated = identify(gallery, probes, threshold=0.5, quality=np.array([30.0, 5.0, np.nan]), min_quality=10.0)
    assert [r.answer for r in gated] == ["ann", LOW_QUALITY, LOW_QUALITY] and gated[1].quality == 5.0
    assert gated[1].top == plain[1].top  # the ranking is still shown


def _probe_quality(trained_checkpoint, photo) -> float:
    from facecli.faces import embed_photos

    found = embed_photos(load_model(trained_checkpoint), [photo], None, False, torch.device("cpu"), True, None, 0)
    return float(found.quality[0])


def test_identify_and_embed_take_min_quality_through_the_cli(synth_root, synth_lfw_dir, trained_checkpoint, tmp_path):
    """`identify --min-quality` answers "low quality" (no name) below it and shows each face's
    quality; `embed --compare --min-quality` decides nothing below it; a non-number is refused."""
    people = tmp_path / "people"
    for folder in sorted(d for d in (synth_lfw_dir / "lfw_funneled").iterdir() if d.is_dir())[:2]:
        (people / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:2]:
            (people / folder.name / image.name).write_bytes(image.read_bytes())
    gallery = tmp_path / "g.npz"
    assert cli("gallery", "build", trained_checkpoint, people, "--out", gallery, "--no-face-check", "--device", "cpu").exit_code == 0
    probe = sorted(people.rglob("*.jpg"))[0]
    q = _probe_quality(trained_checkpoint, probe)
    base = ("identify", gallery, trained_checkpoint, probe, "--threshold", "-1", "--json", "--no-face-check", "--device", "cpu")
    named = json.loads(cli(*base, "--min-quality", f"{q * 0.99}").output)["faces"][0]
    assert named["answer"] == probe.parent.name and named["quality"] == pytest.approx(q, rel=1e-5)
    gated = json.loads(cli(*base, "--min-quality", f"{q * 1.01}").output)["faces"][0]
    assert gated["answer"] == LOW_QUALITY and gated["top"][0]["name"] == probe.parent.name
    table = cli(*base[:-4], "--no-face-check", "--device", "cpu", "--min-quality", f"{q * 1.01}")
    assert table.exit_code == 0 and "low quality" in table.output and "quality" in table.output, table.output
    from facecli.engine.checkpoint import set_threshold

    tuned = tmp_path / "tuned.pt"
    tuned.write_bytes(trained_checkpoint.read_bytes())
    set_threshold(tuned, -1.0, "test")  # "same" for any pair, unless the quality gate stops it
    compare = cli("embed", tuned, probe, probe, "--compare", "--no-face-check", "--device", "cpu", "--min-quality", f"{q * 1.01}")
    assert compare.exit_code == 0 and "low quality" in compare.output, compare.output
    from conftest import one_line_error

    assert "--min-quality" in one_line_error(cli(*base, "--min-quality", "nan"))
    # Writing a file filters nothing: the flag there would be a promise not kept, so it is refused.
    written = cli("embed", tuned, probe, "--out", tmp_path / "e.npz", "--device", "cpu", "--min-quality", "1")
    assert "--compare" in one_line_error(written) and not (tmp_path / "e.npz").exists()


def test_eval_lfw_erc_writes_the_curve_and_refuses_a_model_without_quality(synth_lfw_dir, trained_checkpoint, tmp_path):
    from conftest import one_line_error
    from facecli.engine.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "lfw.json"
    result = cli("eval-lfw", trained_checkpoint, "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0", "--json", out, "--erc")
    assert result.exit_code == 0, result.output
    assert "Error versus reject" in result.output and "lowest-quality 10% rejected" in result.output
    curve = json.loads((tmp_path / "lfw_erc.json").read_text())
    assert curve["far"] == 1e-3 and len(curve["reject"]) == len(curve["fnmr"]) == 51 and curve["reject"][-1] == 0.5
    assert (tmp_path / "lfw_erc.png").stat().st_size > 0
    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["model"] = "facenet"
    facenet = tmp_path / "f.pt"
    save_checkpoint(ckpt, facenet)
    assert "no quality score" in one_line_error(cli("eval-lfw", facenet, "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--erc"))
