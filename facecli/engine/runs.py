"""Finding runs on disk: ``<checkpoints>/<model>/<run-name>/{latest,min_loss,best}.pt``."""

from __future__ import annotations

from pathlib import Path

from facecli.errors import UserError

# What min_loss.pt means (also said by `resume --help` and the README).
MIN_LOSS_RULE = "min_loss.pt is the epoch of lowest mean loss among those trained with the final head, after the margin and scale warm-ups"
CHECKPOINT_NAMES = {"latest": "latest.pt", "min_loss": "min_loss.pt", "best": "best.pt"}


def list_runs(checkpoints_dir: Path, model: str) -> list[Path]:
    """Run directories of ``model`` that hold a latest.pt, newest first."""
    base = Path(checkpoints_dir) / model
    if not base.is_dir():
        return []
    runs = [d for d in base.iterdir() if d.is_dir() and (d / "latest.pt").is_file()]
    return sorted(runs, key=lambda d: (d / "latest.pt").stat().st_mtime, reverse=True)


def find_run_checkpoint(checkpoints_dir: Path, model: str, run: str | None, which: str) -> Path:
    """The checkpoint file ``resume`` starts from, or one clear error saying what exists."""
    base = Path(checkpoints_dir) / model
    if run is not None:
        if "/" in run or "\\" in run or run in (".", ".."):
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


RESUME_KEYS = ("train_config", "epoch", "batch_in_epoch", "step", "optimizer_state")


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
    missing = [k for k in RESUME_KEYS if k not in ckpt]
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
