"""Shared plumbing for the benchmark scripts: threads, interleaved timing, tables, JSON.

Every benchmark compares variants *side by side in one run*: each round times every
variant once, in turn, so a burst of load on a shared machine slows all of them in
that round rather than one of them. Figures that matter are ratios: for each round the
ratio to the baseline of that round, then the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# Measure the facecli of this checkout, also where another one is installed in the
# environment (an editable install of a sibling worktree) or none is (a bare GPU machine).
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))


def set_threads(threads: int | None) -> int:
    """Intra-op threads for this process (default: OMP_NUM_THREADS or 1). Call before heavy work."""
    import torch

    n = threads if threads else int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default OMP_NUM_THREADS or 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (each times every variant once)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/NAME.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts: checks that the script runs, figures meaningless")
    return parser


def resolve_device(name: str):
    """facecli's own resolution: ``cuda`` becomes ``cuda:N`` (made current), as the commands see it."""
    from facecli.engine.device import resolve_device as facecli_resolve

    return facecli_resolve(name)


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    iters: int,
    warmup: int = 1,
    device=None,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one figure per round; variants alternate within a round.

    ``warmup`` untimed calls of each variant come first (allocations, kernels, caches).
    """
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # no fixed "always first"
        for name in order:
            fn = variants[name]
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / iters)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.1f} ms" for n in variants))
    return times


def ratio_to(times: dict[str, list[float]], baseline: str, name: str) -> float:
    """Median over rounds of time(name) / time(baseline): > 1 means slower than the baseline."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> float:
    """Half the interquartile range relative to the median (a noise gauge, in %)."""
    v = sorted(values)
    if len(v) < 4:
        return 100.0 * (v[-1] - v[0]) / (2 * statistics.median(v)) if len(v) > 1 else 0.0
    q = statistics.quantiles(v, n=4)
    return 100.0 * (q[2] - q[0]) / (2 * statistics.median(v))


def table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> str:
    """A fixed-width text table; ``columns`` are (key, header). Floats keep their formatting by the caller."""
    head = [h for _, h in columns]
    body = [[("" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    return "\n".join(lines)


def environment(device=None) -> dict:
    import torch

    info = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if device is not None and getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(name: str, data: dict, path: Path | None = None) -> Path:
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def say(message: str) -> None:
    print(message, flush=True)
