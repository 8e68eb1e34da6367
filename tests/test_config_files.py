"""Settings defined once: flags derived from TrainConfig, config files, and plugin losses.

* every TrainConfig field is a flag of ``train`` and every ``train`` flag is a field (or one
  of the few command-only options), with its help text;
* ``--print-config`` prints YAML that ``--config`` reads back; flags override the file; a run's
  saved ``config.yaml`` starts the same run again;
* a malformed file, an unknown key, a wrong type or an out-of-range value is one line naming
  the file and key, and trains nothing; secrets are never read from files;
* a margin head with its own hyper-parameter, defined in this file alone, trains through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, TINY_TRAIN_ARGS, cli

from facecli.engine.checkpoint import load_checkpoint
from facecli.engine.config import TrainConfig

COMMAND_ONLY = {"model", "config", "print_config", "dataset_path", "train_rec"}


def _train_params() -> dict:
    import typer.main

    from facecli.cli import app

    command = typer.main.get_command(app).get_command(None, "train")
    return {p.name: p for p in command.params}


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    from facecli.engine.config import all_keys

    params = _train_params()
    missing = sorted(set(TrainConfig.model_fields) - {"model"} - set(params))
    assert not missing, f"TrainConfig fields without a train flag: {missing}"
    extra = sorted(set(params) - all_keys() - COMMAND_ONLY)
    assert not extra, f"train flags without a TrainConfig field or loss option: {extra}"
    for name, field in TrainConfig.model_fields.items():
        if name != "model":
            assert field.description and field.description.split()[0] in (params[name].help or ""), name
    # the loss options come from the losses' declarations
    assert {"scale", "margin", "curricular_momentum"} <= set(params)
    # drifted names of the old CLI now exist
    for flag in ("--momentum", "--keep-epochs", "--flip", "--eval-batch-size", "--sync-bn"):
        assert any(flag in p.opts for p in params.values()), flag


def _data_args(synth_root, tmp_path, run="r"):
    return ["--dataset-path", str(synth_root), "--checkpoints-dir", str(tmp_path / "ck"), "--run-name", run, "--no-eval"]


def test_print_config_round_trip_and_flags_override_the_file(synth_root, tmp_path):
    result = cli("train", "arcface", "--epochs", "5", "--margin", "0.4", "--print-config", *_data_args(synth_root, tmp_path))
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["model"] == "arcface" and data["epochs"] == 5 and data["margin"] == 0.4 and data["scale"] == 64.0
    assert data["lr"] == 0.1 and data["embedding_dim"] == 512 and data["margin_warmup_epochs"] == 1.5
    assert not (tmp_path / "ck").exists(), "--print-config trained"
    path = tmp_path / "a.yaml"
    path.write_text(result.output)

    # the model and every setting come from the file; the flags given here win
    args = [a for a in TINY_TRAIN_ARGS if a != "--no-wandb"] + ["--no-wandb"]
    result = cli("train", "--config", path, *args, *_data_args(synth_root, tmp_path, "fromfile"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "ck" / "arcface" / "fromfile"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["batch_size"] == 16 and saved["margin"] == 0.4  # flag, flag, file
    assert load_checkpoint(run / "latest.pt")["head"]["hparams"]["margin"] == 0.4


def test_a_runs_saved_config_starts_the_same_run_again(synth_root, tmp_path):
    result = cli("train", "cosface", *TINY_TRAIN_ARGS, "--seed", "4", *_data_args(synth_root, tmp_path, "first"))
    assert result.exit_code == 0, result.output
    first = tmp_path / "ck" / "cosface" / "first"
    result = cli("train", "--config", first / "config.yaml", "--run-name", "again")
    assert result.exit_code == 0, result.output
    again = tmp_path / "ck" / "cosface" / "again"
    a, b = load_checkpoint(first / "latest.pt"), load_checkpoint(again / "latest.pt")
    assert a["step"] == b["step"] > 0
    for k in a["net_state"]:
        assert torch.equal(a["net_state"][k], b["net_state"][k]), k
    assert {k: v for k, v in a["train_config"].items() if k != "run_name"} == {k: v for k, v in b["train_config"].items() if k != "run_name"}


@pytest.mark.parametrize(
    "name, text, fragments",
    [
        ("bad.yaml", "model: arcface\nepochs: [1\n", ["bad.yaml", "not valid YAML"]),
        ("bad.json", '{"model": "arcface",}', ["bad.json", "not valid JSON"]),
        ("bad.toml", "model = arcface", ["bad.toml", "not valid TOML"]),
        ("list.yaml", "- arcface\n", ["list.yaml", "mapping"]),
        ("unknown.yaml", "model: arcface\nepoch: 3\n", ["unknown.yaml: epoch", "unknown setting"]),
        ("type.yaml", "model: arcface\nepochs: many\n", ["type.yaml: epochs must be a positive integer, got 'many'"]),
        ("range.yaml", "model: arcface\nlr: -0.5\n", ["range.yaml: lr must be a positive number, got -0.5"]),
        ("margin.toml", 'model = "sphereface"\nmargin = 0.5\n', ["margin.toml: margin (sphereface) must be >= 1; got margin 0.5"]),
        ("choice.json", '{"model": "arcface", "backbone": "vgg"}', ["choice.json: backbone must be one of", "resnet50", "got 'vgg'"]),
        ("wrongloss.yaml", "model: facenet\nscale: 30\n", ["wrongloss.yaml: scale", "not facenet"]),
        ("secret.yaml", "model: arcface\nwandb_api_key: abc\n", ["secret.yaml", "secret", "WANDB_API_KEY"]),
        ("nomodel.yaml", "epochs: 2\n", ["No model to train"]),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_and_key(name, text, fragments, synth_root, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    result = cli("train", "--config", path, *_data_args(synth_root, tmp_path))
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in out, (fragment, out)
    assert "abc" not in out
    assert not (tmp_path / "ck").exists()


def test_bad_flag_values_name_the_flag(synth_root, tmp_path):
    for args, fragment in [
        (["--lr", "-1"], "--lr"),
        (["--margin", "1.5"], "cosface --margin must be in [0, 1]; got margin 1.5"),
        (["--milestones", "3,x"], "--milestones must be comma-separated numbers"),
        (["--curricular-momentum", "0.1"], "--curricular-momentum applies to curricularface, not cosface"),
    ]:
        result = cli("train", "cosface", *args, *_data_args(synth_root, tmp_path))
        assert result.exit_code == 2 and fragment in " ".join(result.output.split()), (args, result.output)


# --------------------------------------------------------------------------- a plugin head

from facecli.losses import HEADS, LOSSES, HParam, MarginHead, register_head  # noqa: E402


class BiasFace(MarginHead):
    """A test head: target s (cos_y - m - bias), with its own hyper-parameter ``bias``."""

    default_scale = 16.0
    default_margin = 0.1
    margin_range = (0.0, 1.0, False, False)

    @classmethod
    def hyper_parameters(cls):
        return super().hyper_parameters() + (HParam("bias", 0.0, "Extra additive margin of the test head", 0.0, 0.5),)

    def _target(self, cos_y):
        return cos_y - self.margin - self.bias

    def _target_and_slope(self, cos_y):
        return self._target(cos_y), torch.ones_like(cos_y)


@pytest.fixture
def biasface():
    register_head("biasface")(BiasFace)
    yield BiasFace
    HEADS.pop("biasface", None)
    LOSSES.pop("biasface", None)


def test_a_head_defined_outside_facecli_trains_through_the_cli_with_its_option(biasface, synth_root, tmp_path):
    result = cli("train", "biasface", "--bias", "0.25", *TINY_TRAIN_ARGS, *_data_args(synth_root, tmp_path))
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(tmp_path / "ck" / "biasface" / "r" / "latest.pt")
    assert ck["head"]["hparams"] == {"scale": 16.0, "margin": 0.1, "bias": 0.25}
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (tmp_path / "ck" / "biasface" / "r" / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    result = cli("train", "biasface", "--bias", "0.7", *_data_args(synth_root, tmp_path, "bad"))
    assert result.exit_code == 2 and "biasface --bias must be in [0, 0.5]; got bias 0.7" in " ".join(result.output.split())
    assert "--bias" in cli("train", "--help").output


def test_plugin_module_from_the_environment(synth_root, tmp_path):
    (tmp_path / "my_heads.py").write_text(
        "import torch\nfrom facecli.losses import HParam, MarginHead, register_head\n\n"
        "@register_head('envface')\nclass EnvFace(MarginHead):\n"
        "    @classmethod\n    def hyper_parameters(cls):\n"
        "        return super().hyper_parameters() + (HParam('tilt', 0.0, 'Test option', 0.0, 1.0),)\n"
        "    def _target(self, c):\n        return c - self.margin * self.tilt\n"
    )
    env = dict(os.environ, FACECLI_PLUGINS="my_heads", PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    proc = subprocess.run(
        [sys.executable, "-m", "facecli", "train", "envface", "--tilt", "0.5", "--print-config", "--dataset-path", str(synth_root)],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["tilt"] == 0.5


@pytest.mark.parametrize("model", ["arcface", "cosface", "sphereface", "curricularface", "facenet"])
def test_the_example_files_are_what_print_config_prints(model, synth_root):
    """configs/examples/MODEL.yaml (the README's examples) never drift from the settings."""
    path = REPO / "configs" / "examples" / f"{model}.yaml"
    example = yaml.safe_load(path.read_text())
    result = cli("train", model, "--print-config", "--dataset-path", synth_root)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    paths = {"train_dir", "lfw_dir", "checkpoints_dir"}
    assert {k: v for k, v in example.items() if k not in paths} == {k: v for k, v in printed.items() if k not in paths}
    again = cli("train", "--config", path, "--print-config", "--dataset-path", synth_root)
    assert again.exit_code == 0 and yaml.safe_load(again.output) == printed, again.output
