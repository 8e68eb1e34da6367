"""Writing files so that a crash never leaves a torn one (checkpoints, reports, galleries,
ONNX files): the ground floor every layer writes through, importing nothing of facecli but
its errors.

A write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the target (``os.replace``), and the folder is fsync'ed: a process killed at any
instant leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from facecli.errors import UserError


class WriteError(UserError):
    """Writing failed (disk full, permission denied): the old file, if any, is intact."""

    exit_code = 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write, *, kept: str = "The previous file is kept; free space or fix permissions.",
                 error: type[WriteError] = WriteError) -> None:
    """Call ``write(fileobj)`` on a temporary file, then rename it to ``path``.

    A failed write raises ``error`` (a :class:`WriteError`) whose hint is ``kept``: what the
    user still has and what to do. An exception from ``write`` itself propagates; either
    way the target is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise error(
            f"Could not write {path}: {e.strerror or e}.", hint="Nothing was changed; fix the folder's permissions or free space."
        ) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide checkpoints from the team
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise error(f"Could not write {path}: {reason}.", hint=kept) from e
        raise
    _fsync_dir(path.parent)
