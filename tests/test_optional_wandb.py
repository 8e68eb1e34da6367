"""``wandb`` is optional: facecli imports and trains without it.

A meta-path finder in a fresh interpreter makes ``import wandb`` fail as it does where the
package is not installed (the GPU check machine, minimal containers). Claims: every module
imports without touching wandb; ``facecli train --no-wandb`` trains; a run that would track
in W&B (key set) trains too, with one notice instead of a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN_ARGS

HIDE_WANDB = r"""
import sys

class HideWandb:
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, HideWandb())
for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
    del sys.modules[name]
"""


def run_without_wandb(code: str, tmp_path: Path, **env_extra) -> subprocess.CompletedProcess:
    script = tmp_path / "no_wandb.py"
    script.write_text(HIDE_WANDB + code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_every_module_imports_without_wandb(tmp_path):
    code = """
import importlib, pkgutil, facecli
for m in pkgutil.walk_packages(facecli.__path__, "facecli."):
    importlib.import_module(m.name)
print("imported", "wandb" in sys.modules)
"""
    proc = run_without_wandb(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported False"


@pytest.mark.parametrize("tracking", ["--no-wandb", "key set"])
def test_training_without_wandb(tmp_path, synth_root, tracking):
    args = ["train", "arcface", "--dataset-path", str(synth_root), "--checkpoints-dir", str(tmp_path / "ck"), "--run-name", "r",
            "--no-eval", *TINY_TRAIN_ARGS]
    env = {"WANDB_MODE": ""}
    if tracking == "key set":
        args.remove("--no-wandb")
        env["WANDB_API_KEY"] = "0" * 40
    code = f"""
from facecli.cli import main
sys.argv = ["facecli", *{args!r}]
try:
    main()
finally:
    print("wandb imported:", "wandb" in sys.modules)
"""
    proc = run_without_wandb(code, tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wandb imported: False" in proc.stdout
    run = tmp_path / "ck" / "arcface" / "r"
    assert (run / "latest.pt").is_file()
    assert any("loss" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    if tracking == "key set":
        assert "wandb package is not installed" in proc.stdout + proc.stderr
        assert "0" * 40 not in proc.stdout + proc.stderr
