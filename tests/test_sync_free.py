"""The training step never makes the host wait for the device (issue: GPU-first training).

torch.profiler records every op of 30+ steps with ``log_every=10``. Inside the steps
(``facecli::step``) no op may read a tensor's value on the host (``aten::_local_scalar_dense``
is what ``.item()``, ``float(t)``, ``bool(t)`` and a tensor-valued ``if`` run; ``aten::is_nonzero``
and ``aten::equal`` read too) except within the loop's one named read per logging interval
(``facecli::host_read``), of which there are at most one per 10 steps. On a CPU run these ops
are what would wait for a GPU. Checked for one process, 2 gloo processes (plain DDP) and
2 gloo processes with the class-sharded head.

This file is also the workers' script: ``python tests/test_sync_free.py MODE DATA OUT``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
STEPS = 30


def _profile_counts(train_dir: str, out: str, sharded: bool = False, sample_rate: float = 1.0) -> dict:
    """Run 30 steps under the profiler; count sync ops inside steps but outside the named reads."""
    import torch

    from facecli.engine.config import TrainConfig
    from facecli.engine.step import HOST_READ
    from facecli.engine.trainer import STEP, Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(
        model="curricularface" if sharded else "arcface", train_dir=train_dir, backbone="resnet18", image_size=32, batch_size=2,
        epochs=1, workers=0, device="cpu", checkpoints_dir=out, run_name="p", eval=False, wandb=False, log_every=10, lr=0.01,
        sharded_head=sharded, clip_grad_norm=5.0, scale_warmup=True,  # both run on the device too
        sample_rate=sample_rate,
    )
    trainer = Trainer(cfg, log=lambda m: None, warn=lambda m: None)
    assert trainer.steps_per_epoch > STEPS  # no epoch end (saves, checks) inside the window
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.run(stop_after_steps=STEPS)
    counts: Counter = Counter()
    for event in prof.events():
        names = _ancestors(event)
        if STEP not in names:
            continue
        if event.name == STEP:
            counts["steps"] += 1
        elif event.name == HOST_READ:
            counts["reads"] += 1
        elif event.name in SYNC_OPS and HOST_READ not in names:
            counts[f"sync {event.name}"] += 1
    return dict(counts)


def _ancestors(event) -> set[str]:
    names, e = set(), event
    while e is not None:
        names.add(e.name)
        e = e.cpu_parent
    return names


def _problems(counts: dict) -> list[str]:
    """What breaks the promise: not 30 steps profiled, a host read inside a step, or more than one named read per 10 steps."""
    problems = [f"{k}: {v}" for k, v in counts.items() if k.startswith("sync ")]
    if counts.get("steps") != STEPS:
        problems.append(f"profiled {counts.get('steps')} steps, not {STEPS}")
    if not 1 <= counts.get("reads", 0) <= STEPS // 10:
        problems.append(f"{counts.get('reads', 0)} named reads in {STEPS} steps")
    return problems


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """160 images: 40 steps of 2 per process (2 processes) before the epoch ends."""
    from facecli.data.synth import generate_synthetic_set

    root = tmp_path_factory.mktemp("syncfree")
    generate_synthetic_set(root, identities=20, test_identities=20, images_per_identity=8, image_size=32, seed=1)
    return str(root / "CASIA-webface")


def test_one_process_step_reads_nothing_between_logging_points(data, tmp_path):
    counts = _profile_counts(data, str(tmp_path))
    assert _problems(counts) == [], counts


def test_partial_fc_sampling_reads_nothing_between_logging_points(data, tmp_path):
    # 20 classes at rate 0.05: 1 class by the rate, 2 drawn for a batch of 2, the surplus masked on the device
    counts = _profile_counts(data, str(tmp_path), sample_rate=0.05)
    assert _problems(counts) == [], counts


def test_two_processes_plain_and_sharded_read_nothing_between_logging_points(data, tmp_path):
    from test_distributed import _two_workers

    for mode in ("plain", "sharded"):
        outs = _two_workers_here(_two_workers, mode, data, tmp_path / mode)
        for out in outs:
            counts = json.loads(out.strip().splitlines()[-1])
            assert _problems(counts) == [], (mode, counts)


def _two_workers_here(two_workers, mode, data, out):
    import test_distributed as td

    old = td.HERE
    td.HERE = HERE  # run this file as the workers' script
    try:
        return two_workers(mode, data, out, timeout=300)
    finally:
        td.HERE = old


if __name__ == "__main__":
    mode, data, out = sys.argv[1:4]
    print(json.dumps(_profile_counts(data, out, sharded=mode == "sharded")))
