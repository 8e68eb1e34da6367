"""Why a run stopped early, as one line each: a signal, a non-finite step, out of memory.

Each says where the run stopped, what was kept and what to do next; the trainer raises them.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from facecli.errors import TrainingStopped

STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
BAD_STEP_EXIT_CODE = 4
OOM_EXIT_CODE = 5


def stopped_by_signal(signum: int | None, state, model: str, run_name: str) -> TrainingStopped:
    """After ``latest.pt`` was saved at the step boundary: the signal's own exit code."""
    code = STOP_EXIT_CODES.get(signum or signal.SIGINT, 130)
    return TrainingStopped(
        f"Stopped at step {state.step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch}); "
        f"latest.pt saved. Continue with `facecli resume {model} --run {run_name} --from latest`.",
        exit_code=code,
    )


def bad_step(first_bad: int, bad_loss: float, steps_per_epoch: int, run_dir, lr: float) -> TrainingStopped:
    """A non-finite loss or gradient at global step ``first_bad`` (0-based); its update was skipped."""
    spe = steps_per_epoch
    where = f"step {first_bad + 1} (epoch {first_bad // spe + 1}, batch {first_bad % spe + 1})"
    what = f"Loss became {bad_loss}" if not math.isfinite(bad_loss) else f"A gradient became non-finite (loss {bad_loss:.4f})"
    if (Path(run_dir) / "latest.pt").is_file():
        kept, then = f"The last good checkpoint in {run_dir} is kept.", "resume or restart"
    else:
        kept, then = f"No checkpoint had been written yet ({run_dir} holds none to resume).", "restart"
    return TrainingStopped(
        f"{what} at {where}; that update was skipped and the run stopped. {kept} "
        f"Try a lower learning rate (e.g. --lr {lr / 10:g}) and {then}.",
        exit_code=BAD_STEP_EXIT_CODE,
    )


def out_of_memory(step: int, batch_size: int, device, memory: str, run_dir) -> TrainingStopped:
    """The device ran out of memory in step ``step`` (1-based); ``memory``: what the device reports."""
    return TrainingStopped(
        f"Out of memory at step {step} with --batch-size {batch_size} per process on {device} "
        f"({memory}). The last checkpoint in {run_dir} is kept. "
        f"Lower --batch-size (e.g. {max(1, batch_size // 2)}), --image-size or the backbone, and restart or resume.",
        exit_code=OOM_EXIT_CODE,
    )
