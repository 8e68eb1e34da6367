"""Terminal output: one rich console, warnings, progress bars and tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False)


def info(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def progress(transient: bool = False, **fields: str) -> Progress:
    """A progress bar; extra text columns show task fields (loss, lr, images/s)."""
    columns = [
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    columns += [TextColumn(template) for template in fields.values()]
    return Progress(*columns, console=err_console, transient=transient, disable=not err_console.is_terminal)
