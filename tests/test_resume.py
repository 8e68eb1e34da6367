"""Exact resume: a run stopped mid-epoch (by ``stop_after_steps`` or a real SIGINT/SIGTERM)
and continued with ``facecli resume --from latest`` ends with the same weights as a run
that never stopped (CPU, same seed: data order, flips, dropout RNG and schedule included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TRAIN_ARGS, cli, one_line_error
from facecli.engine.checkpoint import load_checkpoint
from facecli.engine.config import TrainConfig
from facecli.engine.trainer import Trainer


def quiet(_: str) -> None:
    pass


def make_cfg(model: str, train_dir: Path, ck: Path, run: str, **extra) -> TrainConfig:
    fields = dict(
        model=model, train_dir=str(train_dir), backbone="resnet18", image_size=32, batch_size=16, epochs=2, workers=0,
        lr=0.01, device="cpu", checkpoints_dir=str(ck), run_name=run, eval=False, wandb=False, log_every=1,
    )
    return TrainConfig(**{**fields, **extra})


def step_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def epoch_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["epoch_loss"]) for r in records if "epoch_loss" in r]


def assert_same_training_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["batch_in_epoch"], a["step"]) == (b["epoch"], b["batch_in_epoch"], b["step"])
    assert a["min_loss"] == b["min_loss"]
    assert a["net_state"].keys() == b["net_state"].keys()
    for name in a["net_state"]:
        assert torch.equal(a["net_state"][name], b["net_state"][name]), name
    if a["head_state"] is None:
        assert b["head_state"] is None
    else:
        assert a["head_state"].keys() == b["head_state"].keys()
        for name in a["head_state"]:
            assert torch.equal(a["head_state"][name], b["head_state"][name]), name
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        assert torch.equal(sa[pid]["momentum_buffer"], sb[pid]["momentum_buffer"]), pid
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ----------------------------------------------------------------- stopped in-process, resumed by the CLI
@pytest.mark.parametrize(
    "model, stops, extra",
    [
        # mid-epoch 2 (4 steps per epoch), with dropout: the torch RNG must resume exactly
        ("arcface", [6], {"dropout": 0.3}),
        # two interruptions: mid-epoch 1, then mid-epoch 2
        ("facenet", [1, 4], {}),
        # stopped exactly at the end of epoch 1, then mid-epoch 2; its adaptive t buffer must be restored
        ("curricularface", [4, 1], {}),
        # AdaFace's running norm statistics, ElasticFace+'s margin draws (seed and counter) resume
        ("adaface", [3], {}),
        ("elasticface", [5], {"elastic_sort": True}),
    ],
)
def test_interrupted_run_resumed_from_latest_matches_uninterrupted_run(model, stops, extra, synth_train_dir, tmp_path):
    ck = tmp_path / "ck"
    Trainer(make_cfg(model, synth_train_dir, ck, "A", **extra), log=quiet, warn=quiet).run()

    result = Trainer(make_cfg(model, synth_train_dir, ck, "B", **extra), log=quiet, warn=quiet).run(stop_after_steps=stops[0])
    assert result.steps == stops[0]
    latest = ck / model / "B" / "latest.pt"
    for more in stops[1:]:
        saved = load_checkpoint(latest)
        cfg = TrainConfig.from_dict(saved["train_config"])
        result = Trainer(cfg, resume_from=latest, log=quiet, warn=quiet).run(stop_after_steps=more)
        assert result.steps == saved["step"] + more
    saved = load_checkpoint(latest)
    assert saved["step"] == sum(stops) < 8
    if saved["step"] % 4:
        assert saved["batch_in_epoch"] == saved["step"] % 4  # a mid-epoch checkpoint, not the last epoch end

    torch.manual_seed(12345)  # the process RNG must not matter: the checkpoint's is restored
    out = cli("resume", model, "--run", "B", "--from", "latest", "--checkpoints-dir", ck)
    assert out.exit_code == 0, out.output
    assert f"at epoch {saved['epoch'] + 1}, batch {saved['batch_in_epoch']}, step {saved['step']}" in out.output

    a = load_checkpoint(ck / model / "A" / "latest.pt")
    b = load_checkpoint(latest)
    assert (b["epoch"], b["step"]) == (2, 8)
    assert_same_training_state(a, b)
    # every step computed the same loss, and the epoch means (running sums restored) agree
    assert step_losses(ck / model / "A") == step_losses(ck / model / "B")
    assert [s for s, _ in step_losses(ck / model / "B")] == list(range(1, 9))
    assert epoch_losses(ck / model / "A") == epoch_losses(ck / model / "B")


def test_resume_defaults_to_the_newest_run_and_latest(synth_train_dir, tmp_path):
    ck = tmp_path / "ck"
    Trainer(make_cfg("arcface", synth_train_dir, ck, "old", epochs=1), log=quiet, warn=quiet).run(stop_after_steps=1)
    Trainer(make_cfg("arcface", synth_train_dir, ck, "new", epochs=1), log=quiet, warn=quiet).run(stop_after_steps=3)
    os.utime(ck / "arcface" / "old" / "latest.pt", (1, 1))  # make the order unambiguous
    out = cli("resume", "arcface", "--checkpoints-dir", ck)
    assert out.exit_code == 0, out.output
    assert "new" in out.output and "batch 3, step 3" in out.output
    assert load_checkpoint(ck / "arcface" / "new" / "latest.pt")["step"] == 4
    assert load_checkpoint(ck / "arcface" / "old" / "latest.pt")["step"] == 1


# ----------------------------------------------------------------- resume errors and extension

def test_finished_run_needs_more_epochs_and_then_trains_on(trained_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    (ck / "arcface" / "tiny").mkdir(parents=True)
    shutil.copyfile(trained_checkpoint, ck / "arcface" / "tiny" / "latest.pt")
    line = one_line_error(cli("resume", "arcface", "--run", "tiny", "--checkpoints-dir", ck))
    assert "already finished 2 of 2 epochs" in line and "--epochs" in line

    out = cli("resume", "arcface", "--run", "tiny", "--checkpoints-dir", ck, "--epochs", "3")
    assert out.exit_code == 0, out.output
    latest = load_checkpoint(ck / "arcface" / "tiny" / "latest.pt")
    assert (latest["epoch"], latest["step"], latest["train_config"]["epochs"]) == (3, 12, 3)
    assert (ck / "arcface" / "tiny" / "epoch_003.pt").is_file()


def test_resume_errors_are_one_line(trained_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    line = one_line_error(cli("resume", "arcface", "--checkpoints-dir", ck))
    assert str(ck / "arcface") in line and "No arcface runs" in line
    (ck / "arcface" / "tiny").mkdir(parents=True)
    shutil.copyfile(trained_checkpoint, ck / "arcface" / "tiny" / "latest.pt")
    line = one_line_error(cli("resume", "arcface", "--run", "other", "--checkpoints-dir", ck))
    assert "'other'" in line and "tiny" in line  # names the runs that exist
    line = one_line_error(cli("resume", "arcface", "--run", "tiny", "--from", "best", "--checkpoints-dir", ck))
    assert "best.pt" in line
    # the data moved and lost identities of the label map
    partial = tmp_path / "partial"
    (partial / "someone-else").mkdir(parents=True)
    line = one_line_error(cli("resume", "arcface", "--run", "tiny", "--checkpoints-dir", ck, "--epochs", "3", "--train-dir", partial))
    assert "missing" in line and str(partial) in line
    # a facenet run is not resumed as arcface
    (ck / "facenet" / "tiny").mkdir(parents=True)
    shutil.copyfile(trained_checkpoint, ck / "facenet" / "tiny" / "latest.pt")
    line = one_line_error(cli("resume", "facenet", "--run", "tiny", "--checkpoints-dir", ck))
    assert "arcface run, not facenet" in line


# ----------------------------------------------------------------- real signals in a real process
SIGNAL_ARGS = ["--batch-size", "4", "--epochs", "2", "--no-eval", "--log-every", "1", "--checkpoint-every", "0"]  # 18 steps per epoch


def signal_train_args(synth_root: Path, ck: Path, run: str, model: str = "arcface") -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    for flag in ("--batch-size", "--epochs"):
        i = args.index(flag)
        del args[i : i + 2]
    if model == "facenet":
        args += ["--images-per-identity", "2"]  # P x K = 2 x 2: the same 18 steps per epoch
    return ["train", model, "--dataset-path", str(synth_root), "--checkpoints-dir", str(ck), "--run-name", run, *args, *SIGNAL_ARGS]


@pytest.fixture(scope="module")
def uninterrupted_runs(synth_root, tmp_path_factory):
    """The references: the signal tests' configuration trained without interruption, per model."""
    runs: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in runs:
            base = tmp_path_factory.mktemp(f"uninterrupted-{model}")
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(base)  # no stray .env
                out = cli(*signal_train_args(synth_root, base / "ck", "ref", model))
            assert out.exit_code == 0, out.output
            runs[model] = base / "ck" / model / "ref"
        return runs[model]

    return get


def logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                steps.append(record["step"])
    return steps


def interrupt_training(synth_root: Path, tmp_path: Path, sig: int, model: str = "arcface") -> tuple[int, str, Path]:
    """Start ``facecli train`` in a process, send ``sig`` once its first step is logged.

    Two epochs of 18 steps: the signal lands mid-epoch unless this process stalls for
    a whole epoch of the child's steps."""
    ck = tmp_path / "ck"
    run = ck / model / "sig"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for key in ("DATASET_PATH", "CHECKPOINTS_DIR", "WANDB_API_KEY"):
        env.pop(key, None)
    log = tmp_path / "train.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "facecli", *signal_train_args(synth_root, ck, "sig", model)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while not logged_steps(run / "metrics.jsonl"):
                assert proc.poll() is None, f"training ended before the signal:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no training progress:\n{log.read_text()}"
                time.sleep(0.02)
            proc.send_signal(sig)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, log.read_text(), run


def check_stopped_cleanly(sig: int, code: int, exit_code: int, output: str, run: Path, model: str = "arcface") -> dict:
    assert exit_code == code, output
    assert "Traceback" not in output
    assert f"{signal.Signals(sig).name} received" in output
    assert "latest.pt saved" in output and f"facecli resume {model} --run sig --from latest" in output
    saved = load_checkpoint(run / "latest.pt")
    # the checkpoint is at the step the run was on (every finished step is logged), mid-epoch
    assert saved["step"] == max(logged_steps(run / "metrics.jsonl"))
    assert 1 <= saved["step"] < 36
    assert 0 < saved["batch_in_epoch"] < 18, "the signal is expected to land mid-epoch"
    assert saved["step"] == saved["epoch"] * 18 + saved["batch_in_epoch"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".latest*"))
    return saved


