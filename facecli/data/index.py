"""A compact, cached index of an identity-folder tree (``root/<identity>/<image>``).

Why it exists. CASIA-WebFace is ~494k files in 10,575 folders. Listing that with a
``stat()`` per file, once per process (every rank of a multi-GPU run, every restart), costs
seconds on a local disk and minutes on network storage; and a list of 494k Python strings,
inherited by 8 DataLoader workers per rank, is copied page by page into every worker as
the workers touch the strings' reference counts. So:

* the walk uses ``os.scandir`` and trusts the directory entry's type (``d_type``); the one
  ``stat()`` per file left finds empty files, runs on 8 threads (network file systems), and
  runs once: the result is cached;
* the index is four numpy arrays (all relative paths in one byte buffer with offsets, and
  int32 labels), which no reference count ever touches: workers share its pages;
* the cache (``$FACECLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/facecli`` or ``~/.cache/facecli``;
  one ``.npz`` per root) is keyed by the root's real path and is valid while no identity
  folder was added, removed, renamed or changed (each folder's mtime changes when a file
  in it is added, removed or renamed). Checking that costs one ``stat()`` per folder. A tree
  with a folder changed in the last 2 seconds is not cached: a second change within the
  file system's timestamp granularity would not show in the mtime;
* in a multi-process run the local rank 0 of each machine builds the index and writes the
  cache, then the other ranks read it (:func:`load_index` with ``coordinate=True``).
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecli.data.images import IMAGE_SUFFIXES

CACHE_ENV = "FACECLI_CACHE_DIR"
CACHE_FORMAT = 1
# Trees smaller than this are indexed in well under a second: not worth a cache file each
# (the test suite and the demo create hundreds of small trees).
CACHE_MIN_FILES = 20_000
SCAN_THREADS = 8  # folders listed in parallel on a cold build (helps most on network file systems)
SETTLE_NS = 2_000_000_000  # folders modified more recently than this are not trusted to the cache


@dataclass(frozen=True)
class PackedStrings:
    """Strings as one uint8 buffer plus int64 offsets: two objects however many strings."""

    data: np.ndarray  # uint8, the encoded strings back to back (os.fsencode)
    offsets: np.ndarray  # int64, len + 1 entries; string i is data[offsets[i]:offsets[i+1]]

    @classmethod
    def from_bytes(cls, items: list[bytes]) -> "PackedStrings":
        lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(items), dtype=np.uint8).copy(), offsets)

    @classmethod
    def from_strings(cls, items: list[str]) -> "PackedStrings":
        return cls.from_bytes([os.fsencode(s) for s in items])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        n = len(self)
        i = int(i) + n if i < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        return os.fsdecode(self.data[self.offsets[i] : self.offsets[i + 1]].tobytes())

    def tolist(self) -> list[str]:
        raw = self.data.tobytes()
        o = self.offsets.tolist()
        return [os.fsdecode(raw[o[i] : o[i + 1]]) for i in range(len(self))]

    def take(self, rows: np.ndarray) -> "PackedStrings":
        """The strings at ``rows``, packed anew (vectorised: no Python loop over strings)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return PackedStrings(self.data[gather], offsets)


@dataclass(frozen=True)
class FolderIndex:
    """Every identity folder and image file under a root, as the dataset needs them.

    ``files`` are ``<folder>/<name>`` relative paths grouped by folder (folders sorted, names
    sorted within a folder); ``labels[i]`` is the position of file i's folder in ``folders``.
    Empty files are kept apart (``empty``, ``empty_labels``) to be reported, not trained on.
    """

    folders: PackedStrings
    files: PackedStrings
    labels: np.ndarray  # int32
    empty: PackedStrings
    empty_labels: np.ndarray  # int32

    def folder_ranges(self) -> np.ndarray:
        """(F + 1,) start of each folder's files in ``files`` (files are grouped by folder)."""
        return np.searchsorted(self.labels, np.arange(len(self.folders) + 1, dtype=np.int64)).astype(np.int64)


