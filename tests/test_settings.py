"""Settings: environment and ``.env`` (pydantic-settings), CLI flags over both, ``.env``
problems warned about but not fatal, bad paths reported in one line naming setting and path,
and the W&B key never leaving memory."""

from __future__ import annotations


from conftest import REPO, TINY_TRAIN_ARGS, cli, one_line_error
from facecli.settings import check_env_file, load_settings

SECRET = "0123456789abcdef-not-a-real-key-fedcba9876543210"



def fast_args() -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    args[args.index("--batch-size") + 1] = "32"  # 2 steps on the tiny set
    return args + ["--no-eval"]


# ----------------------------------------------------------------- reading
def test_defaults_without_env_or_dotenv(tmp_path):
    s = load_settings()
    assert s.dataset_path is None
    assert str(s.checkpoints_dir) == "checkpoints"
    assert s.wandb_api_key is None and s.wandb_entity is None
    assert s.wandb_project == "facecli"


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("DATASET_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("CHECKPOINTS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_MODE", "offline")
    s = load_settings()
    assert s.dataset_path == tmp_path / "data"
    assert s.checkpoints_dir == tmp_path / "runs"
    assert s.wandb_api_key.get_secret_value() == SECRET
    assert (s.wandb_project, s.wandb_entity, s.wandb_mode) == ("proj", "team", "offline")
    # the key is masked wherever settings are shown
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in s.model_dump_json()


def test_dotenv_in_the_working_directory_is_read_and_environment_wins(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text(
        "# comment\n\n"
        f"DATASET_PATH={tmp_path / 'from-dotenv'}\n"
        "CHECKPOINTS_DIR=runs-from-dotenv\n"
        f"WANDB_API_KEY={SECRET}\n"
        "export WANDB_PROJECT=dotenv-project\n"
        "WANDB_ENTITY=\n"
        "WANDB_MODE=disabled\n"
    )
    warnings: list[str] = []
    s = load_settings(warn=warnings.append)
    assert warnings == []
    assert s.dataset_path == tmp_path / "from-dotenv"
    assert str(s.checkpoints_dir) == "runs-from-dotenv"
    assert s.wandb_api_key.get_secret_value() == SECRET
    assert s.wandb_project == "dotenv-project"
    assert s.wandb_entity is None  # blank means unset
    monkeypatch.setenv("CHECKPOINTS_DIR", "runs-from-env")
    assert str(load_settings().checkpoints_dir) == "runs-from-env"


def test_dotenv_example_has_no_problems():
    assert check_env_file(REPO / ".env.example") == []


def test_malformed_line_and_unknown_key_warn_but_the_rest_is_used(tmp_path):
    (tmp_path / ".env").write_text(
        f"DATASET_PATH={tmp_path}\n"
        "this line has no equals sign\n"
        "DATASET_PTH=/typo\n"
        "CHECKPOINTS_DIR=ck\n"
    )
    warnings: list[str] = []
    s = load_settings(warn=warnings.append)
    assert s.dataset_path == tmp_path and str(s.checkpoints_dir) == "ck"
    assert len(warnings) == 2
    assert ".env:2: malformed line" in warnings[0]
    assert ".env:3: unknown key 'DATASET_PTH'" in warnings[1] and "DATASET_PATH" in warnings[1]


def test_dotenv_problems_do_not_stop_a_command(trained_checkpoint, synth_root, tmp_path):
    """A real command reads DATASET_PATH from a .env with a typo in it, warns, and works."""
    (tmp_path / ".env").write_text(f"not a setting\nDATASET_PATH={synth_root}\nWANDB_MODDE=offline\n")
    result = cli("eval-lfw", trained_checkpoint, "--device", "cpu", "--workers", "0", "--json", tmp_path / "lfw.json")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and ".env:1: malformed line" in result.output
    assert "unknown key 'WANDB_MODDE'" in result.output
    assert (tmp_path / "lfw.json").is_file()  # LFW was found under DATASET_PATH from .env


def test_invalid_setting_value_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")  # the environment would win over .env
    (tmp_path / ".env").write_text("WANDB_MODE=sometimes\n")
    line = one_line_error(cli("train", "arcface", *fast_args()))
    assert "Invalid setting" in line and "wandb_mode" in line.lower()


# ----------------------------------------------------------------- bad paths
def test_missing_dataset_path_in_dotenv_is_one_line_naming_setting_and_path(tmp_path):
    missing = tmp_path / "no-such-data"
    (tmp_path / ".env").write_text(f"DATASET_PATH={missing}\n")
    line = one_line_error(cli("train", "arcface", *fast_args()))
    assert "DATASET_PATH" in line and str(missing) in line


def test_dataset_path_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    line = one_line_error(cli("train", "arcface", "--dataset-path", f, *fast_args()))
    assert "--dataset-path" in line and str(f) in line


def test_no_dataset_configured_at_all_is_one_line_naming_both_ways(trained_checkpoint, tmp_path):
    from facecli.engine.checkpoint import load_checkpoint, save_checkpoint

    line = one_line_error(cli("train", "arcface", *fast_args()))
    assert "DATASET_PATH" in line and "--dataset-path" in line
    ckpt = load_checkpoint(trained_checkpoint)  # a checkpoint without its run's lfw_dir (eval-lfw's other default)
    ckpt["train_config"]["lfw_dir"] = None
    save_checkpoint(ckpt, tmp_path / "no_lfw.pt")
    line = one_line_error(cli("eval-lfw", tmp_path / "no_lfw.pt", "--device", "cpu"))
    assert "No LFW folder" in line and "DATASET_PATH" in line and "--lfw-dir" in line


def test_checkpoints_dir_without_runs_is_one_line_naming_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CHECKPOINTS_DIR", str(tmp_path / "empty-runs"))
    line = one_line_error(cli("resume", "arcface"))
    assert str(tmp_path / "empty-runs" / "arcface") in line and "CHECKPOINTS_DIR" in line


# ----------------------------------------------------------------- flags over settings
def test_checkpoints_dir_setting_is_used_and_the_flag_overrides_it(monkeypatch, synth_root, tmp_path):
    (tmp_path / ".env").write_text(f"DATASET_PATH={synth_root}\nCHECKPOINTS_DIR={tmp_path / 'dotenv-runs'}\n")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)

    result = cli("train", "arcface", "--run-name", "a", *fast_args())
    assert result.exit_code == 0, result.output
    run = tmp_path / "dotenv-runs" / "arcface" / "a"
    assert (run / "latest.pt").is_file()

    result = cli("train", "arcface", "--run-name", "b", "--checkpoints-dir", tmp_path / "flag-runs", *fast_args())
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flag-runs" / "arcface" / "b" / "latest.pt").is_file()
    assert not (tmp_path / "dotenv-runs" / "arcface" / "b").exists()

    # the W&B key was in the environment for both runs; it is in no file and no output
    assert SECRET not in result.output
    for path in list(run.iterdir()) + list((tmp_path / "flag-runs" / "arcface" / "b").iterdir()):
        assert SECRET.encode() not in path.read_bytes(), path
