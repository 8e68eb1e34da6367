"""How many DataLoader worker processes to start: ``--workers auto`` or a number.

``auto`` gives each training process (rank) an equal share of the CPUs this process may
run on, less one core for the rank itself (its Python loop, CUDA launches and the
pin-memory thread), and at most :data:`AUTO_WORKERS_CAP`. The CPUs are the affinity mask
(``taskset``, Slurm, Kubernetes CPU sets), lowered to the cgroup CPU quota when there is one
(``docker run --cpus``): ``os.cpu_count()`` counts the whole machine and oversubscribes it.

Why a cap of 16 per rank: one worker decodes about 2,000 of CASIA-WebFace's 250x250 JPEGs
per second (``benchmarks/bench_data.py``), so 16 deliver about 30,000 images/s, more than one
GPU trains a ResNet-50 at 112x112; each further worker only adds its memory (a Python and
torch heap of a few hundred MB, plus its prefetched batches in shared memory), its start-up
time and contention. On a machine with 64 cores and one GPU, ``auto`` therefore starts 16,
not 63; pass a number to go beyond.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTO_WORKERS_CAP = 16
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """The cgroup v2 CPU quota in whole CPUs (at least 1), or None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, or the cgroup quota if that is lower."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def local_world_size() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_workers(spec: int | str, local_processes: int | None = None) -> int:
    """DataLoader workers for one rank: an integer as given, ``"auto"`` as the module says.

    ``local_processes``: ranks sharing this machine's CPUs (default: LOCAL_WORLD_SIZE).
    Raises ValueError for anything else (a negative number, another word).
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        per_rank = usable_cpus() // (local_processes or local_world_size())
        return min(AUTO_WORKERS_CAP, per_rank - 1) if per_rank > 1 else 0
    workers = int(spec)
    if workers < 0 or (isinstance(spec, float) and spec != workers):
        raise ValueError(f"workers must be a non-negative integer or 'auto', got {spec!r}")
    return workers
