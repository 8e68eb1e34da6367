"""Runs that survive a lost worker: torchrun ``--max-restarts`` continues the run automatically.

When a worker (or a node) dies, torchrun's agent stops the group and starts it again with the
same command, ``TORCHELASTIC_RESTART_COUNT`` one higher. The restarted group must not start a
new run (nor refuse the existing one): it finds the run the first start created and continues
it from its newest complete checkpoint (``latest.pt``, written atomically; with
``--checkpoint-every N`` at most N steps are lost). The run is the one named by ``--run-name``,
or, without one, the run whose record (config.json) holds this torchrun job's id
(``TORCHELASTIC_RUN_ID``). Its saved configuration must be this command's, or the restart
stops with one clear error. Outside a torchrun restart nothing changes: an existing run is
refused as always.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from facecli.engine import runs
from facecli.errors import UserError

# Settings that may differ between the run's saved configuration and the restarted command.
_MAY_DIFFER = ("run_name",)


def restart_count() -> int:
    """How many times torchrun has restarted this group (0: the first start, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_id() -> str | None:
    """torchrun's id of this job (``--rdzv-id``; a fresh one per ``--standalone`` launch), kept across restarts."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


@dataclass
class Continuation:
    """The run a restarted group continues: its folder, and its latest.pt (None: none written yet)."""

    run_dir: Path
    checkpoint: Path | None


def run_to_continue(cfg) -> Continuation | None:
    """After a torchrun restart (the caller knows one happened), the run this command started
    (None: nothing to continue)."""
    run_dir = _find_run_dir(Path(cfg.checkpoints_dir) / cfg.model, cfg.run_name)
    if run_dir is None:
        return None
    latest = run_dir / runs.LATEST
    if not latest.is_file():
        return Continuation(run_dir, None)  # lost before its first checkpoint: start it again
    _check_same_config(cfg, latest)
    return Continuation(run_dir, latest)


def _find_run_dir(base: Path, run_name: str | None) -> Path | None:
    if run_name:
        return base / run_name if (base / run_name).is_dir() else None
    job = job_id()
    if job is None or not base.is_dir():
        return None
    mine = [d for d in base.iterdir() if (d / "config.json").is_file() and _recorded_job(d) == job]
    return max(mine, key=lambda d: (d / "config.json").stat().st_mtime) if mine else None


def _recorded_job(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("elastic_job_id")
    except (OSError, ValueError, AttributeError):
        return None


def _check_same_config(cfg, latest: Path) -> None:
    from facecli.engine.checkpoint import load_checkpoint
    from facecli.engine.tracking import scrub

    saved = load_checkpoint(latest, expect_model=cfg.model).get("train_config") or {}
    now = scrub(cfg.to_dict())
    differ = [k for k in sorted(set(saved) | set(now)) if k not in _MAY_DIFFER and saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} there, {now.get(k)!r} now)" for k in differ[:3])
        raise UserError(
            f"torchrun restarted this job, but the run {str(latest.parent)!r} it would continue has other settings: {shown}.",
            hint="Restart with the run's own settings, or give a new --run-name to start another run.",
        )
