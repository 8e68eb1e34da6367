"""Shared fixtures: a tiny synthetic face set and a tiny trained checkpoint, built once.

Everything here is offline and small (32x32 images, resnet18) so the whole suite fits in
minutes on a 2-core CPU. Tests that need the real data in ../shared/data skip cleanly
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: two busy processes with OpenMP's default threads on 2 cores
# slow every step down several times (spin-waiting), and tests start subprocesses.
os.environ["OMP_NUM_THREADS"] = os.environ.get("FACECLI_TEST_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.pop("WANDB_API_KEY", None)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LFW_DIR = SHARED_DATA / "lfw"
ATT_DIR = SHARED_DATA / "att_faces"

# The tiny configuration every training test uses unless it needs something else.
TINY_TRAIN_ARGS = [
    "--backbone", "resnet18", "--image-size", "32", "--batch-size", "16", "--epochs", "1",
    "--workers", "0", "--lr", "0.01", "--no-wandb", "--device", "cpu",
]


def pytest_collection_modifyitems(config, items):
    pass


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the developer's .env or settings, or writes into the repository."""
    monkeypatch.chdir(tmp_path)
    for key in ("DATASET_PATH", "CHECKPOINTS_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("FACECLI_CACHE_DIR", str(tmp_path / ".facecli-cache"))  # never the developer's ~/.cache


@pytest.fixture
def sim_gpu(monkeypatch):
    """``torch.cuda`` reporting one (simulated) GPU: see tests/simgpu.py for what it can and cannot see."""
    from simgpu import SimulatedCuda

    return SimulatedCuda(1).install(monkeypatch)


@pytest.fixture
def sim_two_gpus(monkeypatch):
    from simgpu import SimulatedCuda

    return SimulatedCuda(2).install(monkeypatch)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny synthetic set: 12 training identities x 6 images, 20 LFW-style identities, 32 px."""
    from facecli.data.synth import generate_synthetic_set

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_set(root, identities=12, test_identities=20, images_per_identity=6, image_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_train_dir(synth_root) -> Path:
    return synth_root / "CASIA-webface"


@pytest.fixture(scope="session")
def synth_lfw_dir(synth_root) -> Path:
    return synth_root / "Labeled Faces in the Wild (LFW)"


@pytest.fixture(scope="session")
def trained_checkpoint(synth_root, tmp_path_factory) -> Path:
    """An arcface resnet18 trained for 2 epochs on the tiny set (no evaluation)."""
    from typer.testing import CliRunner

    from facecli.cli import app

    ck = tmp_path_factory.mktemp("ckpt")
    args = ["train", "arcface", "--dataset-path", str(synth_root), "--checkpoints-dir", str(ck), "--run-name", "tiny", "--no-eval"]
    args += [a for a in TINY_TRAIN_ARGS]
    args[args.index("--epochs") + 1] = "2"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return ck / "arcface" / "tiny" / "latest.pt"


def cli(*args: str):
    """Run the facecli CLI in-process; returns click's Result (exit_code, output)."""
    from typer.testing import CliRunner

    from facecli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """Failed through the user-error path: non-zero exit, one line, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


def requires_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared/data is optional)")
