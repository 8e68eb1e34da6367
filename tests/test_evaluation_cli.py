"""`facecli eval-lfw` and `facecli tune-threshold` end to end, checked against `embed` + `verify`.

The scores here are recomputed in the test from `facecli embed` output and the pairs file
(parsed by the test itself), so a wrong pair index, fold split, threshold rule or
forward-pass count in the evaluation commands shows up as a mismatch.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LFW_DIR, cli, requires_shared

from facecli.engine.checkpoint import load_checkpoint, save_checkpoint
from facecli.evaluation.protocol import best_threshold, verify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def parse_pairs(pairs_file: Path, image_root: Path) -> tuple[list[tuple[Path, Path]], np.ndarray, int]:
    """(pairs as image paths, issame, folds) of an LFW pairs file, read the way the LFW README says."""
    lines = [line.split() for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    header, body = lines[0], lines[1:]
    folds = int(header[0]) if len(header) == 2 else 1
    pairs, same = [], []
    for toks in body:
        if len(toks) == 3:
            a, b = (toks[0], int(toks[1])), (toks[0], int(toks[2]))
        else:
            a, b = (toks[0], int(toks[1])), (toks[2], int(toks[3]))
        pairs.append(tuple(image_root / n / f"{n}_{i:04d}.jpg" for n, i in (a, b)))
        same.append(len(toks) == 3)
    return pairs, np.array(same), folds


def embed_table(checkpoint: Path, folder: Path, out: Path, *extra: str) -> dict[Path, np.ndarray]:
    """{image path: embedding} from `facecli embed` of a whole folder."""
    r = cli("embed", checkpoint, folder, "--out", out, "--device", "cpu", *extra)
    assert r.exit_code == 0, r.output
    data = np.load(out)
    return {Path(str(p)).resolve(): v for p, v in zip(data["paths"], data["embeddings"])}


def scores_from(table: dict[Path, np.ndarray], pairs) -> np.ndarray:
    return np.array([float(np.dot(table[a.resolve()].astype(np.float64), table[b.resolve()].astype(np.float64))) for a, b in pairs])


def copy_checkpoint(src: Path, dst_dir: Path, name: str = "run.pt") -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / name
    shutil.copy2(src, dst)
    return dst


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- eval-lfw on the synthetic set


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_eval_lfw_agrees_with_verify_on_embed_output(trained_checkpoint, synth_lfw_dir, tmp_path, flip):
    image_root = synth_lfw_dir / "lfw_funneled"
    pairs, issame, folds = parse_pairs(synth_lfw_dir / "pairs.txt", image_root)
    flag = "--flip" if flip else "--no-flip"
    table = embed_table(trained_checkpoint, image_root, tmp_path / "emb.npz", flag, "--batch-size", "128")
    expected = verify(scores_from(table, pairs), issame, folds=folds)

    out = tmp_path / "eval" / "lfw.json"
    r = cli("eval-lfw", trained_checkpoint, "--lfw-dir", synth_lfw_dir, "--json", out, flag,
            "--batch-size", "128", "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())

    assert got["pairs"] == len(pairs) == 600
    assert got["folds"] == 10
    assert got["flip"] is flip
    assert got["accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(expected.accuracy_std, abs=1e-12)
    assert got["fold_accuracies"] == pytest.approx(expected.fold_accuracies.tolist(), abs=1e-12)
    assert got["fold_thresholds"] == pytest.approx(expected.fold_thresholds.tolist(), abs=1e-6)
    assert got["auc"] == pytest.approx(expected.auc, abs=1e-9)
    assert got["eer"] == pytest.approx(expected.eer, abs=1e-9)
    assert got["tar_at_far"] == pytest.approx({f"{k:g}": v for k, v in expected.tar_at_far.items()}, abs=1e-9)

    unique = {p for pair in pairs for p in pair}
    assert got["unique_images"] == len(unique)
    assert got["forward_passes"] == len(unique) * (2 if flip else 1)
    assert got["missing_pairs"] == 0
    assert got["seconds"] >= 0

    # The rich table and the pictures beside the JSON.
    for word in ("mean ± std", "AUC", "EER", "TAR@FAR=0.001", "threshold"):
        assert word in r.stdout, word
    assert f"{100 * expected.accuracy:.2f}" in r.stdout
    pictures = [Path(p) for p in got["pictures"]]
    assert [p.name for p in pictures] == ["lfw_roc.png", "lfw_scores.png"]
    assert all(p.parent == out.parent and is_png(p) for p in pictures)


def test_eval_lfw_as_written_with_dataset_path(trained_checkpoint, synth_root, tmp_path, monkeypatch):
    """`facecli eval-lfw run.pt` with nothing else when DATASET_PATH holds 'Labeled Faces in the Wild (LFW)'."""
    ckpt = load_checkpoint(trained_checkpoint)  # without its run's lfw_dir (eval-lfw's first default)
    ckpt["train_config"]["lfw_dir"] = None
    save_checkpoint(ckpt, tmp_path / "run.pt")  # the autouse fixture made tmp_path the working directory
    r = cli("eval-lfw", "run.pt")
    assert r.exit_code == 2
    assert "No LFW folder" in r.stderr and "Traceback" not in r.output

    monkeypatch.setenv("DATASET_PATH", str(synth_root))
    r = cli("eval-lfw", "run.pt")
    assert r.exit_code == 0, r.output
    assert "600 pairs" in r.stdout and "120 distinct images, 240 forward passes" in r.stdout
    assert is_png(tmp_path / "eval_lfw_roc.png") and is_png(tmp_path / "eval_lfw_scores.png")


def test_eval_lfw_allow_missing_counts_dropped_pairs(trained_checkpoint, synth_lfw_dir, tmp_path):
    lfw = tmp_path / "lfw"
    shutil.copytree(synth_lfw_dir, lfw)
    image_root = lfw / "lfw_funneled"
    pairs, _, _ = parse_pairs(lfw / "pairs.txt", image_root)
    gone = pairs[0][1]
    gone.unlink()
    dropped = sum(gone in pair for pair in pairs)
    kept_images = {p for pair in pairs if gone not in pair for p in pair}
    assert dropped >= 1

    out = tmp_path / "missing.json"
    args = ["eval-lfw", trained_checkpoint, "--lfw-dir", lfw, "--json", out, "--device", "cpu", "--workers", "0"]
    r = cli(*args)
    assert r.exit_code == 2
    assert "missing" in r.stderr and gone.name in r.stderr and "Traceback" not in r.output
    assert "--allow-missing" in " ".join(r.stderr.split())
    assert not out.exists()

    r = cli(*args, "--allow-missing")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["missing_pairs"] == dropped
    assert got["pairs"] == len(pairs) - dropped
    assert got["unique_images"] == len(kept_images)
    assert got["forward_passes"] == 2 * len(kept_images)
    assert len(got["fold_accuracies"]) == 10
    assert f"{dropped} pairs missing" in r.stdout


def _plain_state_dict(path: Path, real: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _truncated(path: Path, real: Path) -> None:
    data = real.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_torch(path: Path, real: Path) -> None:
    path.write_bytes(b"these are not the weights you are looking for\n" * 10)


def _jpeg(path: Path, real: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))


class _Pickled:
    """Any Python object: loading it would need unpickling arbitrary classes."""


def _python_object(path: Path, real: Path) -> None:
    torch.save({"format": "facecli", "payload": _Pickled()}, path)


@pytest.mark.parametrize(
    "make, words",
    [
        (_plain_state_dict, "not a facecli checkpoint"),
        (_truncated, "damaged"),
        (_not_torch, "damaged"),
        (_jpeg, "damaged"),
        (_python_object, "Refused to load"),
    ],
    ids=["state-dict", "truncated", "text", "jpeg", "python-object"],
)
@pytest.mark.parametrize("command", ["eval-lfw", "tune-threshold", "embed"])
def test_bad_checkpoint_is_one_clear_error(trained_checkpoint, synth_lfw_dir, tmp_path, make, words, command):
    bad = tmp_path / "bad.pt"
    make(bad, trained_checkpoint)
    if command == "embed":
        args = ["embed", bad, synth_lfw_dir / "lfw_funneled", "--out", tmp_path / "e.npz"]
    else:
        args = [command, bad, "--lfw-dir", synth_lfw_dir]
    r = cli(*args, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[0].startswith("error:") and words in r.stderr, r.stderr
    assert str(bad) in r.stderr


# --------------------------------------------------------------------------- tune-threshold + embed --compare


def _compare(checkpoint: Path, a: Path, b: Path):
    r = cli("embed", checkpoint, a, b, "--compare", "--device", "cpu", "--no-face-check")  # synthetic faces are not faces to dlib
    m = re.search(r"cosine similarity: (-?[0-9.]+)", r.stdout)
    assert m, r.output
    return r, float(m.group(1))


def test_tune_threshold_save_then_compare(trained_checkpoint, synth_lfw_dir, tmp_path):
    ck = copy_checkpoint(trained_checkpoint, tmp_path / "run")
    image_root = synth_lfw_dir / "lfw_funneled"
    train_pairs, train_same, _ = parse_pairs(synth_lfw_dir / "pairsDevTrain.txt", image_root)
    test_pairs, test_same, _ = parse_pairs(synth_lfw_dir / "pairsDevTest.txt", image_root)
    table = embed_table(ck, image_root, tmp_path / "emb.npz")
    train_scores = scores_from(table, train_pairs)

    # Choose the two pairs from View 1 so the verdicts test the plumbing, not the model.
    same_pair = train_pairs[int(np.argmax(np.where(train_same, train_scores, -np.inf)))]
    diff_pair = train_pairs[int(np.argmin(np.where(~train_same, train_scores, np.inf)))]

    # Before any threshold is stored: the similarity, then a clear error.
    r, _ = _compare(ck, *same_pair)
    assert r.exit_code == 2
    assert "stores no verification threshold" in r.stderr and "tune-threshold" in r.stderr
    assert "Traceback" not in r.output

    before = load_checkpoint(ck)
    assert before.get("threshold") is None
    out = tmp_path / "tune" / "threshold.json"
    r = cli("tune-threshold", ck, "--lfw-dir", synth_lfw_dir, "--save", "--json", out, "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())

    # The threshold is the rule of `verify` on the dev-train scores, reported on dev-test.
    thr, train_acc = best_threshold(train_scores, train_same)
    assert got["threshold"] == pytest.approx(thr, abs=1e-6)
    assert got["train_accuracy"] == pytest.approx(train_acc, abs=1e-12)
    test_acc = np.mean((scores_from(table, test_pairs) >= got["threshold"]) == test_same)
    assert got["test_accuracy"] == pytest.approx(test_acc, abs=1e-12)
    assert got["train_pairs"] == len(train_pairs) and got["test_pairs"] == len(test_pairs)
    assert "accuracy" in r.stdout and f"{got['threshold']:.4f}" in r.stdout
    assert is_png(Path(got["picture"])) and Path(got["picture"]).parent == out.parent

    # Stored atomically: the checkpoint is whole, the weights untouched, no temp files left.
    after = load_checkpoint(ck)
    assert after["threshold"] == got["threshold"]
    assert after["threshold_source"]
    assert after["net_state"].keys() == before["net_state"].keys()
    assert all(torch.equal(after["net_state"][k], before["net_state"][k]) for k in before["net_state"])
    assert sorted(p.name for p in ck.parent.iterdir()) == ["run.pt"]

    stored = after["threshold"]
    r, sim = _compare(ck, *same_pair)
    assert r.exit_code == 0, r.output
    verdict = r.stdout.strip().splitlines()[-1].split()[0]
    assert verdict == ("same" if sim >= stored else "different")
    assert verdict == "same"
    assert f"threshold {stored:.4f}" in r.stdout

    r, sim = _compare(ck, *diff_pair)
    assert r.exit_code == 0, r.output
    verdict = r.stdout.strip().splitlines()[-1].split()[0]
    assert verdict == ("same" if sim >= stored else "different")
    assert verdict == "different"


# --------------------------------------------------------------------------- the real LFW


@requires_shared(LFW_DIR / "lfw-deepfunneled")
def test_eval_lfw_on_real_lfw(trained_checkpoint, tmp_path):
    out = tmp_path / "real" / "lfw.json"
    r = cli("eval-lfw", trained_checkpoint, "--lfw-dir", LFW_DIR, "--json", out, "--workers", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["pairs"] == 6000
    assert got["unique_images"] == 7701
    assert got["forward_passes"] == 15402
    assert got["missing_pairs"] == 0
    assert len(got["fold_accuracies"]) == 10 and len(got["fold_thresholds"]) == 10
    assert all(0.0 <= a <= 1.0 for a in got["fold_accuracies"])
    assert got["accuracy"] == pytest.approx(np.mean(got["fold_accuracies"]), abs=1e-12)
    assert all(is_png(Path(p)) for p in got["pictures"]) and len(got["pictures"]) == 2
