"""Identity-folder indexing at CASIA-WebFace size: time to index, and DataLoader workers' memory.

    python benchmarks/bench_index.py                  # 494,414 tiny files in 10,575 folders under /tmp
    python benchmarks/bench_index.py --quick          # 20,000 files in 500 folders
    python benchmarks/bench_index.py --keep           # leave the generated tree for a second run

Generates a tree shaped like CASIA-WebFace (folder sizes drawn to sum to the total; each
file a few hundred bytes, never decoded), then compares side by side in one run:

* ``before``: ``IdentityFolderDataset`` as of ``--before-rev`` (a ``stat()`` per file on
  every construction, the paths as a numpy object array of Python strings), loaded from git;
* ``after``: today's, walking the tree (cold: empty index cache) and from its cache (what a
  restart or a second rank does).

Times are medians over ``--rounds`` interleaved rounds, after one untimed walk that brings the
directory entries and inodes into the kernel's caches (so the disk is not what is measured).

Memory: in a fresh process per implementation, the dataset is built, then 8 DataLoader
workers (fork, persistent) each read every sample's path and label once, as workers do over
8 epochs (``ds.paths[i]``, ``ds.labels[i]``: what ``__getitem__`` does before decoding). Then
the proportional set size (PSS, ``/proc/PID/smaps_rollup``: shared pages divided among their
sharers) of the workers and of the main process is read. A third process does the same over
a dataset of the same length with no index at all: the floor any worker pays (Python, torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BEFORE_REV = "650b7b2"  # the branch point: the index as the first facecli built it
CASIA_FILES, CASIA_FOLDERS = 494_414, 10_575


# ----------------------------------------------------------------------------- the tree
def folder_sizes(files: int, folders: int, seed: int = 0) -> list[int]:
    """Images per identity, skewed like CASIA-WebFace (many small folders, a few large), summing to ``files``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=0.8, size=folders)
    sizes = np.maximum(2, np.floor(weights / weights.sum() * files)).astype(np.int64)
    deficit = files - int(sizes.sum())
    if deficit > 0:  # the rounding remainder, spread over random folders
        np.add.at(sizes, rng.integers(0, folders, deficit), 1)
    while sizes.sum() > files:  # the minimum of 2 overshot: trim the largest folders
        sizes[sizes.argmax()] -= 1
    return sizes.tolist()


def generate_tree(root: Path, files: int, folders: int) -> None:
    """``root/<7-digit id>/<3-digit>.jpg``, each file 200-600 bytes (not a real JPEG: never decoded)."""
    blob = os.urandom(600)
    for f, n in enumerate(folder_sizes(files, folders)):
        d = root / f"{f:07d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            fd = os.open(d / f"{k + 1:03d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, blob[: 200 + (f * 7 + k * 13) % 400])
            os.close(fd)
    time.sleep(2.5)  # let the folders' mtimes settle (facecli does not cache a tree changed in the last 2 s)


def ensure_tree(root: Path, files: int, folders: int) -> float:
    marker = root / f".complete-{files}-{folders}"
    if marker.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    generate_tree(root, files, folders)
    marker.write_text("ok")
    return time.perf_counter() - t0


def warm_walk(root: Path) -> int:
    """One untimed walk with a stat per file: dentries and inodes cached for every variant alike."""
    n = 0
    for d in os.scandir(root):
        if d.is_dir():
            for e in os.scandir(d.path):
                os.stat(e.path)
                n += 1
    return n


# ----------------------------------------------------------------------------- implementations
def old_dataset_class(rev: str):
    """``IdentityFolderDataset`` as it was at ``rev`` (from git), importable beside today's facecli."""
    src = subprocess.run(["git", "show", f"{rev}:facecli/data/folders.py"], cwd=C.REPO, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.gettempdir()) / f"facecli_folders_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"facecli_folders_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.IdentityFolderDataset


def build(kind: str, root: Path, cache: Path, rev: str):
    from facecli.data.folders import IdentityFolderDataset
    from facecli.data.images import Preprocess

    if kind == "before":
        return old_dataset_class(rev)(root, Preprocess(112))
    if kind == "after, cold":
        shutil.rmtree(cache, ignore_errors=True)
    return IdentityFolderDataset(root, Preprocess(112), index_cache=cache)


# ----------------------------------------------------------------------------- memory (child process)
def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


class TouchAll:
    """Each worker reads every sample's path and label once (an iterable dataset: one item per worker)."""

    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        n = 0
        floor = isinstance(self.ds, NoIndex)
        for i in range(len(self.ds)):
            j = 0 if floor else i
            n += len(self.ds.paths[j]) + int(self.ds.labels[j])
        yield os.getpid(), n


class NoIndex:
    """The floor: a dataset of the same length holding nothing."""

    def __init__(self, n: int):
        self.n = n
        self.paths = ["x"]
        self.labels = [0]

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        raise AttributeError(name)


