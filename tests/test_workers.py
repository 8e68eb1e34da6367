"""``--workers auto``: the CPUs this process may use, shared by the local ranks, capped."""

from __future__ import annotations

import pytest

from facecli.data import workers as W


@pytest.fixture
def cpus(monkeypatch):
    """Pretend this process may run on ``n`` CPUs, with no cgroup quota unless a test sets one."""

    def set_cpus(n: int, quota: int | None = None):
        monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(W, "cgroup_cpu_limit", lambda *a: quota)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_cpus


@pytest.mark.parametrize(
    "n,local,expected",
    [(16, 1, 15), (16, 2, 7), (16, 8, 1), (64, 1, 16), (256, 8, 16), (2, 1, 1), (1, 1, 0), (8, 8, 0), (3, 2, 0)],
)
def test_auto_is_a_share_of_the_cpus_less_one_capped(cpus, n, local, expected):
    cpus(n)
    assert W.resolve_workers("auto", local) == expected


def test_auto_reads_local_world_size(cpus, monkeypatch):
    cpus(16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert W.resolve_workers("auto") == 3


def test_auto_respects_a_cgroup_quota(cpus):
    cpus(64, quota=4)
    assert W.resolve_workers("auto", 1) == 3


@pytest.mark.parametrize("text,expected", [("max 100000", None), ("400000 100000", 4), ("150000 100000", 1), ("50000 100000", 1), ("junk", None)])
def test_cgroup_quota_parsing(tmp_path, text, expected):
    f = tmp_path / "cpu.max"
    f.write_text(text + "\n")
    assert W.cgroup_cpu_limit(f) == expected
    assert W.cgroup_cpu_limit(tmp_path / "absent") is None


def test_numbers_pass_through(cpus):
    cpus(2)
    assert [W.resolve_workers(v) for v in (0, 3, 40, "5")] == [0, 3, 40, 5]


@pytest.mark.parametrize("bad", [-1, "many", 2.5])
def test_anything_else_is_refused(bad):
    with pytest.raises(ValueError):
        W.resolve_workers(bad)


def test_evaluation_uses_the_same_rule(cpus, synth_train_dir, tmp_path):
    """Training-time evaluation sizes its DataLoader as training does, not min(workers, 4)."""
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer

    cpus(16)
    seen = []
    for workers in ("auto", 12):
        cfg = TrainConfig(
            model="arcface", train_dir=str(synth_train_dir), backbone="resnet18", image_size=32, batch_size=16, epochs=1,
            workers=workers, device="cpu", checkpoints_dir=str(tmp_path), run_name=f"w{workers}", eval=False, wandb=False,
        )
        seen.append(Trainer(cfg, log=lambda _: None, warn=lambda _: None).embedder().workers)
    assert seen == [15, 12]
