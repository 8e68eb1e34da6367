"""Errors a user can cause.

A ``UserError`` is printed by the CLI as one line (what, where, what to do) with a
non-zero exit and no traceback. Anything else is a bug and still raises.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment, not with facecli."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")

    def __str__(self) -> str:  # one line, always
        text = self.message if not self.hint else f"{self.message} {self.hint}"
        return " ".join(text.split())


class ImageError(UserError):
    """An image that cannot be decoded (empty, truncated, not an image)."""


class CheckpointError(UserError):
    """A file that is not a loadable facecli checkpoint."""


class TrainingStopped(Exception):
    """Raised inside the engine to end a run early on purpose (signal, NaN, disk)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