def memory_child(kind: str, root: str, cache: str, rev: str, workers: int, n: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    torch.set_num_threads(1)
    ds = NoIndex(n) if kind == "no index (floor)" else build(kind, Path(root), Path(cache), rev)

    class Iterable(IterableDataset):
        def __iter__(self):
            return iter(TouchAll(ds))

    loader = DataLoader(Iterable(), batch_size=None, num_workers=workers, persistent_workers=True, multiprocessing_context="fork")
    pids = [pid for pid, _ in loader]
    assert len(set(pids)) == workers, pids
    worker_pss = [pss_kib(p) for p in pids]
    out = {"kind": kind, "samples": len(ds), "workers": workers, "worker_pss_kib": worker_pss, "main_pss_kib": pss_kib(os.getpid())}
    del loader
    return out


def measure_memory(kind: str, root: Path, cache: Path, rev: str, workers: int, n: int) -> dict:
    """Run :func:`memory_child` in a fresh interpreter (nothing else in its heap)."""
    code = (f"import sys, json; sys.path[:0] = [{str(C.REPO)!r}, {str(Path(__file__).parent)!r}]; import bench_index as B; "
            f"print(json.dumps(B.memory_child({kind!r}, {str(root)!r}, {str(cache)!r}, {rev!r}, {workers}, {n})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(C.REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {kind!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--files", type=int, default=None, help=f"files in the tree (default {CASIA_FILES:,})")
    p.add_argument("--folders", type=int, default=None, help=f"identity folders (default {CASIA_FOLDERS:,})")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for the memory measurement")
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "facecli-bench-index", help="where the tree is generated")
    p.add_argument("--before-rev", default=BEFORE_REV, help="git revision of the 'before' implementation")
    p.add_argument("--keep", action="store_true", help="keep the generated tree (deleted by default)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    files = args.files or (20_000 if args.quick else CASIA_FILES)
    folders = args.folders or (500 if args.quick else CASIA_FOLDERS)
    rounds = args.rounds or (2 if args.quick else 3)
    root, cache = args.root / "train", args.root / "index-cache"
    try:
        C.say(f"index benchmark: {files:,} files in {folders:,} folders under {root}; {rounds} rounds; before = {args.before_rev}")
        made = ensure_tree(root, files, folders)
        C.say(f"  tree {'generated in %.0f s' % made if made else 'already there'}; warm walk: {warm_walk(root):,} entries")
        kinds = ["before", "after, cold", "after, cached"]
        times = {k: [] for k in kinds}
        for r in range(rounds):  # "before" first, then last: the cached read always follows a cold build
            for kind in kinds if r % 2 == 0 else kinds[1:] + kinds[:1]:
                t0 = time.perf_counter()
                ds = build(kind, root, cache, args.before_rev)
                times[kind].append(time.perf_counter() - t0)
                assert len(ds) == files, (kind, len(ds))
                del ds
            C.say("  round %d: " % (r + 1) + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in kinds))
        memory = [measure_memory(k, root, cache, args.before_rev, args.workers, files) for k in ("before", "after, cached", "no index (floor)")]
        for m in memory:
            C.say(f"  memory {m['kind']}: workers {sum(m['worker_pss_kib']) / 1024:.0f} MiB, main {m['main_pss_kib'] / 1024:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    return report(args, files, folders, rounds, times, memory)


def report(args, files, folders, rounds, times, memory) -> int:
    base = C.median(times["before"])
    time_rows = [{"variant": k, "seconds": round(C.median(v), 3), "noise_pct": round(C.spread(v), 1), "speedup": f"{base / C.median(v):.1f}x"}
                 for k, v in times.items()]
    floor = sum(memory[-1]["worker_pss_kib"])
    mem_rows = [{"variant": m["kind"], "workers_pss_mib": round(sum(m["worker_pss_kib"]) / 1024, 1),
                 "per_worker_mib": round(sum(m["worker_pss_kib"]) / 1024 / m["workers"], 1),
                 "above_floor_mib": round((sum(m["worker_pss_kib"]) - floor) / 1024, 1),
                 "main_pss_mib": round(m["main_pss_kib"] / 1024, 1)} for m in memory]
    C.say("\n" + C.table(time_rows, [("variant", "variant"), ("seconds", "seconds"), ("noise_pct", "+-%"), ("speedup", "before / this")],
                         title=f"Indexing {files:,} files in {folders:,} folders (warm inode cache)"))
    C.say("\n" + C.table(mem_rows, [("variant", "variant"), ("workers_pss_mib", f"PSS of {args.workers} workers, MiB"),
                                     ("per_worker_mib", "per worker"), ("above_floor_mib", "above the floor"), ("main_pss_mib", "main process")],
                         title=f"Memory after each of {args.workers} workers read every path and label once"))
    out = C.write_results("index", {
        "benchmark": "index",
        "config": {"files": files, "folders": folders, "rounds": rounds, "workers": args.workers, "before_rev": args.before_rev},
        "environment": C.environment(),
        "times_s": times, "time_rows": time_rows, "memory": memory, "memory_rows": mem_rows,
    }, args.json)
    C.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
