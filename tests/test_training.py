"""End-to-end training of all five models on the tiny synthetic set, bad images skipped and
reported, odd image modes converted, dataset paths from flags and ``.env``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_ARGS, cli, one_line_error
from facecli.data.images import decode_image
from facecli.engine.checkpoint import load_checkpoint

MODELS = ["sphereface", "cosface", "arcface", "curricularface", "facenet"]


def tiny_args(**overrides: str) -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    for flag, value in overrides.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return args



def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------- the five models
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_end_to_end(model, synth_root, tmp_path):
    ck = tmp_path / "ck"
    result = cli(
        "train", model, "--dataset-path", synth_root, "--checkpoints-dir", ck, "--run-name", "r",
        *TINY_TRAIN_ARGS, "--no-eval", "--log-every", "1",
    )
    assert result.exit_code == 0, result.output
    assert "Done: 1 epoch(s), 4 steps" in result.output
    run = ck / model / "r"
    latest = load_checkpoint(run / "latest.pt", expect_model=model)
    assert (latest["epoch"], latest["batch_in_epoch"], latest["step"], latest["steps_per_epoch"]) == (1, 0, 4, 4)
    assert len(latest["classes"]) == 12
    assert latest["train_config"]["model"] == model and latest["train_config"]["batch_size"] == 16
    assert latest["net"]["backbone"] == "resnet18"
    if model == "facenet":
        # 16 = P4 x K4 batches from 12 identities x 6 images; a normalised 128-d embedding
        assert latest["net"] == {"backbone": "resnet18", "embedding_dim": 128, "normalize": True, "image_size": 32}
        assert latest["head_state"] is None
        assert latest["train_config"]["images_per_identity"] == 4
    else:
        assert latest["net"]["embedding_dim"] == 512 and not latest["net"]["normalize"]
        assert latest["head_state"]["weight"].shape == (12, 512)
        assert torch.isfinite(latest["head_state"]["weight"]).all()
    if model == "curricularface":
        t = latest["head_state"]["t"]
        assert t.ndim == 0 and float(t) != 0.0  # the adaptive t moved during training
    # the network was trained: finite weights, BatchNorm statistics and momentum buffers updated
    assert all(torch.isfinite(v.float()).all() for v in latest["net_state"].values())
    running = [v for k, v in latest["net_state"].items() if k.endswith("running_mean")]
    assert running and all(float(v.abs().sum()) > 0 for v in running)
    assert any(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in latest["optimizer_state"]["state"].values())
    # one finite loss per step, and the epoch's mean
    records = metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert latest["min_loss"] == pytest.approx(np.mean(losses))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------- damaged and unusual images
def _write_odd_images(folder: Path) -> list[Path]:
    """Grayscale and CMYK JPEGs; 16-bit, palette-with-alpha, LA and RGBA PNGs; all non-square."""
    rng = np.random.default_rng(0)
    made = []
    face = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(face).convert("L").save(folder / "odd_gray.jpg")
    Image.fromarray(face).convert("CMYK").save(folder / "odd_cmyk.jpg")
    Image.fromarray((face[..., 0].astype(np.uint16) * 257)).save(folder / "odd_gray16.png")
    pal = Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(folder / "odd_palette_alpha.png", transparency=0)
    Image.fromarray(face).convert("LA").save(folder / "odd_la.png")
    Image.fromarray(face).convert("RGBA").save(folder / "odd_rgba.png")
    made += [folder / n for n in ("odd_gray.jpg", "odd_cmyk.jpg", "odd_gray16.png", "odd_palette_alpha.png", "odd_la.png", "odd_rgba.png")]
    return made


def test_corrupt_images_are_skipped_and_reported(synth_train_dir, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(synth_train_dir, train)
    ids = sorted(p for p in train.iterdir() if p.is_dir())
    good = next(ids[0].glob("*.jpg")).read_bytes()
    (ids[0] / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (ids[1] / "text.jpg").write_text("I am not a JPEG, just a text file with the wrong name.\n")
    (ids[2] / "empty.jpg").write_bytes(b"")
    odd = _write_odd_images(ids[3])
    # 72 + 2 bad + 6 odd = 80 indexed files (the empty one is dropped when indexing):
    # batch 40 draws every file exactly once in the epoch's 2 steps.
    result = cli(
        "train", "arcface", "--train-dir", train, "--checkpoints-dir", tmp_path / "ck", "--run-name", "bad",
        *tiny_args(batch_size="40"), "--no-eval",
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # undo any wrapping
    assert "Skipped 2 unreadable image(s) during training" in out
    assert str(ids[0] / "truncated.jpg") in out and str(ids[1] / "text.jpg") in out
    assert "Skipped 1 empty image file(s)" in out and str(ids[2] / "empty.jpg") in out
    assert not any(str(p) in out for p in odd)  # unusual modes are converted, not skipped
    latest = load_checkpoint(tmp_path / "ck" / "arcface" / "bad" / "latest.pt")
    assert (latest["epoch"], latest["step"]) == (1, 2) and math.isfinite(latest["min_loss"])
    assert len(latest["classes"]) == 12


@pytest.mark.parametrize(
    "name, make, check",
    [
        ("gray.jpg", lambda p: Image.new("L", (40, 30), 100).save(p), lambda x: (x == 100).all()),
        # CMYK red (0, 255, 255, 0) is RGB red
        ("cmyk.jpg", lambda p: Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p, quality=95),
         lambda x: (x[0] > 240).all() and (x[1:] < 15).all()),
        # 16-bit: 0 stays black, 65535 becomes 255 (not clipped garbage)
        ("gray16.png", lambda p: Image.fromarray(np.where(np.arange(32)[None, :] < 16, 0, 65535).repeat(32, 0).astype(np.uint16)).save(p),
         lambda x: (x[:, :, :6] == 0).all() and (x[:, :, -6:] == 255).all()),
        # palette with a transparent entry: transparent pixels are black, opaque red stays red
        ("palette_alpha.png", lambda p: _palette_png(p), lambda x: (x[:, :, :6] == 0).all() and (x[0, :, -6:] == 255).all() and (x[1:, :, -6:] == 0).all()),
        ("la.png", lambda p: Image.new("LA", (32, 32), (200, 255)).save(p), lambda x: (x == 200).all()),
        ("rgba.png", lambda p: Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(p), lambda x: (x == 0).all()),
        ("wide.png", lambda p: Image.new("RGB", (64, 16), (1, 2, 3)).save(p), lambda x: (x[0] == 1).all() and (x[2] == 3).all()),
    ],
)
def test_unusual_image_modes_become_rgb_uint8(name, make, check, tmp_path):
    path = tmp_path / name
    make(path)
    x = decode_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert check(x), x[:, 8]
    # and the same from bytes
    assert torch.equal(decode_image(path.read_bytes(), 16), x)


def _palette_png(path: Path) -> None:
    p = Image.new("P", (32, 32), 0)
    p.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    p.paste(1, (16, 0, 32, 32))
    p.save(path, transparency=0)


# ----------------------------------------------------------------- dataset paths
def test_missing_dataset_path_is_one_error_line(tmp_path):
    missing = tmp_path / "does-not-exist"
    result = cli("train", "arcface", "--dataset-path", missing, "--checkpoints-dir", tmp_path / "ck", *TINY_TRAIN_ARGS)
    assert result.exit_code == 2
    line = one_line_error(result)
    assert str(missing) in line
    assert not (tmp_path / "ck").exists()


def test_missing_train_dir_and_empty_dataset_root_are_one_error_line(tmp_path):
    line = one_line_error(cli("train", "arcface", "--train-dir", tmp_path / "nope", *TINY_TRAIN_ARGS))
    assert str(tmp_path / "nope") in line and "--train-dir" in line
    (tmp_path / "root").mkdir()
    line = one_line_error(cli("train", "arcface", "--dataset-path", tmp_path / "root", *TINY_TRAIN_ARGS))
    assert str(tmp_path / "root") in line and "CASIA-webface" in line


def test_batch_larger_than_dataset_is_one_error_line(synth_root, tmp_path):
    line = one_line_error(cli("train", "arcface", "--dataset-path", synth_root, *tiny_args(batch_size="100"), "--no-eval"))
    assert "exceeds the 72 training images" in line


def test_dataset_path_from_dotenv_and_flag_override(synth_root, synth_train_dir, tmp_path):
    # .env in the working directory (the autouse fixture chdirs into tmp_path)
    (tmp_path / ".env").write_text(f"DATASET_PATH={synth_root}\n")
    result = cli("train", "facenet", "--checkpoints-dir", tmp_path / "ck", "--run-name", "env", *tiny_args(batch_size="32"), "--no-eval")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ck" / "facenet" / "env" / "config.json").read_text())
    assert config["classes"] == 12
    assert Path(config["config"]["train_dir"]) == synth_train_dir
    assert Path(config["config"]["lfw_dir"]) == synth_root / "Labeled Faces in the Wild (LFW)"

    # --dataset-path wins over .env: a smaller set with 3 identities
    other = tmp_path / "other"
    for ident in sorted(p for p in synth_train_dir.iterdir() if p.is_dir())[:3]:
        shutil.copytree(ident, other / "CASIA-webface" / ident.name)
    result = cli(
        "train", "facenet", "--dataset-path", other, "--checkpoints-dir", tmp_path / "ck", "--run-name", "flag",
        *tiny_args(batch_size="8"), "--no-eval",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ck" / "facenet" / "flag" / "config.json").read_text())
    assert config["classes"] == 3 and Path(config["config"]["train_dir"]) == other / "CASIA-webface"
    assert config["config"]["lfw_dir"] is None

    # a wrong DATASET_PATH in .env does not matter when the flag is given
    (tmp_path / ".env").write_text(f"DATASET_PATH={tmp_path / 'gone'}\n")
    result = cli("train", "facenet", "--dataset-path", other, "--checkpoints-dir", tmp_path / "ck", "--run-name", "flag2", *tiny_args(batch_size="8"), "--no-eval")
    assert result.exit_code == 0, result.output
