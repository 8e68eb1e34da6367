"""Faults lose nothing: SIGKILL while saving, a full disk or a permission error while
saving, a NaN loss, and a W&B that is unreachable, failing or hung.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TRAIN_ARGS, cli

from facecli.engine.checkpoint import load_checkpoint
from facecli.errors import TrainingStopped

# --------------------------------------------------------------------------- SIGKILL during a save

# A fork server: imports torch once, then for every line on stdin forks a writer that saves
# checkpoints to the same path in a loop, as fast as it can, until the test SIGKILLs it.
# Every checkpoint is self-checking: a "version" and a tensor filled with that version.
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from facecli.engine.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint

    path = sys.argv[1]
    numel = int(sys.argv[2])

    def checkpoint(v):
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": "arcface", "net": {},
            "preprocess": {}, "classes": [], "version": v, "net_state": {"w": torch.full((numel,), float(v))},
        }

    print("ready", flush=True)
    for line in sys.stdin:
        first = int(line)
        pid = os.fork()
        if pid == 0:
            try:
                server, deadline, v = os.getppid(), time.monotonic() + 60, first
                # never outlive the test: stop if orphaned or after a minute
                while os.getppid() == server and time.monotonic() < deadline:
                    save_checkpoint(checkpoint(v), path)
                    v += 1
            finally:
                os._exit(1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else f"status {status}", flush=True)
    """
)

NUMEL = 750_000  # 3 MB of float32 per checkpoint
KILLS = 20


def _check_complete(path: Path) -> int:
    from facecli.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    v = ck["version"]
    w = ck["net_state"]["w"]
    assert w.numel() == NUMEL and bool((w == float(v)).all()), f"torn checkpoint: version {v}"
    return v


