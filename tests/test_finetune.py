"""Fine-tuning (``train --init-from CKPT --freeze-backbone-epochs N``): the network starts from
another run's weights with a new head, its body stays fixed for N epochs and then trains, the
checkpoint and saved config say where the weights came from, a run stopped in the frozen
epoch resumes exactly, and a network of another shape is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, cli, one_line_error
from facecli.engine.checkpoint import load_checkpoint
from facecli.engine.config import TrainConfig
from facecli.engine.trainer import Trainer


def _quiet(_: str) -> None:
    pass


def _body_keys(state: dict) -> list[str]:
    return [k for k in state if k.startswith("backbone.")]  # resnet18: the body; the neck is the embedding layer


def _args(synth_root, ck, run, source, *extra):
    args = ["train", "cosface", "--dataset-path", synth_root, "--checkpoints-dir", ck, "--run-name", run, "--no-eval"]
    args += [a for a in TINY_TRAIN_ARGS] + ["--init-from", source, "--freeze-backbone-epochs", "1", *extra]
    args[args.index("--epochs") + 1] = "2"
    return args


def test_fine_tuning_freezes_then_trains_the_body_and_resumes_exactly(synth_root, trained_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    result = cli(*_args(synth_root, ck, "A", trained_checkpoint))
    assert result.exit_code == 0, result.output
    source = load_checkpoint(trained_checkpoint)
    first = load_checkpoint(ck / "cosface" / "A" / "epoch_001.pt")
    second = load_checkpoint(ck / "cosface" / "A" / "epoch_002.pt")
    body = _body_keys(source["net_state"])
    assert body and any(".bn" in k and "running_mean" in k for k in body)

    # Frozen epoch: the body (BatchNorm statistics included) is the source's; the embedding layer and the new head train.
    for k in body:
        assert torch.equal(first["net_state"][k], source["net_state"][k]), k
    neck = [k for k in source["net_state"] if k.startswith("neck.") and source["net_state"][k].is_floating_point()]
    assert any(not torch.equal(first["net_state"][k], source["net_state"][k]) for k in neck)
    assert first["head"]["name"] == "cosface" and not torch.equal(first["head_state"]["weight"], second["head_state"]["weight"])
    # After the frozen epoch the body trains too.
    assert any(not torch.equal(second["net_state"][k], source["net_state"][k]) for k in body if second["net_state"][k].is_floating_point())

    # Where the weights came from: the checkpoint and the saved config.
    assert first["init_from"]["path"] == str(trained_checkpoint.resolve()) and first["init_from"]["model"] == "arcface"
    assert first["init_from"]["step"] == source["step"]
    saved_cfg = json.loads((ck / "cosface" / "A" / "config.json").read_text())
    assert saved_cfg["config"]["init_from"] == str(trained_checkpoint.resolve()) and saved_cfg["config"]["freeze_backbone_epochs"] == 1
    assert saved_cfg["init_from"] == first["init_from"]

    # Stopped in the frozen epoch (step 3 of 4), resumed by the CLI: the uninterrupted run, exactly.
    cfg = TrainConfig.from_dict({**first["train_config"], "run_name": "B"})
    Trainer(cfg, log=_quiet, warn=_quiet).run(stop_after_steps=3)
    out = cli("resume", "cosface", "--run", "B", "--from", "latest", "--checkpoints-dir", ck)
    assert out.exit_code == 0, out.output
    resumed = load_checkpoint(ck / "cosface" / "B" / "latest.pt")
    assert resumed["step"] == second["step"] == 8 and resumed["init_from"] == first["init_from"]
    for k, v in second["net_state"].items():
        assert torch.equal(resumed["net_state"][k], v), k
    assert torch.equal(resumed["head_state"]["weight"], second["head_state"]["weight"])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--embedding-dim", "64"], "embedding size is 512, this run's is 64"),
        (["--backbone", "mobilefacenet"], "backbone is resnet18, this run's is mobilefacenet"),
        (["--image-size", "48"], "image size is 32, this run's is 48"),
    ],
)
def test_a_network_of_another_shape_is_refused_in_one_line(synth_root, trained_checkpoint, tmp_path, extra, fragment):
    line = one_line_error(cli(*_args(synth_root, tmp_path, "X", trained_checkpoint, *extra)))
    assert fragment in line and "--init-from" in line


def test_freezing_needs_a_source_and_a_source_must_be_a_network(synth_root, tmp_path):
    args = ["train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path, *TINY_TRAIN_ARGS]
    assert "init-from" in one_line_error(cli(*args, "--freeze-backbone-epochs", "1"))
    assert "does not exist" in one_line_error(cli(*args, "--init-from", tmp_path / "missing.pt"))


def test_a_margin_head_network_cannot_start_a_facenet_run(synth_root, trained_checkpoint, tmp_path):
    args = ["train", "facenet", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path, *TINY_TRAIN_ARGS, "--embedding-dim", "512"]
    assert "embedding layers differ" in one_line_error(cli(*args, "--init-from", trained_checkpoint))
