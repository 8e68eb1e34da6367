"""Runs on disk: ``<checkpoints>/<model>/<run-name>/{latest,min_loss,best,epoch_NNN}.pt``.

Naming, creating and finding a run's folder, and the file names inside it, live here once.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from facecli.errors import UserError

LATEST, MIN_LOSS, BEST = "latest.pt", "min_loss.pt", "best.pt"
# What min_loss.pt means (also said by `resume --help` and the README).
MIN_LOSS_RULE = "min_loss.pt is the epoch of lowest mean loss among those trained with the final head, after the margin and scale warm-ups"
CHECKPOINT_NAMES = {"latest": LATEST, "min_loss": MIN_LOSS, "best": BEST}  # ``resume --from`` choices
RUN_NAME_FORMAT = "%Y%m%d-%H%M%S"  # the default run name: the start time


EPOCH_FILES = "epoch_*.pt"  # the glob of epoch_file's names (rotated by --keep-epochs)


def epoch_file(epoch: int) -> str:
    """The file of the checkpoint written when ``epoch`` epochs are finished."""
    return f"epoch_{epoch:03d}.pt"


def is_run_name(name: str) -> bool:
    """A run name is one folder name: no separators, not ``.`` or ``..``."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def default_run_name() -> str:
    return datetime.now().strftime(RUN_NAME_FORMAT)


def list_runs(checkpoints_dir: Path, model: str) -> list[Path]:
    """Run directories of ``model`` that hold a latest.pt, newest first."""
    base = Path(checkpoints_dir) / model
    if not base.is_dir():
        return []
    runs = [d for d in base.iterdir() if d.is_dir() and (d / LATEST).is_file()]
    return sorted(runs, key=lambda d: (d / LATEST).stat().st_mtime, reverse=True)


def find_run_checkpoint(checkpoints_dir: Path, model: str, run: str | None, which: str) -> Path:
    """The checkpoint file ``resume`` starts from, or one clear error saying what exists."""
    base = Path(checkpoints_dir) / model
    if run is not None:
        if not is_run_name(run):
            raise UserError(f"--run {run!r} is not a run name.")
        run_dir = base / run
        if not run_dir.is_dir():
            others = [d.name for d in list_runs(checkpoints_dir, model)]
            raise UserError(
                f"No {model} run named {run!r} in {str(base)!r}.",
                hint=f"Existing runs: {', '.join(others[:5])}." if others else "There are no runs of this model there.",
            )
    else:
        runs = list_runs(checkpoints_dir, model)
        if not runs:
            raise UserError(
                f"No {model} runs in {str(base)!r}.",
                hint="Check --checkpoints-dir / CHECKPOINTS_DIR, or start one with `facecli train`.",
            )
        run_dir = runs[0]
    path = run_dir / CHECKPOINT_NAMES[which]
    if not path.is_file():
        others = [k for k, name in CHECKPOINT_NAMES.items() if k != which and (run_dir / name).is_file()]
        why = {"min_loss": f" {MIN_LOSS_RULE}; no such epoch has finished yet (the warm-up covers every epoch so far)", "best": " (best.pt is written with --eval-every N)"}
        raise UserError(
            f"Run {str(run_dir)!r} has no {path.name}{why.get(which, '') if (run_dir / 'latest.pt').is_file() else ''}.",
            hint=f"Try --from {others[0]}." if others else "It holds no checkpoint to resume from; start the run again with `facecli train`.",
        )
    return path


# What a checkpoint must hold to be resumed (an exported model has none of it). Not the
# settings `resume` may change: those are TrainConfig fields marked ``resume``.
TRAINING_STATE_KEYS = ("train_config", "epoch", "batch_in_epoch", "step", "optimizer_state")


def prepare_resume(checkpoints_dir: Path, model: str, run: str | None, which: str, overrides: dict | None = None):
    """(path, configuration with ``overrides`` applied, loaded checkpoint) to resume from.

    Overrides are the run-environment settings (device, workers, amp, wandb, train_dir moved,
    lfw_dir, eval) and ``epochs`` (a new total): the settings marked ``resume`` in TrainConfig.
    Everything else comes from the checkpoint.
    """
    overrides = dict(overrides or {})
    from facecli.engine.checkpoint import CheckpointError, load_checkpoint
    from facecli.engine.config import TrainConfig

    path = find_run_checkpoint(Path(checkpoints_dir), model, run, which)
    ckpt = load_checkpoint(path, expect_model=model)
    missing = [k for k in TRAINING_STATE_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} cannot be resumed: it has no {', '.join(missing)} (an exported model, not a training state).",
            hint="It can still be evaluated; to train further, start a new run.",
        )
    if overrides.get("train_dir") is not None:
        overrides["train_dir"] = str(overrides["train_dir"])
    if overrides.get("lfw_dir") is not None:  # --lfw-dir: the folder must exist; stored absolute
        from facecli.data import resolve_lfw_dir
        from facecli.engine.config import absolute

        overrides["lfw_dir"] = absolute(resolve_lfw_dir(overrides["lfw_dir"], None))
    cfg = TrainConfig.from_dict(ckpt["train_config"], **{**overrides, "checkpoints_dir": str(checkpoints_dir)})
    if cfg.epochs <= int(ckpt["epoch"]) and int(ckpt.get("batch_in_epoch", 0)) == 0:
        raise UserError(
            f"Run {path.parent.name} already finished {ckpt['epoch']} of {cfg.epochs} epochs.",
            hint="Pass --epochs with a larger total to train further.",
        )
    return path, cfg, ckpt


def new_run_dir(checkpoints_dir: Path, model: str, name: str, *, check_free: bool = True) -> Path:
    """The folder of a new run named ``name``; refuses a bad name or one that holds a run."""
    if not is_run_name(name):
        raise UserError(f"--run-name {name!r} is not a plain name.", hint="Use letters, digits, '-', '_' or '.'.")
    run_dir = Path(checkpoints_dir) / model / name
    if check_free and (run_dir / LATEST).exists():
        raise UserError(
            f"Run directory {str(run_dir)!r} already holds a run.",
            hint=f"Continue it with `facecli resume {model} --run {name}` or choose another --run-name.",
        )
    return run_dir


def create_run_dir(run_dir: Path, checkpoints_dir) -> None:
    """Make the run folder, or one clear error naming the setting to change."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the run directory {str(run_dir)!r} under CHECKPOINTS_DIR / --checkpoints-dir "
            f"{str(checkpoints_dir)!r} ({e.strerror or e}).",
            hint="Point CHECKPOINTS_DIR or --checkpoints-dir at a writable folder.",
        ) from e


def write_run_record(run_dir: Path, cfg, record: dict) -> None:
    """``config.json`` (what the run was: configuration and what it found) and ``config.yaml``
    (the configuration alone, which ``train --config`` reads to start the run again)."""
    from facecli.engine.config import CONFIG_FILE, dump_yaml
    from facecli.io import atomic_write

    atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    text = f"# facecli train --config {CONFIG_FILE} (or config.json) starts this run again (add --run-name NEW); paths are absolute.\n" + dump_yaml(cfg)
    atomic_write(run_dir / CONFIG_FILE, lambda f: f.write(text.encode()))