def test_sigterm_saves_the_current_step_and_exits_143(synth_root, tmp_path):
    exit_code, output, run = interrupt_training(synth_root, tmp_path, signal.SIGTERM)
    check_stopped_cleanly(signal.SIGTERM, 143, exit_code, output, run)


@pytest.mark.parametrize("model", ["arcface", "facenet"])
def test_sigint_saves_the_current_step_and_resume_matches_uninterrupted_run(model, synth_root, uninterrupted_runs, tmp_path):
    uninterrupted_run = uninterrupted_runs(model)
    exit_code, output, run = interrupt_training(synth_root, tmp_path, signal.SIGINT, model)
    saved = check_stopped_cleanly(signal.SIGINT, 130, exit_code, output, run, model)

    out = cli("resume", model, "--run", "sig", "--from", "latest", "--checkpoints-dir", tmp_path / "ck")
    assert out.exit_code == 0, out.output
    assert f"batch {saved['batch_in_epoch']}, step {saved['step']}" in out.output  # not from the last epoch end
    final = load_checkpoint(run / "latest.pt")
    reference = load_checkpoint(uninterrupted_run / "latest.pt")
    assert (final["epoch"], final["step"]) == (2, 36)
    assert_same_training_state(reference, final)
    assert epoch_losses(run) == epoch_losses(uninterrupted_run)