def test_sigkill_during_checkpoint_writes_never_tears_the_file(tmp_path):
    from facecli.engine.checkpoint import new_checkpoint, save_checkpoint

    target = tmp_path / "run" / "latest.pt"
    first = new_checkpoint(model="arcface", net={}, preprocess={}, classes=[], version=0, net_state={"w": torch.zeros(NUMEL)})
    save_checkpoint(first, target)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(target), str(NUMEL)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    rng = random.Random(1234)
    seen = [0]
    torn_temps = 0
    pid = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        for k in range(1, KILLS + 1):
            proc.stdin.write(f"{k * 100_000}\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            threading.Event().wait(rng.uniform(0.01, 0.2))  # a random moment in the save loop
            os.kill(pid, signal.SIGKILL)
            pid = None
            assert proc.stdout.readline().strip() == "killed"
            v = _check_complete(target)  # loads, and is one complete version
            assert v >= seen[-1], "an older checkpoint replaced a newer one"
            assert v == 0 or v // 100_000 <= k
            seen.append(v)
            temps = [p for p in target.parent.iterdir() if p != target]
            assert all(p.name.startswith(".latest.pt.") and p.name.endswith(".tmp") for p in temps), temps
            torn_temps = len(temps)
    finally:
        if pid is not None:  # the test failed between fork and kill: stop that writer too
            os.kill(pid, signal.SIGKILL)
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    # The kills really landed inside saves: each one that did left its temporary file behind
    # (a SIGKILL runs no cleanup), and the target was never one of them.
    assert torn_temps >= 3, f"only {torn_temps} of {KILLS} kills interrupted a write"
    assert len(set(seen)) >= 3, "the writers hardly ever completed a save"
    for p in target.parent.glob(".latest.pt.*.tmp"):
        p.unlink()


# --------------------------------------------------------------------------- save failures


def _train_args(tmp_path, synth_root, epochs=3):
    args = ["train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path / "ck", "--run-name", "r", "--no-eval"]
    args += TINY_TRAIN_ARGS
    args[args.index("--epochs") + 1] = str(epochs)
    return args


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("fault", ["disk full", "permission denied"])
def test_failed_save_stops_training_and_keeps_the_previous_checkpoint(fault, tmp_path, synth_root, monkeypatch):
    import facecli.engine.checkpoint as ckmod

    saves = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *a, **kw):
        saves["n"] += 1
        if fault == "disk full" and saves["n"] == 2:
            f.write(b"\0" * 4096)  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    def replace(src, dst, *a, **kw):
        if fault == "permission denied" and saves["n"] >= 2 and str(dst).endswith(".pt"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(ckmod.torch, "save", save)
    monkeypatch.setattr(ckmod.os, "replace", replace)
    result = cli(*_train_args(tmp_path, synth_root))
    monkeypatch.undo()

    out = " ".join(result.output.split())
    assert result.exit_code == 3, result.output
    assert "Traceback" not in out
    assert "error: Could not write" in out and "epoch_002.pt" in out
    assert ("the disk is full" if fault == "disk full" else "Permission denied") in out
    assert "The previous checkpoint is kept" in out and "then resume" in out

    from facecli.engine.checkpoint import load_checkpoint

    run = tmp_path / "ck" / "arcface" / "r"
    ck = load_checkpoint(run / "latest.pt")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 0, 4)
    assert not (run / "epoch_002.pt").exists()
    assert not list(run.glob(".*.tmp")), "the failed write left its temporary file"
    # training stopped at the failed save: no second epoch summary, nothing after step 8
    records = _metrics(run)
    assert [r["epoch"] for r in records if "epoch_loss" in r] == [1]
    assert max(r["step"] for r in records) == 8


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, synth_root, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}
    real = F.cross_entropy

    def cross_entropy(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    result = cli(*_train_args(tmp_path, synth_root))
    monkeypatch.undo()

    out = " ".join(result.output.split())
    assert result.exit_code == 4, result.output
    assert "Traceback" not in out
    assert "Loss became nan at step 6 (epoch 2, batch 2)" in out
    assert "lower learning rate" in out and "--lr 0.001" in out
    assert "last good checkpoint" in out

    from facecli.engine.checkpoint import load_checkpoint

    run = tmp_path / "ck" / "arcface" / "r"
    ck = load_checkpoint(run / "latest.pt")
    assert (ck["epoch"], ck["step"]) == (1, 4)  # from before the bad step
    assert all(torch.isfinite(t).all() for t in ck["net_state"].values() if t.is_floating_point())
    assert not (run / "epoch_002.pt").exists()
    assert max(r["step"] for r in _metrics(run)) <= 5


class _NanGradient(torch.autograd.Function):
    """Adds 0 to the loss; its gradient is NaN: a non-finite gradient under a finite loss."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0.0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"))


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_bad_step_never_changes_the_weights(what, tmp_path, synth_train_dir, monkeypatch):
    """Step 6 alone goes bad; the run stops at the next read (the epoch end, step 8) with the
    weights of steps 1-5, 7 and 8 in memory: finite, so the bad update was skipped, not undone."""
    import facecli.losses as losses
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer

    real = losses.MarginHead.loss
    calls = {"n": 0}

    def loss(self, embeddings, labels):
        calls["n"] += 1
        value = real(self, embeddings, labels)
        if calls["n"] != 6:
            return value
        return value * float("nan") if what == "loss" else value + _NanGradient.apply(embeddings)

    monkeypatch.setattr(losses.MarginHead, "loss", loss)
    cfg = TrainConfig(
        model="arcface", train_dir=str(synth_train_dir), backbone="resnet18", image_size=32, batch_size=16, epochs=3, workers=0,
        lr=0.01, device="cpu", checkpoints_dir=str(tmp_path / "ck"), run_name="r", eval=False, wandb=False,
    )
    trainer = Trainer(cfg, log=lambda _: None, warn=lambda _: None)
    with pytest.raises(TrainingStopped) as info:
        trainer.run()
    assert info.value.exit_code == 4
    assert "at step 6 (epoch 2, batch 2)" in info.value.message
    assert ("Loss became nan" if what == "loss" else "A gradient became non-finite") in info.value.message
    assert calls["n"] == 8 and trainer.state.step == 8  # it ran on to the next read
    weights = [p for p in trainer.parts.model.parameters()]
    assert all(torch.isfinite(p).all() for p in weights), "the bad step changed the weights"
    momentum = [trainer.parts.optimizer.state[p].get("momentum_buffer") for p in weights]
    assert all(m is None or torch.isfinite(m).all() for m in momentum)
    assert load_checkpoint(tmp_path / "ck" / "arcface" / "r" / "latest.pt")["step"] == 4


# --------------------------------------------------------------------------- W&B


def test_unreachable_wandb_never_stops_training(tmp_path, synth_root):
    """A real facecli process, a W&B key, online mode, and nothing listening at the W&B host."""
    fake_key = "0123456789abcdef0123456789abcdef01234567"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_API_KEY=fake_key,
        WANDB_BASE_URL="http://127.0.0.1:9",  # discard port: connection refused
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        PYTHONPATH=str(REPO),
    )
    args = [a for a in _train_args(tmp_path, synth_root, epochs=1) if a != "--no-wandb"]
    proc = subprocess.run(
        [sys.executable, "-m", "facecli", *map(str, args)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    warnings = " ".join(line for line in out.splitlines() if line.startswith("warning:"))
    assert "W&B" in warnings and "metrics.jsonl" in warnings, out
    assert fake_key not in out

    from facecli.engine.checkpoint import load_checkpoint

    run = tmp_path / "ck" / "arcface" / "r"
    assert load_checkpoint(run / "latest.pt")["epoch"] == 1
    assert [r["epoch"] for r in _metrics(run) if "epoch_loss" in r] == [1]


class _FakeWandb:
    """Stands in for the wandb module: an init that fails, hangs, or a run whose log fails."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.release = threading.Event()
        self.logged: list = []
        self.finished = threading.Event()

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("wandb")
        mod.Settings = lambda **kw: kw
        mod.init = self.init
        return mod

    def init(self, **kw):
        if self.behaviour == "misconfigured":
            raise ValueError("entity 'nobody' not found (HTTP 404)")
        if self.behaviour == "hung":
            self.release.wait(120)
            raise ConnectionError("gave up")
        fake = self

        class Run:
            summary: dict = {}

            def log(self, data, step=None):
                if fake.behaviour == "rate-limited":
                    raise RuntimeError("HTTP 429: rate limit exceeded")
                fake.logged.append(step)

            def finish(self):
                fake.finished.set()

        return Run()


def _tracker(tmp_path, warnings):
    from facecli.engine.tracking import WandbTracker

    return WandbTracker(
        project="p", entity=None, mode="online", run_name="r", run_id="r", config={"lr": 0.1},
        directory=tmp_path, api_key=None, warn=warnings.append,
    )


def _log_many(tracker, n: int = 3000) -> None:
    """The training loop's side: must never block, whatever W&B does (checked in a thread)."""
    t = threading.Thread(target=lambda: [tracker.log({"loss": 1.0}, step) for step in range(n)])
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "logging blocked on W&B"


@pytest.mark.parametrize("behaviour", ["misconfigured", "rate-limited", "hung", "healthy"])
def test_wandb_trouble_is_one_warning_and_never_blocks(behaviour, tmp_path, monkeypatch):
    from facecli.engine.tracking import wandb_left_running

    fake = _FakeWandb(behaviour)
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    warnings: list[str] = []
    tracker = _tracker(tmp_path, warnings)
    _log_many(tracker)
    tracker.close(timeout=0.5 if behaviour == "hung" else 30)
    try:
        if behaviour == "healthy":
            assert warnings == [] and fake.finished.is_set()
            assert len(fake.logged) >= 1
            assert not wandb_left_running()
        elif behaviour == "hung":
            # close() gave up on a W&B still starting: it did not wait for the init
            assert not fake.release.is_set() and wandb_left_running()
            assert len(warnings) == 1 and "did not finish within 0.5 s" in warnings[0] and "metrics.jsonl" in warnings[0]
        else:
            assert len(warnings) == 1, warnings
            what = "start" if behaviour == "misconfigured" else "logging"
            assert f"W&B {what} failed" in warnings[0] and "training goes on" in warnings[0]
            assert ("404" if behaviour == "misconfigured" else "429") in warnings[0]
    finally:
        fake.release.set()
        tracker._thread.join(timeout=30)
    assert len(warnings) <= 1  # a late failure after close() does not warn again


def test_resume_removes_temporary_files_of_a_killed_save(synth_root, tmp_path):
    """A SIGKILL mid-save leaves a hidden .tmp beside the checkpoint; the next run clears it."""
    ck = tmp_path / "ck"
    r = cli("train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", ck, "--run-name", "t", "--no-eval", *TINY_TRAIN_ARGS)
    assert r.exit_code == 0, r.output
    run = ck / "arcface" / "t"
    stale = run / ".latest.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    r = cli("resume", "arcface", "--run", "t", "--epochs", "2", "--checkpoints-dir", ck)
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2


def test_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(tmp_path, synth_root, monkeypatch):
    """A CUDA out-of-memory error in a step (injected here on the CPU) is one line with the step,
    the batch size, the memory and what to lower; exit 5; the checkpoint of epoch 1 stays."""
    from facecli.engine.step import StepRunner

    real = StepRunner.__call__

    def step(self, images, labels, step, sizes):
        if step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, labels, step, sizes)

    monkeypatch.setattr(StepRunner, "__call__", step)
    result = cli(*_train_args(tmp_path, synth_root))
    out = " ".join(result.output.split())
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output
    assert "Out of memory at step 6 with --batch-size 16 per process" in out and "Lower --batch-size (e.g. 8)" in out
    assert "The last checkpoint in" in out and "is kept" in out
    ck = load_checkpoint(tmp_path / "ck" / "arcface" / "r" / "latest.pt")
    assert (ck["epoch"], ck["step"]) == (1, 4)
