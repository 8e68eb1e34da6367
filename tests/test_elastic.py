"""Beyond one machine (issue 21), 2 gloo processes on the CPU, all compared with one
uninterrupted single-node 2-process run:

* two torchrun "nodes" (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on 127.0.0.1)
  compute that run (loss curve and weights, to test_distributed's float tolerance), and only
  global rank 0 (on whichever node the rendezvous made node 0) logs and writes;
* under ``torchrun --max-restarts``, a worker SIGKILLed mid-epoch makes torchrun restart the
  group, which continues the run from its latest.pt by itself and ends with exactly that
  run's weights; a restart whose command no longer matches the run is one clear error;
  outside a restart an existing run is refused as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli, one_line_error
import pytest

from test_distributed import _assert_same_training_state, _collect, _env, _free_port, _load, _metrics, _tiny, _torchrun

STEPS = 6  # 72 images, 2 x 6 per step, 1 epoch


def _args(root, ck, run: str | None) -> list[str]:
    args = _tiny(root, ck, run or "unused", 6, 1) + ["--checkpoint-every", "2", "--margin-warmup-epochs", "0", "--log-every", "1"]
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


@pytest.fixture(scope="module")
def single_node_run(synth_root, tmp_path_factory) -> Path:
    """The uninterrupted single-node 2-process run every test here is compared with."""
    ck = tmp_path_factory.mktemp("single-node")
    _torchrun("-m", "facecli", "train", "arcface", *_args(synth_root, ck, "whole"))
    return ck / "arcface" / "whole"


def _two_nodes(*args, timeout: int = 180) -> list[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=facecli-two-nodes", *map(str, args)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return _collect(nodes, timeout, "node")


def test_two_nodes_compute_the_single_node_run(single_node_run, synth_root, tmp_path):
    outs = _two_nodes("-m", "facecli", "train", "arcface", *_args(synth_root, tmp_path, "whole"))

    # Global rank 0 alone logs (its node's output) and writes one run.
    assert sorted(out.count("Training arcface") for out in outs) == [0, 1], outs
    assert sum(out.count("Done:") for out in outs) == 1, outs
    multi = tmp_path / "arcface" / "whole"
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single_node_run.iterdir())

    losses = [[r["loss"] for r in _metrics(run) if "loss" in r] for run in (single_node_run, multi)]
    assert len(losses[0]) == STEPS and losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = _load(multi / "latest.pt"), _load(single_node_run / "latest.pt")
    assert a["world_size"] == 2 and a["step"] == STEPS
    _assert_same_training_state(a, b)


def test_killed_worker_restarts_and_the_run_ends_as_if_never_interrupted(single_node_run, synth_root, tmp_path):

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
    _assert_same_training_state(final, _load(single_node_run / "latest.pt"), exact=True)


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
