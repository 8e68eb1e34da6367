"""Multi-node training proven on one machine (issue 21): two torchrun "nodes" (``--nnodes 2
--nproc-per-node 1``, c10d rendezvous on 127.0.0.1, gloo) compute the run the single-node
2-process run computes (loss curve and weights, to the float tolerance of test_distributed),
and only global rank 0 (on whichever node the rendezvous made node 0) logs and writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_distributed import _assert_same_training_state, _env, _free_port, _load, _metrics, _tiny, _torchrun


def _two_nodes(*args, timeout: int = 180) -> list[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=facecli-two-nodes", *map(str, args)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=timeout)
            assert node.returncode == 0, f"node failed:\n{out[-2000:]}\n{err[-6000:]}"
            outs.append(out)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return outs


def test_two_nodes_compute_the_single_node_run(synth_root, tmp_path):
    one = _tiny(synth_root, tmp_path / "one", "run", 36, 2)  # 1 step per epoch: epoch_NNN.pt is step NNN
    two = _tiny(synth_root, tmp_path / "two", "run", 36, 2)
    _torchrun("-m", "facecli", "train", "arcface", *one)
    outs = _two_nodes("-m", "facecli", "train", "arcface", *two)

    # Global rank 0 alone logs (its node's output) and writes one run.
    assert sorted(out.count("Training arcface") for out in outs) == [0, 1], outs
    assert sum(out.count("Done:") for out in outs) == 1, outs
    single, multi = tmp_path / "one" / "arcface" / "run", tmp_path / "two" / "arcface" / "run"
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())

    losses = [[r["loss"] for r in _metrics(run) if "loss" in r] for run in (single, multi)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name in ("epoch_001.pt", "latest.pt"):
        b, a = _load(single / name), _load(multi / name)
        assert a["world_size"] == 2
        _assert_same_training_state(a, b)
