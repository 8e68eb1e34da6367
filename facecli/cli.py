"""The ``facecli`` command line: assembles the commands of :mod:`facecli.commands` into one app.

Each command parses flags, merges them with settings, builds objects and calls the
library. Errors a user can cause (:class:`facecli.errors.UserError`) print one line and
exit non-zero; ``facecli --debug ...`` shows the traceback too.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from facecli import __version__
from facecli.commands import data, evaluation, ijb, photos, training
from facecli.commands.common import error_line, state
from facecli.errors import UserError
from facecli.ui import console


class _Commands(TyperGroup):
    """The command group: plugins are loaded (and a broken one reported in one line) before any command or --help."""

    def main(self, *args, **kwargs):
        from facecli.cli_config import load_plugins

        try:
            load_plugins()
        except UserError as e:
            error_line(str(e))
            sys.exit(e.exit_code)
        return super().main(*args, **kwargs)


app = typer.Typer(
    cls=_Commands,
    name="facecli",
    help="Train and evaluate margin-loss face-recognition models (SphereFace, CosFace, ArcFace, CurricularFace, FaceNet).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion: model, backbone and option choices come from the registries
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        console.print(f"facecli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    state["debug"] = debug


for family in (training, evaluation, ijb, photos, data):
    family.register(app)


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS") is None and os.environ.get("LOCAL_WORLD_SIZE"):
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        app(prog_name="facecli")
    except SystemExit as e:
        _exit_now_if_wandb_left_running(e.code)
        raise
    _exit_now_if_wandb_left_running(0)


def _exit_now_if_wandb_left_running(code) -> None:
    """Exit without wandb's exit hook when W&B was left behind at the end of a run.

    That hook waits for wandb's service process, which waits out an unreachable or slow
    host (tens of seconds); the tracker already gave up on it with a warning, and the
    service process ends by itself when facecli is gone. Everything facecli writes is
    already on disk (checkpoints fsync'ed, metrics appended line by line).
    """
    tracking = sys.modules.get("facecli.engine.tracking")
    if tracking is None or not tracking.wandb_left_running():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    sys.exit(main())
