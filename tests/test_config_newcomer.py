"""Issue 19, config/CLI half: what a new user and hostile inputs hit in settings, config files,
plugins, min_loss.pt and the LFW defaults of the evaluation commands.

* ``--print-config`` and validation need no data; saved and printed configs hold absolute
  paths; the run's ``config.json`` is read by ``--config``;
* hostile config files (aliases, duplicate keys, non-UTF-8, integer keys, non-finite or
  out-of-range numbers, booleans for numbers) are one line each; ``1e2`` is a number;
* a file written for another loss does not lend its margin to the new one;
* a broken plugin is one line and a non-zero exit for every command, ``--help`` included;
* min_loss.pt never holds a warm-up epoch;
* eval-lfw/tune-threshold use the checkpoint's lfw_dir; DATASET_PATH messages say what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TINY_TRAIN_ARGS, cli, one_line_error

from facecli.engine.checkpoint import load_checkpoint, save_checkpoint


def _stdout_yaml(result) -> dict:
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


# --------------------------------------------------------------------------- --print-config without data


def test_print_config_needs_no_data_and_errors_are_their_own(tmp_path):
    data = _stdout_yaml(cli("train", "arcface", "--epochs", "30", "--print-config"))
    assert data["model"] == "arcface" and data["epochs"] == 30 and data["train_dir"] is None
    (tmp_path / "unknown.yaml").write_text("model: arcface\nepoch: 3\n")
    (tmp_path / "type.yaml").write_text("model: arcface\nepochs: many\n")
    for args, fragment in [
        (["train", "arcface", "--lr", "-0.5"], "--lr must be a positive number"),
        (["train", "--config", tmp_path / "unknown.yaml"], "epoch: unknown setting"),
        (["train", "--config", tmp_path / "type.yaml"], "epochs must be a positive integer, got 'many'"),
    ]:
        line = one_line_error(cli(*args))
        assert fragment in line and "No training data" not in line, (args, line)


def test_printed_config_holds_absolute_paths(synth_root, tmp_path):
    os.symlink(synth_root, tmp_path / "data")  # the working directory is tmp_path
    data = _stdout_yaml(cli("train", "arcface", "--print-config", "--dataset-path", "data", "--checkpoints-dir", "runs"))
    assert data["train_dir"] == str(tmp_path / "data" / "CASIA-webface")
    assert data["lfw_dir"] == str(tmp_path / "data" / "Labeled Faces in the Wild (LFW)")
    assert data["checkpoints_dir"] == str(tmp_path / "runs")


def test_a_runs_config_json_is_read_by_config_from_elsewhere(trained_checkpoint, tmp_path):
    run = trained_checkpoint.parent
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert os.path.isabs(saved["train_dir"]) and os.path.isabs(saved["checkpoints_dir"])
    data = _stdout_yaml(cli("train", "--config", run / "config.json", "--print-config"))
    assert data["model"] == "arcface" and data["train_dir"] == saved["train_dir"] and data["epochs"] == 2


# --------------------------------------------------------------------------- hostile config files

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"model: arcface\nrun_name: caf\xe9\n", "is not UTF-8 text"),
        (b"model: arcface\n1: 2\n", "key 1 is not a setting name"),
        (b"model: arcface\ntrain_dir: 5\n", "train_dir"),
        (b"model: arcface\nwarmup_epochs: .inf\n", "warmup_epochs must be a non-negative number, got inf"),
        (b"model: arcface\nseed: -1\n", "seed must be an integer in [0, 4294967295], got -1"),
        (b"model: arcface\nseed: 1e23\n", "seed must be an integer in [0, 4294967295]"),
        (b"model: arcface\nweight_decay: .inf\n", "weight_decay must be a non-negative number, got inf"),
        (b"model: arcface\nepochs: true\n", "epochs must be a positive integer, got True"),
        (b"model: arcface\nepochs: 3\nepochs: 4\n", "key 'epochs' is given twice"),
        (b"model: arcface\nmilestones: 3\n" + BOMB.encode() + b"val_bins: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n", "aliases"),
        (b"model: arcface\nbackbone: " + b"x" * 5000 + b"\n", "backbone must be one of"),
        (b"model: arcface\n" + b"x" * 1000 + b": 1\n", "unknown setting"),
        (b"model: arcface\n" + b"#" * (1 << 20) + b"\n", "a settings file is at most"),
    ],
    ids=["latin1", "int-key", "train-dir-int", "inf-warmup", "seed-neg", "seed-huge", "inf-wd", "bool-epochs", "dup", "aliases", "long-value", "long-key", "huge"],
)
def test_hostile_config_files_are_one_short_line(text, fragment, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    line = one_line_error(cli("train", "--config", path, "--print-config"))
    assert fragment in line and "x" * 81 not in line, line  # values and keys quoted short


def test_non_finite_flags_and_yaml_exponents(tmp_path):
    line = one_line_error(cli("train", "arcface", "--margin-warmup-epochs", "inf", "--print-config"))
    assert "--margin-warmup-epochs must be a non-negative number, got inf" in line
    (tmp_path / "s.yaml").write_text("model: arcface\nscale: 1e2\nlr: 5e-2\n")
    data = _stdout_yaml(cli("train", "--config", tmp_path / "s.yaml", "--print-config"))
    assert data["scale"] == 100.0 and data["lr"] == 0.05


def test_a_file_for_another_loss_does_not_lend_its_margin(tmp_path):
    (tmp_path / "arc.yaml").write_text(cli("train", "arcface", "--print-config").stdout)
    result = cli("train", "cosface", "--config", tmp_path / "arc.yaml", "--print-config")
    data = _stdout_yaml(result)
    assert data["model"] == "cosface" and data["margin"] == 0.35 and data["scale"] == 64.0
    warned = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(warned) == 1 and "arcface" in warned[0] and "margin 0.5" in warned[0] and "cosface" in warned[0], result.stderr
    # a flag still sets it
    assert _stdout_yaml(cli("train", "cosface", "--config", tmp_path / "arc.yaml", "--margin", "0.2", "--print-config"))["margin"] == 0.2


# --------------------------------------------------------------------------- plugins

PLUGINS = {
    "missing": (None, "cannot be imported"),
    "raising": ("raise RuntimeError('boom')\n", "line 1: RuntimeError: boom"),
    "syntax": ("def f(:\n", "has a syntax error"),
    "exits": ("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    "backbone": ("from facecli.backbones import Backbone, register_backbone\n@register_backbone\nclass R(Backbone):\n    name = 'resnet18'\n",
                 "a backbone named 'resnet18' is already registered"),
    "loss": ("from facecli.losses import MarginHead, register_head\n@register_head('arcface')\nclass A(MarginHead):\n    pass\n",
             "a margin head named 'arcface' is already registered"),
}


@pytest.mark.parametrize("kind", list(PLUGINS))
def test_a_broken_plugin_is_one_line_for_every_command(kind, tmp_path, monkeypatch):
    source, fragment = PLUGINS[kind]
    module = f"plugin19_{kind}"
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FACECLI_PLUGINS", module)
    for args in (["train", "--help"], ["info", "x.pt"]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and module in lines[0] and fragment in lines[0], result.output
    from facecli.backbones import BACKBONES

    assert BACKBONES["resnet18"].__module__ == "facecli.backbones"


# --------------------------------------------------------------------------- min_loss.pt


def test_default_warmups_never_make_a_warmup_epoch_min_loss(trained_checkpoint):
    run = trained_checkpoint.parent  # 2 epochs, margin warm-up 0.6 epochs: epoch 1 is a warm-up epoch
    assert load_checkpoint(run / "min_loss.pt")["epoch"] == 2


def test_min_loss_waits_for_the_final_head_and_resume_says_why(synth_train_dir, tmp_path):
    ck = tmp_path / "ck"
    args = ["train", "arcface", *TINY_TRAIN_ARGS, "--train-dir", synth_train_dir, "--checkpoints-dir", ck, "--run-name", "w",
            "--margin-warmup-epochs", "1"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    run = ck / "arcface" / "w"
    assert not (run / "min_loss.pt").exists()
    line = one_line_error(cli("resume", "arcface", "--checkpoints-dir", ck, "--from", "min_loss"))
    assert "no min_loss.pt" in line and "warm-up" in line
    lfw = str(synth_train_dir.parent / "Labeled Faces in the Wild (LFW)")
    result = cli("resume", "arcface", "--checkpoints-dir", ck, "--epochs", "2", "--no-eval", "--lfw-dir", lfw)
    assert result.exit_code == 0, result.output
    best = load_checkpoint(run / "min_loss.pt")
    losses = {r["epoch"]: r["epoch_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch_loss" in r}
    assert best["epoch"] == 2 and best["min_loss"] == pytest.approx(losses[2]) and losses[1] < losses[2]  # epoch 1 was lower: a warm-up
    cfg = load_checkpoint(run / "latest.pt")["train_config"]
    assert cfg["eval"] is False and cfg["lfw_dir"] == lfw


def test_a_stop_before_any_checkpoint_does_not_claim_one_is_kept(synth_train_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    real, calls = F.cross_entropy, {"n": 0}

    def cross_entropy(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw) * (float("nan") if calls["n"] >= 2 else 1.0)

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    result = cli("train", "arcface", *TINY_TRAIN_ARGS, "--train-dir", synth_train_dir, "--checkpoints-dir", tmp_path / "ck", "--run-name", "n")
    monkeypatch.undo()
    out = " ".join(result.output.split())
    assert result.exit_code == 4 and "Loss became nan at step 2" in out, result.output
    assert "last good checkpoint" not in out and "No checkpoint had been written yet" in out


# --------------------------------------------------------------------------- LFW defaults, settings, messages


def test_tune_threshold_uses_the_runs_lfw_and_names_its_picture(trained_checkpoint, tmp_path, monkeypatch):
    import matplotlib.figure

    ck = tmp_path / "run" / "latest.pt"
    ck.parent.mkdir()
    shutil.copyfile(trained_checkpoint, ck)
    limits = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (limits.append(self.axes[0].get_xlim()), real(self, *a, **k)))
    result = cli("tune-threshold", ck, "--device", "cpu", "--workers", "0")  # no --lfw-dir, no DATASET_PATH
    assert result.exit_code == 0, result.output
    assert (ck.parent / "latest_threshold_curve.png").is_file() and not (ck.parent / "threshold_curve.png").exists()
    assert limits == [(-1.0, 1.0)]
    line = one_line_error(cli("tune-threshold", ck, "--device", "cpu", "--workers", "0"))
    assert "latest_threshold_curve.png already exists" in line and "--overwrite" in line


def test_dataset_path_messages_say_what_is_wrong(trained_checkpoint, tmp_path, monkeypatch):
    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["train_config"]["lfw_dir"] = str(tmp_path / "moved")
    save_checkpoint(ckpt, tmp_path / "c.pt")
    monkeypatch.setenv("DATASET_PATH", str(tmp_path / "nowhere"))
    line = one_line_error(cli("eval-lfw", tmp_path / "c.pt", "--device", "cpu"))
    assert "'nowhere' does not exist" in line.replace(str(tmp_path) + os.sep, "") and "moved" in line
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("DATASET_PATH", str(tmp_path / "empty"))
    line = one_line_error(cli("eval-lfw", tmp_path / "c.pt", "--device", "cpu"))
    assert "exists but holds no" in line and "Labeled Faces in the Wild (LFW)" in line


def test_env_file_cache_dir_accepted_and_bad_line_warned_once(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(f"this line is bad\nFACECLI_CACHE_DIR={tmp_path / 'c'}\n")
    # a real process: python-dotenv's own warning goes through logging, which pytest captures in-process
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "facecli", "train", "arcface", "--print-config"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warned) == 1 and "malformed" in warned[0] and "unknown key" not in proc.stderr, proc.stderr
    from facecli.data.index import default_cache_dir
    from facecli.settings import load_settings

    monkeypatch.delenv("FACECLI_CACHE_DIR")  # the .env's value reaches the folder index
    load_settings()
    assert default_cache_dir() == tmp_path / "c"
    (tmp_path / ".env").unlink()
    monkeypatch.setenv("WANDB_MODE", "bogus")
    line = one_line_error(cli("train", "arcface", "--print-config"))
    assert "WANDB_MODE" in line and "bogus" in line and "type=" not in line and "Value error" not in line


def test_messages_name_the_flags_and_hide_python_internals(tmp_path):
    (tmp_path / "out").mkdir()
    for name in ("train.rec", "train.idx"):
        (tmp_path / "out" / name).write_bytes(b"")
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert "--overwrite" in one_line_error(cli("pack", tmp_path / "src", tmp_path / "out"))
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n" * 5)
    line = one_line_error(cli("info", tmp_path / "text.pt"))
    assert "damaged or not a PyTorch checkpoint" in line and "Unsupported operand" not in line