_SUFFIXES = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)


def is_image_name(name: str) -> bool:
    """``is_image_file`` on a bare name, without building a Path per file (494k of them)."""
    return name[:1] != "." and "." in name and name.rpartition(".")[2].lower() in _SUFFIXES


def list_folders(root: Path) -> list[os.DirEntry]:
    """The identity folders (visible sub-directories) of ``root``, sorted by name."""
    with os.scandir(root) as it:
        return sorted((e for e in it if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)


def _scan_folder(path: str) -> tuple[list[str], list[str]]:
    """(non-empty, empty) image file names of one folder, sorted.

    ``is_file()`` answers from the directory entry's type (no system call) except for
    symbolic links and file systems that leave the type unknown. The ``stat()`` (relative
    to the open folder: no path walk) is the size check behind the empty-file report; it
    runs once per file, when the cache is built.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with os.scandir(fd) as it:
            names = sorted(e.name for e in it if is_image_name(e.name) and e.is_file())
        empty = [n for n in names if os.stat(n, dir_fd=fd).st_size == 0]
    finally:
        os.close(fd)
    if empty:
        gone = set(empty)
        names = [n for n in names if n not in gone]
    return names, empty


def _relative(folder: str, names: list[str]) -> list[bytes]:
    """``folder/name`` as bytes for every name, encoded in one call per folder (NUL never occurs in names)."""
    if not names:
        return []
    prefix = os.fsencode(folder) + b"/"
    return [prefix + n for n in os.fsencode("\0".join(names)).split(b"\0")]


def scan_tree(root: str | os.PathLike, folders: list[os.DirEntry] | None = None, threads: int = SCAN_THREADS) -> FolderIndex:
    """Walk ``root`` once and build its index.

    Folders are listed by ``threads`` threads: the system calls release the GIL, which is
    what matters on network file systems, where each ``stat()`` is a round trip.
    """
    folders = list_folders(Path(root)) if folders is None else folders
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        listed = list(pool.map(_scan_folder, [e.path for e in folders], chunksize=64))
    files: list[bytes] = []
    empty: list[bytes] = []
    counts, empty_counts = [], []
    for entry, (good, bad) in zip(folders, listed):
        files.extend(_relative(entry.name, good))
        empty.extend(_relative(entry.name, bad))
        counts.append(len(good))
        empty_counts.append(len(bad))
    per_folder = np.arange(len(folders), dtype=np.int32)
    return FolderIndex(
        folders=PackedStrings.from_strings([e.name for e in folders]),
        files=PackedStrings.from_bytes(files),
        labels=np.repeat(per_folder, counts).astype(np.int32),
        empty=PackedStrings.from_bytes(empty),
        empty_labels=np.repeat(per_folder, empty_counts).astype(np.int32),
    )


def fingerprint(root: Path, folders: list[os.DirEntry]) -> tuple[str, int]:
    """A digest of the tree's shape (the root's real path, every folder's name and mtime), and
    the newest of those mtimes in nanoseconds."""
    h = hashlib.sha256(os.fsencode(os.path.realpath(root)))
    newest = 0
    for e in folders:
        mtime = e.stat().st_mtime_ns
        newest = max(newest, mtime)
        h.update(os.fsencode(e.name) + b"\0" + str(mtime).encode() + b"\n")
    return h.hexdigest(), newest


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facecli"


def cache_path(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:24]
    return cache_dir / "index" / f"{key}.npz"


_ARRAYS = ("folders", "files", "empty")


def save_index(path: Path, index: FolderIndex, digest: str) -> bool:
    """Write the cache atomically; False (and no file) when the cache folder is not writable."""
    arrays = {"format": np.array(CACHE_FORMAT), "fingerprint": np.frombuffer(digest.encode(), dtype=np.uint8)}
    for name in _ARRAYS:
        packed = getattr(index, name)
        arrays[f"{name}_data"], arrays[f"{name}_offsets"] = packed.data, packed.offsets
    arrays["labels"], arrays["empty_labels"] = index.labels, index.empty_labels
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def read_index(path: Path, digest: str) -> FolderIndex | None:
    """The cached index if it exists, is well-formed and matches ``digest``; else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT or z["fingerprint"].tobytes().decode() != digest:
                return None
            parts = {name: PackedStrings(z[f"{name}_data"], z[f"{name}_offsets"]) for name in _ARRAYS}
            index = FolderIndex(labels=z["labels"], empty_labels=z["empty_labels"], **parts)
    except (OSError, KeyError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError):
        return None
    return index if _well_formed(index) else None


def _well_formed(index: FolderIndex) -> bool:
    """Consistent shapes and plain relative paths: a damaged or doctored cache is rebuilt."""
    for packed in (index.folders, index.files, index.empty):
        o = packed.offsets
        if packed.data.dtype != np.uint8 or o.dtype != np.int64 or o.ndim != 1 or len(o) < 1:
            return False
        if o[0] != 0 or o[-1] != len(packed.data) or np.any(np.diff(o) < 0):
            return False
    if np.any(index.folders.data == ord("/")) or np.any(index.files.data == 0) or np.any(index.empty.data == 0):
        return False
    for labels, packed in ((index.labels, index.files), (index.empty_labels, index.empty)):
        if labels.dtype != np.int32 or len(labels) != len(packed):
            return False
        if len(labels) and (labels.min() < 0 or labels.max() >= len(index.folders) or np.any(np.diff(labels) < 0)):
            return False
    # each relative path is "<its folder>/<name>" with a name holding no separator
    slashes = np.flatnonzero(index.files.data == ord("/"))
    o = index.files.offsets
    if len(slashes) != len(index.files) or np.any(slashes < o[:-1]) or np.any(slashes >= o[1:] - 1):
        return False
    return all(index.files[i].split("/")[0] == index.folders[int(index.labels[i])] for i in _spot_checks(len(index.files)))


def _spot_checks(n: int) -> range:
    return range(0, n, max(1, n // 64))


def load_index(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None | bool = None,
    min_files: int | None = None,
    coordinate: bool = False,
) -> FolderIndex:
    """The index of ``root``: from the cache when the tree is unchanged, else walked (and cached).

    ``cache_dir``: None for :func:`default_cache_dir`, False for no cache. Trees with fewer
    than ``min_files`` files (default :data:`CACHE_MIN_FILES`) are not cached. ``coordinate``: in a ``torch.distributed`` run,
    local rank 0 builds first and the other ranks wait, then read its cache.
    """
    if coordinate:
        return _coordinated(lambda: load_index(root, cache_dir, min_files, coordinate=False))
    root = Path(root)
    folders = list_folders(root)
    if cache_dir is False:
        return scan_tree(root, folders)
    started = time.time_ns()
    digest, newest = fingerprint(root, folders)
    path = cache_path(root, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    index = read_index(path, digest)
    if index is None:
        index = scan_tree(root, folders)
        # A folder changed within the last seconds may change again within the file system's
        # timestamp granularity, unseen by its mtime: such a tree is not cached (yet).
        settled = started - newest > SETTLE_NS
        if settled and len(index.files) + len(index.empty) >= (CACHE_MIN_FILES if min_files is None else min_files):
            save_index(path, index, digest)
    return index


def _coordinated(build):
    """Run ``build`` on each machine's local rank 0 first, then on the others (cache hits)."""
    try:
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except ImportError:  # pragma: no cover - torch without distributed support
        active = False
    if not active:
        return build()
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    result, error = None, None
    if first:
        try:
            result = build()
        except BaseException as e:  # noqa: BLE001 - the others must not wait forever; re-raised below
            error = e
    dist.barrier()
    if error is not None:
        raise error
    return result if first else build()
