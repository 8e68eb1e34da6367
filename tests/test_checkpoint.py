"""Checkpoints: self-describing, weights_only-loadable, atomic, rolling; clear load errors;
``facecli.load_model`` rebuilds the trained network exactly."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import facecli
from conftest import TINY_TRAIN_ARGS, cli, one_line_error
from facecli.engine.checkpoint import (
    CheckpointSaveError,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
    set_threshold,
)
from facecli.io import WriteError, atomic_write
from facecli.engine.config import TrainConfig
from facecli.engine.trainer import Trainer
from facecli.errors import CheckpointError


def tiny_args(**overrides: str) -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    for flag, value in overrides.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return args



# ----------------------------------------------------------------- what a checkpoint holds
def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained_checkpoint, synth_train_dir):
    ck = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert ck["format"] == "facecli-checkpoint" and ck["format_version"] == 1
    assert ck["model"] == "arcface"
    assert (ck["net"]["backbone"], ck["net"]["embedding_dim"], ck["net"]["normalize"]) == ("resnet18", 512, False)
    assert ck["preprocess"]["image_size"] == 32
    assert len(ck["preprocess"]["mean"]) == 3 and len(ck["preprocess"]["std"]) == 3
    # the label map: identity folder names in label order
    assert ck["classes"] == sorted(p.name for p in synth_train_dir.iterdir() if p.is_dir())
    assert ck["head"]["name"] == "arcface" and ck["head"]["num_classes"] == 12
    assert {"scale", "margin"} <= set(ck["head"]["hparams"])
    assert ck["head_state"]["weight"].shape == (12, 512)
    tc = ck["train_config"]
    assert (tc["batch_size"], tc["lr"], tc["epochs"], tc["optimizer"], tc["scheduler"]) == (16, 0.01, 2, "sgd", "cosine")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"], ck["steps_per_epoch"]) == (2, 0, 8, 4)
    assert math.isfinite(ck["min_loss"])
    for lib in ("facecli", "torch", "torchvision", "numpy", "python"):
        assert isinstance(ck["versions"][lib], str) and ck["versions"][lib]
    assert ck["versions"]["facecli"] == facecli.__version__
    assert "state" in ck["optimizer_state"] and "torch" in ck["rng"]
    # every tensor of the network is there and finite
    net = facecli.load_model(trained_checkpoint).net
    assert set(ck["net_state"]) == set(net.state_dict())
    assert all(torch.isfinite(v.float()).all() for v in ck["net_state"].values())

    result = cli("info", trained_checkpoint)
    assert result.exit_code == 0, result.output
    for text in ("arcface", "resnet18, 512-d", "epoch 2 + 0 batches, step 8", facecli.__version__):
        assert text in result.output


def test_run_directory_rolls_epoch_files_and_writes_config_and_metrics(synth_root, tmp_path):
    ck = tmp_path / "ck"
    # batch 32 on 72 images: 2 steps per epoch, 5 epochs
    result = cli(
        "train", "cosface", "--dataset-path", synth_root, "--checkpoints-dir", ck, "--run-name", "roll", "--no-eval",
        *tiny_args(batch_size="32", epochs="5"), "--log-every", "1",
    )
    assert result.exit_code == 0, result.output
    run = ck / "cosface" / "roll"
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_003.pt", "epoch_004.pt", "epoch_005.pt"]
    for name in ("latest.pt", "min_loss.pt", "config.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))  # no temporary files left behind

    latest = load_checkpoint(run / "latest.pt", expect_model="cosface")
    assert (latest["epoch"], latest["step"], latest["batch_in_epoch"]) == (5, 10, 0)
    assert load_checkpoint(run / "epoch_004.pt")["epoch"] == 4

    config = json.loads((run / "config.json").read_text())
    assert config["run_name"] == "roll" and config["classes"] == 12 and config["images"] == 72
    assert config["config"]["model"] == "cosface" and config["config"]["batch_size"] == 32
    assert config["preprocess"]["image_size"] == 32

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    # min_loss.pt is the epoch with the lowest mean loss among those after the warm-ups
    # (margin warm-up 0.3 x 5 = 1.5 epochs = 3 steps: epoch 1 is a warm-up epoch)
    best = min((r for r in epochs if r["epoch"] >= 2), key=lambda r: r["epoch_loss"])
    min_ck = load_checkpoint(run / "min_loss.pt")
    assert min_ck["epoch"] == best["epoch"]
    assert min_ck["min_loss"] == pytest.approx(best["epoch_loss"])


@pytest.mark.parametrize("model", ["arcface", "facenet"])
def test_load_model_rebuilds_the_trained_network_with_identical_embeddings(model, synth_train_dir, tmp_path):
    cfg = TrainConfig(
        model=model, train_dir=str(synth_train_dir), backbone="resnet18", image_size=32, batch_size=16, epochs=1, workers=0,
        lr=0.01, device="cpu", checkpoints_dir=str(tmp_path / "ck"), run_name="lm", eval=False, wandb=False,
    )
    trainer = Trainer(cfg, log=lambda _: None, warn=lambda _: None)
    trainer.run()
    trainer.net.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.net(x)

    fm = facecli.load_model(tmp_path / "ck" / model / "lm" / "latest.pt")
    assert fm.model == model and not fm.net.training
    assert fm.embedding_dim == (128 if model == "facenet" else 512)
    assert fm.preprocess == trainer.preprocess
    with torch.no_grad():
        got = fm.net(x)
    assert torch.equal(got, expected)
    if model == "facenet":
        assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-5)


def test_set_threshold_is_stored_and_read_back(trained_checkpoint, tmp_path):
    path = tmp_path / "copy.pt"
    shutil.copyfile(trained_checkpoint, path)
    assert facecli.load_model(path).threshold is None
    set_threshold(path, 0.375, "unit test")
    fm = facecli.load_model(path)
    assert fm.threshold == 0.375 and fm.checkpoint["threshold_source"] == "unit test"
    assert torch.equal(fm.checkpoint["net_state"]["neck.2.weight"], load_checkpoint(trained_checkpoint)["net_state"]["neck.2.weight"])


# ----------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "latest.pt"
    target.write_bytes(b"old contents")

    def failing(f):
        f.write(b"half of the new ")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # temporary file removed


def test_atomic_write_disk_full_is_a_save_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "latest.pt"
    save_checkpoint(new_checkpoint(model="arcface", step=1), target)

    def full(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as info:
        atomic_write(target, full)
    assert "disk is full" in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 3
    monkeypatch.setattr(torch, "save", lambda obj, f: full(f))
    with pytest.raises(CheckpointSaveError) as info:  # a checkpoint's error says what the run still has
        save_checkpoint(new_checkpoint(model="arcface", step=2), target)
    assert "disk is full" in str(info.value) and "previous checkpoint is kept" in info.value.hint
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_save_checkpoint_replaces_and_round_trips(tmp_path):
    target = tmp_path / "sub" / "c.pt"
    save_checkpoint(new_checkpoint(model="x", w=torch.arange(3)), target)
    save_checkpoint(new_checkpoint(model="y", w=torch.arange(4)), target)
    ck = torch.load(target, weights_only=True)
    assert ck["model"] == "y" and torch.equal(ck["w"], torch.arange(4))
    assert "versions" in ck and "created" in ck
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


# ----------------------------------------------------------------- load errors
def _minimal(**changes):
    ck = new_checkpoint(
        model="arcface", net={"backbone": "resnet18", "embedding_dim": 8, "normalize": False}, net_state={},
        preprocess={"image_size": 32, "crop_fraction": None, "mean": [0.5] * 3, "std": [0.5] * 3}, classes=["a", "b"],
    )
    ck.update(changes)
    return ck


def _bad_file(kind: str, tmp_path: Path) -> Path:
    p = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return p
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        full = tmp_path / "full.pt"
        save_checkpoint(_minimal(net_state={"w": torch.zeros(1000)}), full)
        p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif kind == "state_dict":
        torch.save({"fc.weight": torch.zeros(2, 2)}, p)
    elif kind == "code":
        torch.save(_minimal(extra=argparse.Namespace(a=1)), p)  # an arbitrary Python object
    elif kind == "version":
        torch.save(_minimal(format_version=99), p)
    elif kind == "incomplete":
        ck = _minimal()
        del ck["classes"]
        torch.save(ck, p)
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("directory", "is not a file"),
        ("empty", "is empty"),
        ("garbage", "damaged or not a PyTorch checkpoint"),
        ("truncated", "damaged or not a PyTorch checkpoint"),
        ("state_dict", "not a facecli checkpoint"),
        ("code", "Refused to load"),
        ("version", "format version 99"),
        ("incomplete", "no 'classes'"),
    ],
)
def test_load_checkpoint_errors_are_one_clear_line(kind, message, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    # the CLI says the same in one line, exit code 2, no traceback
    result = cli("info", path)
    assert result.exit_code == 2
    line = one_line_error(result)
    assert line.startswith("error:") and message in line


def test_load_checkpoint_checks_the_model(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(_minimal(), path)
    assert load_checkpoint(path, expect_model="arcface")["classes"] == ["a", "b"]
    with pytest.raises(CheckpointError, match="is a arcface run, not facenet"):
        load_checkpoint(path, expect_model="facenet")


def test_load_model_with_weights_that_do_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(_minimal(net_state={"neck.2.weight": torch.zeros(3, 3)}), path)
    with pytest.raises(CheckpointError, match="do not fit the stored network"):
        facecli.load_model(path)
