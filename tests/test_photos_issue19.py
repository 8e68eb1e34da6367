"""Issue 19, photos and models: "no face" before "who", the open-set operating point, one file
finder, outputs that need --overwrite, non-finite embeddings, crafted galleries, markup in names.

Synthetic faces are not faces to dlib, so galleries of them are built with --no-face-check;
the face check itself is tested on a grey and a noise photo (needs the detect extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, one_line_error
from PIL import Image

needs_detect = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")), reason="pip install 'facecli[detect]'"
)
needs_export = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")), reason="pip install 'facecli[export]'"
)


def _people(synth_lfw_dir: Path, root: Path, count: int = 2, per: int = 2) -> Path:
    """PEOPLE/<name>/ with ``per`` synthetic photos of each of ``count`` identities."""
    source = synth_lfw_dir / "lfw_funneled"
    folders = sorted(d for d in source.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= per)[:count]
    for folder in folders:
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:per]:
            shutil.copy(image, root / folder.name / image.name)
    return root


@pytest.fixture
def gallery(trained_checkpoint, synth_lfw_dir, tmp_path) -> Path:
    out = tmp_path / "g.npz"
    built = cli("gallery", "build", trained_checkpoint, _people(synth_lfw_dir, tmp_path / "people"), "--out", out, "--no-face-check", "--device", "cpu")
    assert built.exit_code == 0, built.output
    return out


def _grey_and_noise(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (250, 250), (128, 128, 128)).save(folder / "grey.png")
    noise = np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    return [folder / "grey.png", folder / "noise.png"]


# ------------------------------------------------------------------ no face before who


@needs_detect
@pytest.mark.parametrize("detect", [[], ["--detect"]])
def test_identify_names_nobody_for_a_grey_and_a_noise_photo_at_any_threshold(trained_checkpoint, gallery, tmp_path, detect):
    photos = _grey_and_noise(tmp_path / "sky")
    names = [p.name for p in (tmp_path / "people").iterdir()]
    result = cli("identify", gallery, trained_checkpoint, *photos, "--threshold", "-1", "--json", *detect, "--device", "cpu")
    assert result.exit_code != 0 and "No face found in the 2 photo(s)" in result.output, result.output
    assert not any(name in result.output for name in names), result.output


@needs_detect
def test_gallery_build_and_compare_check_for_a_face(trained_checkpoint, tmp_path):
    people = tmp_path / "people"
    _grey_and_noise(people / "sky")
    _grey_and_noise(people / "static")
    built = cli("gallery", "build", trained_checkpoint, people, "--out", tmp_path / "g.npz", "--device", "cpu")
    assert built.exit_code != 0 and "No usable face" in built.output and not (tmp_path / "g.npz").exists(), built.output
    a, b = _grey_and_noise(tmp_path / "pair")
    compared = cli("embed", trained_checkpoint, a, b, "--compare", "--device", "cpu")
    assert compared.exit_code != 0 and "same/different is not decided" in compared.output and "cosine" not in compared.output


def test_without_the_detect_extra_one_line_says_nothing_checks_for_a_face(trained_checkpoint, gallery, synth_lfw_dir, monkeypatch):
    import facecli.detect

    monkeypatch.setattr(facecli.detect, "detector_installed", lambda name="hog": False)
    probe = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[0]
    result = cli("identify", gallery, trained_checkpoint, probe, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("no face check: the detect extra is not installed") == 1, result.output


# ------------------------------------------------------------------ the open-set operating point


def test_identify_says_which_operating_point_and_never_uses_a_verification_threshold(trained_checkpoint, gallery, synth_lfw_dir, tmp_path):
    from facecli.engine.checkpoint import set_threshold

    ckpt = tmp_path / "with_view1.pt"
    shutil.copy(trained_checkpoint, ckpt)
    set_threshold(ckpt, -0.99, "View 1 accuracy-optimal")  # would name every stranger
    probe = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[-1]
    result = cli("identify", gallery, ckpt, probe, "--json", "--no-face-check", "--device", "cpu")
    assert result.exit_code == 0, result.output
    point = json.loads(result.output)["operating_point"]
    assert point["source"].startswith("calibrated on this gallery") and point["threshold"] > -0.99 and point["far"] == 0.01
    table = cli("identify", gallery, ckpt, probe, "--no-face-check", "--device", "cpu")
    assert "calibrated on this gallery" in table.output
    given = cli("identify", gallery, ckpt, probe, "--threshold", "0.3", "--json", "--no-face-check", "--device", "cpu")
    assert json.loads(given.output)["operating_point"]["source"] == "given with --threshold"


def test_one_person_gallery_without_a_far_threshold_is_refused(trained_checkpoint, synth_lfw_dir, tmp_path):
    from facecli.engine.checkpoint import load_checkpoint, save_checkpoint, set_threshold

    ckpt = tmp_path / "c.pt"
    shutil.copy(trained_checkpoint, ckpt)
    set_threshold(ckpt, 0.3, "View 1")
    out = tmp_path / "one.npz"
    assert cli("gallery", "build", ckpt, _people(synth_lfw_dir, tmp_path / "p", count=1), "--out", out, "--no-face-check").exit_code == 0
    probe = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[-1]
    line = one_line_error(cli("identify", out, ckpt, probe, "--no-face-check"))
    assert "No open-set threshold" in line
    stored = load_checkpoint(ckpt)
    stored["threshold_far"] = 0.001  # as `tune-threshold --far 0.001 --save` stores it
    save_checkpoint(stored, ckpt)
    result = cli("identify", out, ckpt, probe, "--no-face-check", "--json")
    assert result.exit_code == 0 and "1:1 FAR of 0.001" in json.loads(result.output)["operating_point"]["source"], result.output


@pytest.mark.parametrize("value", ["nan", "inf", "1.5"])
def test_a_threshold_that_is_not_a_cosine_is_refused(trained_checkpoint, gallery, tmp_path, value):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert "not a cosine similarity" in one_line_error(cli("identify", gallery, trained_checkpoint, tmp_path / "a.png", "--threshold", value))


def test_leave_one_out_calibration_keeps_the_false_alarm_rate():
    from facecli.gallery import Gallery, calibrate, leave_one_out_scores

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    labels = np.repeat(np.arange(40), 5)
    t = centres[labels] + 0.6 * rng.normal(size=(200, 16))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    g = Gallery([f"p{i}" for i in range(40)], labels, t.astype(np.float32), ["x"] * 200, {"embedding_dim": 16, "fingerprint": "f"})
    for by in ("mean", "max"):
        impostor, genuine = leave_one_out_scores(g, by)
        point = calibrate(g, by, far=0.05)
        assert np.mean(impostor >= point.threshold) <= 0.05 and np.mean(impostor >= point.threshold - 1e-3) > 0.04
        assert np.nanmean(genuine) > np.mean(impostor) and "DIR" in point.source
    assert calibrate(Gallery(["a"], np.zeros(2, int), t[:2].astype(np.float32), ["x", "y"], {}), "mean") is None


# ------------------------------------------------------------------ one file finder


def test_links_are_followed_loops_and_fifos_skipped_and_named(trained_checkpoint, synth_lfw_dir, tmp_path):
    images = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[:3]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(images[0], elsewhere / "far.jpg")
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(images[1], root / "near.jpg")
    os.symlink(elsewhere, root / "linked_folder")
    os.symlink(images[2], root / "linked_file.jpg")
    os.symlink(root, root / "loop")
    os.mkfifo(root / "zz.jpg")
    result = cli("embed", trained_checkpoint, root, "--out", tmp_path / "e.npz", "--device", "cpu")
    assert result.exit_code == 1, result.output  # something was skipped
    paths = [Path(p).name for p in np.load(tmp_path / "e.npz")["paths"]]
    assert paths == ["linked_file.jpg", "far.jpg", "near.jpg"], result.output
    assert "zz.jpg: a FIFO" in result.output and "loop: links to" in result.output


def test_a_person_folder_linking_to_the_people_folder_is_not_a_person(trained_checkpoint, synth_lfw_dir, tmp_path):
    people = _people(synth_lfw_dir, tmp_path / "people")
    os.symlink(people, people / "Everyone")
    outside = _people(synth_lfw_dir, tmp_path / "outside", count=3)
    third = sorted(outside.iterdir())[-1]
    os.symlink(third, people / "Linked")
    result = cli("gallery", "build", trained_checkpoint, people, "--out", tmp_path / "g.npz", "--no-face-check", "--device", "cpu")
    assert "Everyone: links to" in result.output and "Enrolled 3 people" in result.output, result.output


# ------------------------------------------------------------------ nothing lost


def test_embed_and_gallery_outputs_need_overwrite(trained_checkpoint, synth_lfw_dir, tmp_path):
    image = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[0]
    mine = tmp_path / "mine.npz"
    mine.write_bytes(b"precious")
    assert "already exists" in one_line_error(cli("embed", trained_checkpoint, image, "--out", mine))
    people = _people(synth_lfw_dir, tmp_path / "people")
    assert "already exists" in one_line_error(cli("gallery", "build", trained_checkpoint, people, "--out", mine, "--no-face-check"))
    assert mine.read_bytes() == b"precious"
    assert cli("embed", trained_checkpoint, image, "--out", mine, "--overwrite").exit_code == 0


def test_an_output_folder_that_cannot_be_written_is_one_line(trained_checkpoint, synth_lfw_dir, tmp_path):
    image = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[0]
    (tmp_path / "a_file").write_text("x")
    assert "Could not write" in one_line_error(cli("embed", trained_checkpoint, image, "--out", tmp_path / "a_file" / "e.npz"))


def test_align_landmarks_refuses_to_replace_files_without_overwrite(synth_lfw_dir, tmp_path):
    image = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[0]
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    shutil.copy(image, src / "a.jpg")
    (dst / "a.jpg").write_bytes(b"mine")
    lm = tmp_path / "lm.csv"
    lm.write_text("a.jpg,10,12,22,12,16,18,11,24,21,24\n")
    assert "already exists" in one_line_error(cli("align", src, dst, "--landmarks", lm))
    assert (dst / "a.jpg").read_bytes() == b"mine"
    assert cli("align", src, dst, "--landmarks", lm, "--overwrite").exit_code == 0


def _nan_checkpoint(trained_checkpoint: Path, path: Path) -> Path:
    from facecli.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained_checkpoint)
    name = next(k for k, v in ckpt["net_state"].items() if v.is_floating_point() and v.ndim > 1)
    ckpt["net_state"][name] = torch.full_like(ckpt["net_state"][name], float("nan"))
    save_checkpoint(ckpt, path)
    return path


def test_non_finite_embeddings_are_refused_everywhere(trained_checkpoint, synth_lfw_dir, tmp_path):
    bad = _nan_checkpoint(trained_checkpoint, tmp_path / "nan.pt")
    images = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[:2]
    assert "non-finite embeddings" in one_line_error(cli("embed", bad, *images, "--out", tmp_path / "e.npz"))
    assert not (tmp_path / "e.npz").exists()
    assert "non-finite" in one_line_error(cli("embed", bad, *images, "--compare", "--no-face-check"))
    people = _people(synth_lfw_dir, tmp_path / "people")
    assert "non-finite" in one_line_error(cli("gallery", "build", bad, people, "--out", tmp_path / "g.npz", "--no-face-check"))


@needs_export
def test_export_of_broken_weights_leaves_the_old_file(trained_checkpoint, tmp_path):
    good = tmp_path / "good.onnx"
    good.write_bytes(b"the user's working model")
    assert "already exists" in one_line_error(cli("export", trained_checkpoint, good))
    result = cli("export", _nan_checkpoint(trained_checkpoint, tmp_path / "nan.pt"), good, "--overwrite")
    assert result.exit_code != 0 and "nothing was written" in result.output, result.output
    assert good.read_bytes() == b"the user's working model" and [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == ["good.onnx"]


@needs_export
def test_export_check_images_skips_a_broken_file(trained_checkpoint, synth_lfw_dir, tmp_path):
    folder = tmp_path / "check"
    folder.mkdir()
    shutil.copy(sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[0], folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    result = cli("export", trained_checkpoint, tmp_path / "m.onnx", "--check-images", folder)
    assert result.exit_code == 0 and "skipped" in result.output and "b.jpg" in result.output and "1 image(s)" in result.output, result.output


# ------------------------------------------------------------------ crafted galleries


def _crafted(gallery: Path, out: Path, **change) -> Path:
    with np.load(gallery) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays["header"]))
    for key, value in change.items():
        if key == "identity":
            header["identity"] = value
        else:
            arrays[key] = value
    arrays["header"] = np.array(json.dumps(header))
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("change, words", [
    ("labels_minus_one", "label is outside"),
    ("nan_template", "not a finite unit vector"),
    ("seven_d", "7-d"),
    ("identity_text", "model identity"),
    ("short_labels", "differ in number"),
    ("string_templates", "not a (N, D) float array"),
])
def test_a_crafted_gallery_is_one_line(trained_checkpoint, gallery, tmp_path, change, words):
    with np.load(gallery) as data:
        labels, templates = data["labels"].copy(), data["templates"].copy()
    if change == "labels_minus_one":
        labels[0] = -1
        kw = dict(labels=labels)
    elif change == "nan_template":
        templates[0, 0] = np.nan
        kw = dict(templates=templates)
    elif change == "seven_d":
        kw = dict(templates=templates[:, :7] / np.linalg.norm(templates[:, :7], axis=1, keepdims=True))
    elif change == "identity_text":
        kw = dict(identity="a string")
    elif change == "short_labels":
        kw = dict(labels=labels[:-1])
    else:
        kw = dict(templates=np.array([["a", "b"]] * len(labels)))
    crafted = _crafted(gallery, tmp_path / "crafted.npz", **kw)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    line = one_line_error(cli("identify", crafted, trained_checkpoint, tmp_path / "a.png", "--threshold", "0.5", "--no-face-check"))
    assert "damaged gallery" in line and words in line


# ------------------------------------------------------------------ what is shown


def test_markup_in_names_and_paths_is_shown_as_written_and_long_names_are_not_cut(trained_checkpoint, synth_lfw_dir, tmp_path):
    source = _people(synth_lfw_dir, tmp_path / "src", count=2, per=2)
    people = tmp_path / "people"
    people.mkdir()
    long_name = "Maria_" + "x" * 60 + "_de_la_Cruz"
    for folder, name in zip(sorted(source.iterdir()), ["[red]Evil", long_name]):
        shutil.copytree(folder, people / name)
    g = tmp_path / "x[/y]" / "g.npz"
    assert cli("gallery", "build", trained_checkpoint, people, "--out", g, "--no-face-check").exit_code == 0
    probes = [next((people / "[red]Evil").iterdir()), next((people / long_name).iterdir())]
    result = cli("identify", g, trained_checkpoint, *probes, "--threshold", "-1", "--no-face-check")
    assert result.exit_code == 0, result.output
    assert "[red]Evil" in result.output and long_name in result.output, result.output


def test_an_empty_probe_folder_mentions_detect_only_when_used(trained_checkpoint, gallery, tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_line_error(cli("identify", gallery, trained_checkpoint, tmp_path / "empty", "--threshold", "0.5"))
    assert "No images to identify" in line and "--detect" not in line


@pytest.mark.parametrize("command", [["embed"], ["gallery", "build"], ["identify"]])
def test_flip_batch_size_and_device_have_help(command):
    text = " ".join(cli(*command, "--help").output.split())
    for words in ("mirror image", "Images per forward pass", "ONNX models run on the CPU"):
        assert words in text, (command, words)


# ------------------------------------------------------------------ one model loader


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory) -> Path:
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip("pip install 'facecli[export]'")
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    result = cli("export", trained_checkpoint, out)
    assert result.exit_code == 0, result.output
    return out


def test_load_model_embeds_paths_images_and_arrays_alike_for_pt_and_onnx(trained_checkpoint, exported, synth_lfw_dir):
    import facecli

    paths = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[:2]
    pt, onnx = facecli.load_model(trained_checkpoint), facecli.load_model(exported)
    from_paths = pt.embed(paths)
    pictures = [Image.open(p).convert("RGB") for p in paths]
    assert from_paths.shape == (2, pt.embedding_dim) and np.allclose(np.linalg.norm(from_paths, axis=1), 1, atol=1e-5)
    assert np.allclose(pt.embed(pictures), from_paths, atol=1e-5)
    assert np.allclose(pt.embed([np.asarray(p) for p in pictures]), from_paths, atol=1e-5)
    assert np.allclose(onnx.embed(paths), from_paths, atol=1e-4) and onnx.model == pt.model == "arcface"


def test_info_eval_and_tune_threshold_take_the_onnx_export(exported, synth_lfw_dir):
    shown = cli("info", exported)
    assert shown.exit_code == 0 and "facecli ONNX export" in shown.output and "arcface" in shown.output, shown.output
    evaluated = cli("eval-lfw", exported, "--lfw-dir", synth_lfw_dir, "--workers", "0", "--device", "cpu")
    assert evaluated.exit_code == 0 and "ccuracy" in evaluated.output, evaluated.output
    assert "--save stores the threshold in a checkpoint" in one_line_error(cli("tune-threshold", exported, "--lfw-dir", synth_lfw_dir, "--save"))


def _tampered(exported: Path, out: Path, change) -> Path:
    import onnx

    proto = onnx.load(str(exported))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["facecli"])
    change(meta, proto)
    props["facecli"] = json.dumps(meta)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(out))
    return out


def _other_weights(meta, proto):
    from onnx import numpy_helper

    init = max(proto.graph.initializer, key=lambda t: len(numpy_helper.to_array(t).ravel()))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))


@pytest.mark.parametrize("change, words", [
    (lambda m, p: m.pop("identity"), "no identity"),
    (lambda m, p: m["identity"].pop("preprocess"), "identity.preprocess"),
    (lambda m, p: m.__setitem__("identity", ["a"]), "no identity"),
    (lambda m, p: m["identity"]["preprocess"].__setitem__("image_size", "abc"), "image_size"),
    (lambda m, p: m["identity"]["preprocess"].__setitem__("image_size", 20000), "image_size"),
    (lambda m, p: m["identity"]["preprocess"].__setitem__("mean", "x"), "mean"),
    (lambda m, p: m.__setitem__("threshold", "high"), "threshold"),
    (_other_weights, "does not belong to its weights"),
])
def test_tampered_onnx_metadata_is_one_line(exported, tmp_path, change, words):
    bad = _tampered(exported, tmp_path / "bad.onnx", change)
    line = one_line_error(cli("info", bad))
    assert words in line, line


# ------------------------------------------------------------------ CSV round trip


@needs_detect
def test_align_landmarks_reads_align_detects_table(tmp_path):
    from conftest import LFW_DIR

    face = LFW_DIR / "lfw-deepfunneled" / "Colin_Powell" / "Colin_Powell_0001.jpg"
    if not face.exists():
        pytest.skip("../shared LFW not present")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(face, src / "a.jpg")
    assert cli("align", src, tmp_path / "det", "--detect", "--largest").exit_code == 0
    header = (tmp_path / "det" / "detections.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and header[-2:] == ["lm5_x", "lm5_y"]
    again = cli("align", src, tmp_path / "lm", "--landmarks", tmp_path / "det" / "detections.csv")
    assert again.exit_code == 0, again.output
    a = np.asarray(Image.open(tmp_path / "det" / "a.jpg"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "lm" / "a.jpg"), dtype=float)
    assert np.abs(a - b).mean() < 2  # the same crop (JPEG noise aside)
    # A second run into the same folder needs --overwrite, and removes the crops the old table listed.
    assert "already exists" in one_line_error(cli("align", src, tmp_path / "det", "--detect"))
    assert cli("align", src, tmp_path / "det", "--detect", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "det").glob("*.jpg")) == ["a_face0.jpg"]
    # ... and a crop never replaces its own source photo.
    assert "overwrite its source photo" in one_line_error(cli("align", src / "a.jpg", src, "--detect", "--largest", "--overwrite"))
