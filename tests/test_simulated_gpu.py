"""Device resolution under a simulated ``torch.cuda`` (tests/simgpu.py): every command, every spelling.

A CPU-only run never takes the CUDA branches; here ``torch.cuda`` reports one (or two) GPUs
and checks its arguments as torch does, so ``torch.cuda.set_device(torch.device("cuda"))``
fails here exactly as it would on a GPU server.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, cli
from facecli.errors import UserError


@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0"])
def test_one_gpu_every_spelling_resolves_to_cuda0(sim_gpu, name):
    from facecli.engine.device import resolve_device

    assert resolve_device(name) == torch.device("cuda", 0)
    assert sim_gpu.set_device_calls == [0]


def test_second_gpu_is_made_current(sim_two_gpus):
    from facecli.engine.device import resolve_device

    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert sim_two_gpus.current == 1
    assert resolve_device("cuda") == torch.device("cuda", 1)  # index-less: the current device


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_local_rank_picks_its_gpu(sim_two_gpus, monkeypatch, name):
    from facecli.engine.device import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(name) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # more ranks than GPUs: they wrap around
    assert resolve_device(name) == torch.device("cuda", 1)


def test_missing_gpu_is_a_user_error(sim_gpu):
    from facecli.engine.device import resolve_device

    with pytest.raises(UserError, match="1 CUDA device"):
        resolve_device("cuda:1")


def test_benchmarks_resolve_to_an_index_the_memory_cap_accepts(sim_gpu):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common as C
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    device = C.resolve_device("cuda")
    assert device == torch.device("cuda", 0)
    torch.cuda.set_per_process_memory_fraction(0.5, device)  # gpu_check's cap: rejects an index-less device
    assert sim_gpu.memory_fraction == {0: 0.5}


# ---------------------------------------------------------------- every command


class _Resolved(Exception):
    """Stops a command right after it resolved --device (not a UserError: the guard lets it through)."""


@pytest.fixture
def stop_at_device(monkeypatch):
    """Every resolution goes through facecli.engine.device.resolve_device: record its answer and stop there."""
    import facecli.engine.device as device_mod
    import facecli.engine.trainer as trainer_mod

    real = device_mod.resolve_device
    inside = []

    def resolve_and_stop(name):
        if inside:  # auto resolves itself again as cpu or cuda
            return real(name)
        inside.append(name)
        try:
            device = real(name)
        finally:
            inside.clear()
        raise _Resolved(name, device)

    monkeypatch.setattr(device_mod, "resolve_device", resolve_and_stop)
    monkeypatch.setattr(trainer_mod, "resolve_device", resolve_and_stop)
    return resolve_and_stop


@pytest.fixture(scope="module")
def command_lines(synth_root, synth_train_dir, synth_lfw_dir, trained_checkpoint, tmp_path_factory):
    """The command line of every command that takes --device, up to (not including) --device."""
    tmp = tmp_path_factory.mktemp("simgpu")
    gallery = tmp / "gallery.npz"
    result = cli("gallery", "build", trained_checkpoint, synth_train_dir, "--out", gallery, "--device", "cpu", "--no-face-check")
    assert result.exit_code == 0, result.output
    face = next(synth_lfw_dir.rglob("*.jpg"))
    ck_dir = trained_checkpoint.parents[2]
    return {
        "train": ["train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp / "runs", "--no-wandb"],
        "resume": ["resume", "arcface", "--run", "tiny", "--checkpoints-dir", ck_dir, "--epochs", "3"],
        "eval-lfw": ["eval-lfw", trained_checkpoint, "--lfw-dir", synth_lfw_dir],
        "eval": ["eval", trained_checkpoint, "--lfw-dir", synth_lfw_dir],
        "tune-threshold": ["tune-threshold", trained_checkpoint, "--lfw-dir", synth_lfw_dir],
        "embed": ["embed", trained_checkpoint, face],
        "gallery build": ["gallery", "build", trained_checkpoint, synth_train_dir, "--out", tmp / "g2.npz", "--no-face-check"],
        "identify": ["identify", gallery, trained_checkpoint, face, "--no-face-check"],
    }


COMMANDS = ["train", "resume", "eval-lfw", "eval", "tune-threshold", "embed", "gallery build", "identify"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0"])
def test_every_command_resolves_cuda_to_an_index(command_lines, sim_gpu, stop_at_device, command, name):
    result = cli(*command_lines[command], "--device", name)
    assert isinstance(result.exception, _Resolved), result.output
    assert result.exception.args == (name, torch.device("cuda", 0))
    assert sim_gpu.current == 0 and sim_gpu.set_device_calls == [0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reaches_the_second_gpu(command_lines, sim_two_gpus, stop_at_device, monkeypatch, command):
    result = cli(*command_lines[command], "--device", "cuda:1")
    assert result.exception.args == ("cuda:1", torch.device("cuda", 1)), result.output
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = cli(*command_lines[command], "--device", "cuda")
    assert result.exception.args == ("cuda", torch.device("cuda", 1)), result.output
    assert sim_two_gpus.current == 1
