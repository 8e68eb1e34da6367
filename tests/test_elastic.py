"""Runs that survive a lost worker (issue 21): under ``torchrun --max-restarts``, a worker
SIGKILLed mid-epoch makes torchrun restart the group, which continues the run from its
latest.pt by itself and ends with the weights of a run that was never interrupted (exactly);
a restart whose command no longer matches the run is one clear error; outside a restart an
existing run is refused as before. 2 gloo processes on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli, one_line_error
from test_distributed import _assert_same_training_state, _env, _load, _tiny, _torchrun

STEPS = 6  # 72 images, 2 x 6 per step, 1 epoch


def _args(root, ck, run: str | None) -> list[str]:
    args = _tiny(root, ck, run or "unused", 6, 1) + ["--checkpoint-every", "2", "--margin-warmup-epochs", "0"]
    if run is None:  # no --run-name: the restarted group finds its run by torchrun's job id
        i = args.index("--run-name")
        del args[i : i + 2]
    return args


def _worker_of_rank(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=``rank`` (a child of the agent), if running."""
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
    return None


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_restarts_and_the_run_ends_as_if_never_interrupted(synth_root, tmp_path):
    _torchrun("-m", "facecli", "train", "arcface", *_args(synth_root, tmp_path / "a", "whole"))

    runs = tmp_path / "b" / "arcface"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "facecli", "train", "arcface", *_args(synth_root, tmp_path / "b", None)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list(runs.glob("*/latest.pt")), 120, "the first checkpoint")
        victim = _wait_for(lambda: _worker_of_rank(proc.pid, 1), 10, "rank 1's worker")
        os.kill(victim, signal.SIGKILL)  # mid-epoch: latest.pt holds step 2 (or 4) of 6
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
    assert "Resuming arcface" in out and "step 0." not in out, out  # continued, not started again
    (run,) = list(runs.iterdir())
    final = _load(run / "latest.pt")
    assert final["step"] == STEPS
    _assert_same_training_state(final, _load(tmp_path / "a" / "arcface" / "whole" / "latest.pt"), exact=True)


def test_restart_with_other_settings_is_one_error_and_no_restart_still_refuses(synth_root, tmp_path, monkeypatch):
    from facecli.engine import elastic

    result = cli("train", "arcface", *_args(synth_root, tmp_path, "r"))
    assert result.exit_code == 0, result.output
    # Not a torchrun restart: the existing run is refused, as before.
    assert "already holds a run" in one_line_error(cli("train", "arcface", *_args(synth_root, tmp_path, "r")))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic.restart_count() == 1
    line = one_line_error(cli("train", "arcface", *_args(synth_root, tmp_path, "r"), "--lr", "0.5"))
    assert "torchrun restarted" in line and "lr" in line
