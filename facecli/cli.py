"""The ``facecli`` command line: assembles the commands of :mod:`facecli.commands` into one app.

Each command parses flags, merges them with settings, builds objects and calls the
library. Errors a user can cause (:class:`facecli.errors.UserError`) print one line and
exit non-zero; ``facecli --debug ...`` shows the traceback too.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperGroup

from facecli import __version__
from facecli.commands import data, evaluation, ijb, photos, training
from facecli.commands.common import error_line, state
from facecli.commands.plugins import load_plugins
from facecli.errors import UserError
from facecli.ui import console


class _Commands(TyperGroup):
    """facecli's command group, built once per run.

    Before anything runs (``--help`` and completion too) it loads the plugins, inside the
    one-line error guard. ``train``, ``resume`` and ``demo``, whose flags depend on the
    registered losses, are built when first looked up (after the plugins), once each; the
    command list of ``--help`` shows their docstrings without building them (nor importing torch).
    """

    _listing = False

    def main(self, *args, **kwargs):
        try:
            load_plugins()
        except UserError as e:
            error_line(str(e))
            sys.exit(e.exit_code)
        return super().main(*args, **kwargs)

    def list_commands(self, ctx) -> list[str]:
        return list(dict.fromkeys([*training.COMMANDS, *super().list_commands(ctx)]))

    def format_commands(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx, name: str):
        if name in training.COMMANDS and name not in self.commands:
            if self._listing:  # the command list needs only the one-line help
                return click.Command(name, help=training.COMMANDS[name][0].__doc__)
            info = typer.models.CommandInfo(name, callback=training.build(name))
            self.add_command(typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=None), name)
        return super().get_command(ctx, name)


def _version(value: bool):
    if value:
        console.print(f"facecli {__version__}")
        raise typer.Exit()


def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    state["debug"] = debug


def build_app() -> typer.Typer:
    """The app: the root options and every family's commands (train, resume and demo join when looked up)."""
    app = typer.Typer(
        cls=_Commands,
        name="facecli",
        help="Train and evaluate margin-loss face-recognition models (SphereFace, CosFace, ArcFace, CurricularFace, FaceNet).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,  # --install-completion: model, backbone and option choices come from the registries
        rich_markup_mode=None,
    )
    app.callback()(_root)
    for family in (evaluation, ijb, photos, data):
        family.register(app)
    return app


app = build_app()


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
