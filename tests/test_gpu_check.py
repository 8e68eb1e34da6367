"""``benchmarks/gpu_check.sh``: the prepared GPU proof runs end to end as a CPU dry run.

Claims: ``gpu_check.sh --device cpu --quick`` finishes, writes one JSON with every section,
each item a row that is ``ok`` or ``skipped`` with a reason (CUDA-only rows skipped on the
CPU), none ``failed``; the frame records a raising item as ``failed`` and goes on, and skips
an item that would overrun the time budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path_factory.getbasetemp())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def rows(result: dict, section: str) -> dict[str, dict]:
    return {r["item"]: r for r in result["sections"][section]}


def test_every_section_has_rows_and_nothing_failed(dry_run):
    assert set(dry_run["sections"]) == set(gpu_check.SECTIONS)
    for section, items in dry_run["sections"].items():
        assert items, f"section {section} is empty"
        for r in items:
            assert r["status"] in ("ok", "skipped"), (section, r)
            if r["status"] == "skipped":
                assert r["why"], r


def test_cuda_only_rows_are_skipped_with_the_reason(dry_run):
    skipped = {(s, r["item"]) for s, items in dry_run["sections"].items() for r in items if r["status"] == "skipped"}
    for section, item in [("host_syncs", "host syncs per step, arcface"), ("evaluation", "eval-lfw, out-of-memory halving forced"),
                          ("end_to_end", "facecli train --decode gpu"), ("train_step", "resnet50 --compile")]:
        assert (section, item) in skipped
        assert "CUDA only" in rows(dry_run, section)[item]["why"]


def test_the_cpu_runnable_items_ran(dry_run):
    env = rows(dry_run, "environment")["environment"]
    assert env["amp_dtype"] == "fp32" and env["grad_scaler"] is False and env["matmul_tflops_measured"] > 0
    assert rows(dry_run, "train_step")["resnet50 eager"]["images_per_s"] > 0
    assert {r["model"] for r in dry_run["sections"]["models_amp"] if r["status"] == "ok"} == set(gpu_check.MODELS)
    assert all(r["loss_finite"] and r["grads_finite"] for r in dry_run["sections"]["models_amp"] if r["status"] == "ok")
    assert rows(dry_run, "resume")["save, resume, continue"]["exact"] is True
    assert rows(dry_run, "end_to_end")["facecli train, 1 CPU decoding workers"]["images_per_s_median"] > 0
    assert rows(dry_run, "data_pipeline")["device decoder vs CPU path"]["decoded"] > 0
    ranks = [r for r in dry_run["sections"]["multi_process"] if r["head"] == "sharded"]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and ranks[0]["t_equal_on_ranks"]


def test_syncs_are_counted_for_every_model_and_the_environment_lists_every_package(dry_run):
    assert {r["item"] for r in dry_run["sections"]["host_syncs"]} == {f"host syncs per step, {m}" for m in gpu_check.MODELS}
    env = rows(dry_run, "environment")["environment"]
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for name in ("torch", "torchvision", "pyyaml", "matplotlib", "pydantic-settings", "onnxruntime"):
        assert name in env["packages"], name
    assert len(env["packages"]) >= len(project["dependencies"])
    assert env["packages"]["pyyaml"] != "missing" and "pyyaml" not in env["packages_missing"]


def test_compile_is_planned_before_the_long_sections(tmp_path):
    """A compile row that comes last is always dropped for lack of time: one runs right after the eager rows."""
    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--json", str(tmp_path / "r.json")])
    check = gpu_check.Check(args, gpu_check.C.resolve_device("cpu"), tmp_path / "r.json")
    shutil.rmtree(check.work)
    order = []
    check.item = lambda section, name, fn, need_s=0.0, cuda_only=False: order.append(name)
    check.data["small"] = tmp_path
    gpu_check.plan(check)
    assert order.index(f"{gpu_check.STEP_BACKBONES[0]} --compile") < order.index("device decoder vs CPU path")


def test_a_failing_item_is_a_row_and_the_run_goes_on(tmp_path):
    args = argparse.Namespace(budget_s=100.0, quick=True, json=None, only=None)
    check = gpu_check.Check(args, gpu_check.C.resolve_device("cpu"), tmp_path / "r.json")

    def broken():
        raise ValueError("boom")

    check.item("resume", "broken", broken)
    check.item("resume", "fine", lambda: {"x": 1})
    check.item("resume", "too long", lambda: {"x": 2}, need_s=1e6)
    check.item("resume", "cannot", lambda: (_ for _ in ()).throw(gpu_check.Skip("not here")))
    shutil.rmtree(check.work)
    got = rows(json.loads((tmp_path / "r.json").read_text()), "resume")
    assert got["broken"]["status"] == "failed" and "ValueError: boom" in got["broken"]["error"]
    assert got["fine"]["status"] == "ok" and got["fine"]["x"] == 1
    assert got["too long"]["status"] == "skipped" and "time budget" in got["too long"]["why"]
    assert got["cannot"] == {**got["cannot"], "status": "skipped", "why": "not here"}


def test_only_runs_the_chosen_sections(tmp_path):
    args = argparse.Namespace(budget_s=100.0, quick=True, json=None, only=["resume"])
    check = gpu_check.Check(args, gpu_check.C.resolve_device("cpu"), tmp_path / "r.json")
    shutil.rmtree(check.work)
    check.item("environment", "env", lambda: {"x": 0})  # always runs
    check.item("resume", "chosen", lambda: {"x": 1})
    check.item("evaluation", "not chosen", lambda: {"x": 2})
    got = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert [r["item"] for r in got["environment"] + got["resume"]] == ["env", "chosen"] and not got["evaluation"]
