"""``train``, ``resume`` and ``demo``: their flags derive from the settings (:mod:`facecli.commands.flags`).

Each command is a body (``**kw`` in, the library called) and a parameter builder (the
fixed arguments of the command plus the derived setting flags). The flags depend on the
losses registered (plugins included), so :func:`build` runs a builder only when the command
is looked up, after the plugins are loaded: once per run, never for another command.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from facecli.commands.common import command_name, guarded, log, progress_factory, settings
from facecli.engine.runs import CHECKPOINT_NAMES
from facecli.ui import console, progress, warn

ResumeFrom = Enum("ResumeFrom", {name: name for name in CHECKPOINT_NAMES}, type=str)  # resume --from


def _train_progress():
    return progress(loss="{task.fields[loss]}", lr="{task.fields[lr]}", ips="{task.fields[ips]}")


def _tracker_factory(settings, wandb_flag):
    from facecli.engine.tracking import tracker_factory

    return tracker_factory(settings, wandb_flag, log=log, warn=warn)


def _print_training_result(result) -> None:
    console.print(
        f"Done: {result.epochs} epoch(s), {result.steps} steps, last loss "
        f"{result.last_loss:.4f}" if result.last_loss is not None else f"Done: {result.steps} steps",
        markup=False,
    )
    console.print(f"Run directory: {result.run_dir}", markup=False)


def _run(cfg, run_settings, **resume) -> None:
    from facecli.engine.trainer import Trainer

    trainer = Trainer(cfg, **resume, tracker_factory=_tracker_factory(run_settings, cfg.wandb), log=log, warn=warn,
                      progress_factory=_train_progress)
    result = trainer.run()
    if trainer.world.is_main:
        _print_training_result(result)


def train_parameters() -> list[inspect.Parameter]:
    from facecli.commands.flags import param, choice_type, config_options
    from facecli.engine.config import choices

    fixed = [
        param("model", Optional[choice_type("model", choices("model"))], typer.Argument(None, help="Loss to train (may come from --config instead).", show_default=False)),
        param("config", Optional[Path], typer.Option(None, "--config", help="YAML, TOML or JSON file of settings (keys as in --print-config), such as a run's config.yaml or its config.json record; flags override it.")),
        param("print_config", bool, typer.Option(False, "--print-config", help="Print the resolved configuration as YAML (what --config reads) and train nothing.")),
        param("dataset_path", Optional[Path], typer.Option(None, help="Dataset root (default: DATASET_PATH); holds CASIA-webface/ and LFW.")),
        param("train_rec", Optional[Path], typer.Option(None, help="Folder holding insightface's train.rec/train.idx (same as --train-dir on it).")),
    ]
    return fixed + config_options()


def train(**kw):
    """Train a model; writes <checkpoints>/<model>/<run>/ with latest.pt, min_loss.pt, epoch_NNN.pt, config.yaml (restartable: train --config it) and config.json (the record)."""
    from facecli.engine.config import dump_yaml

    run_settings = settings()
    cfg = _train_config(kw, run_settings)
    if kw["print_config"]:
        console.print(dump_yaml(cfg), markup=False, highlight=False, end="")
        return
    _run(cfg, run_settings)


def _train_config(kw: dict, run_settings):
    """File < flags, validated before any data is looked at; then the data folders (not for --print-config)."""
    from facecli.commands.flags import train_values, with_data_paths
    from facecli.engine.config import TrainConfig

    values, origins = train_values(kw, run_settings.checkpoints_dir, warn)
    cfg = TrainConfig.build(values, origins)
    root = kw["dataset_path"] or run_settings.dataset_path
    return with_data_paths(cfg, root, check=not kw["print_config"], root_given=kw["dataset_path"] is not None)


def resume_parameters() -> list[inspect.Parameter]:
    from facecli.commands.flags import param, choice_type, config_options, resume_keys
    from facecli.engine.config import choices
    from facecli.engine.runs import MIN_LOSS_RULE

    fixed = [
        param("model", choice_type("model", choices("model")), typer.Argument(..., help="The model of the run to continue.")),
        param("from_", ResumeFrom, typer.Option(ResumeFrom.latest, "--from", help=f"latest, min_loss or best checkpoint of the run. {MIN_LOSS_RULE} (none before the warm-up ends); best.pt: the best View 1 dev-test accuracy (--eval-every).")),
        param("run", Optional[str], typer.Option(None, "--run", "--run-name", help="Run name (default: the newest run of MODEL). Under torchrun write --run-name (torchrun reads --run as its own --run-path).")),
    ]
    return fixed + config_options(keys=resume_keys())


def resume(**kw):
    """Continue a run from its latest (or min_loss/best) checkpoint, with everything restored."""
    from facecli.commands.flags import given_values
    from facecli.engine.runs import prepare_resume

    run_settings = settings()
    overrides = given_values(kw)
    checkpoints_dir = Path(overrides.pop("checkpoints_dir", None) or run_settings.checkpoints_dir)
    path, cfg, ckpt = prepare_resume(checkpoints_dir, kw["model"].value, kw["run"], kw["from_"].value, overrides)
    _run(cfg, run_settings, resume_from=path, resume_checkpoint=ckpt)


def demo_parameters() -> list[inspect.Parameter]:
    from facecli.commands.flags import param, choice_type, config_options
    from facecli.demo import DEMO_SETTINGS, HEAD_SETTINGS
    from facecli.engine.config import choices

    model = choice_type("model", choices("model"))
    fixed = [
        param("out_dir", Path, typer.Option(Path("demo"), "--out", help="Where the synthetic set and the run go.")),
        param("model", model, typer.Option(model("arcface"), help="Loss to train.")),
        param("identities", int, typer.Option(200, help="Synthetic training identities.")),
        param("test_identities", int, typer.Option(60, help="Synthetic held-out identities.")),
        param("images_per_identity", int, typer.Option(20, help="Synthetic images per identity.")),
    ]
    keys = set(DEMO_SETTINGS) - set(HEAD_SETTINGS)
    return fixed + config_options(keys=keys, defaults=DEMO_SETTINGS)


def demo(**kw):
    """The main job on the embedded synthetic set: train on the CPU, show held-out accuracy, trained vs untrained."""
    from facecli.commands.flags import given_values
    from facecli.demo import run_demo

    res = run_demo(
        kw["out_dir"], model=kw["model"].value, settings=given_values(kw), identities=kw["identities"], test_identities=kw["test_identities"],
        images_per_identity=kw["images_per_identity"], log=log, warn=warn, progress=progress_factory, train_progress=_train_progress,
    )
    _print_demo(res, kw["out_dir"], kw["model"].value)


def _print_demo(res, out_dir: Path, model: str) -> None:
    import shlex

    from rich.table import Table

    t = Table(title=f"Held-out verification: synthetic LFW View 2, {res.trained['pairs']} pairs, 10-fold")
    for col in ("network", "accuracy", "AUC", "EER"):
        t.add_column(col, justify="left" if col == "network" else "right")
    for name, r in (("untrained", res.untrained), (f"trained ({model}, {res.epochs} epochs)", res.trained)):
        t.add_row(name, f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}%", f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}%")
    console.print(t)
    if res.dev_test_accuracy is not None:
        console.print(f"View 1 dev-test accuracy at the threshold tuned on dev-train: {100 * res.dev_test_accuracy:.2f}%", markup=False)
    ckpt, lfw = str(res.run_dir / "latest.pt"), str(out_dir / "data" / "Labeled Faces in the Wild (LFW)")
    console.print(f"Run directory: {res.run_dir}", markup=False)
    console.print(f"Next: {command_name()} eval-lfw {shlex.quote(ckpt)} --lfw-dir {shlex.quote(lfw)}", markup=False)


COMMANDS = {"train": (train, train_parameters), "resume": (resume, resume_parameters), "demo": (demo, demo_parameters)}


def build(name: str):
    """The Typer callback of command ``name``: its parameters computed once, with ``guarded``'s errors."""
    from facecli.commands.flags import derived_command

    body, parameters = COMMANDS[name]
    return derived_command(guarded(body), parameters())
