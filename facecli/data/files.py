"""The one image-file finder of ``embed``, ``gallery build``, ``identify``, ``align`` and ``export --check-images``.

Folders are walked recursively and symbolic links are followed, files and folders alike
(symlinked data trees are the norm on clusters): a folder reached twice through links
(a loop such as ``Everyone -> .``) is walked once and the repeat is reported. Anything
that is not a regular file (a FIFO, a socket, a device) is skipped, never opened: reading
a FIFO would block forever. Every skipped path is counted and named with its reason.
Files that are not images by their suffix are ignored, and counted.

Training data is found by :mod:`facecli.data.index` instead, which also follows links
(one folder per identity); pairs files are read by :mod:`facecli.data.lfw`, whose names
may not leave the LFW folder.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from facecli.data.images import is_image_file


@dataclass
class FoundImages:
    """Image files (in walk order), their keys (path relative to the folder named, or the
    file's name when named directly), what was skipped and why, and how many non-images were ignored."""

    files: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: int = 0


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _regular(path: Path, found: FoundImages) -> bool:
    """True for a regular file (through links); otherwise say why it is skipped."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        reason = "a broken link" if path.is_symlink() else (e.strerror or type(e).__name__).lower()
        found.skipped.append(f"{path}: {reason}; not read")
        return False
    if not stat.S_ISREG(mode):
        found.skipped.append(f"{path}: {_kind(mode)}; not read")
        return False
    return True


def _walk(folder: Path, root: Path, found: FoundImages, seen: set) -> None:
    """Depth-first, sorted, following links; each real folder once."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        found.skipped.append(f"{folder}: cannot list ({(e.strerror or type(e).__name__).lower()}); not read")
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=True):
            real = path.resolve()
            if real in seen or real in root.resolve().parents:
                found.skipped.append(f"{path}: links to {real}, a folder already read or above {root} (a loop); not read")
                continue
            seen.add(real)
            _walk(path, root, found, seen)
        elif not is_image_file(path):
            found.ignored += 1
        elif _regular(path, found):
            found.files.append(path)
            found.keys.append(path.relative_to(root).as_posix())


def find_images(paths: Sequence[Path]) -> FoundImages:
    """Image files of ``paths``: files as given, folders recursively (see the module's rules)."""
    found = FoundImages()
    for p in map(Path, paths):
        if p.is_dir():
            _walk(p, p, found, {p.resolve()})
        elif p.exists() or p.is_symlink():
            if _regular(p, found):
                found.files.append(p)
                found.keys.append(p.name)
        else:
            found.skipped.append(f"{p}: no such file or folder")
    return found


def collect_images(paths: Sequence[Path]) -> tuple[list[Path], list[str], list[str]]:
    """(files, keys, skipped) of :func:`find_images`, for callers that want the three lists."""
    found = find_images(paths)
    return found.files, found.keys, found.skipped
