"""Partial FC (``--sample-rate``): time and peak memory of one head step against the full head.

    python benchmarks/bench_partial_fc.py            # B=128, D=512, C=100,000 and 1,000,000, R=1.0/0.3/0.1
    python benchmarks/bench_partial_fc.py --quick    # tiny, checks the script runs

A head step is what the trainer runs for the classification head: ArcFace forward
(normalise, cosines, margin logits, cross-entropy) and backward, then the SGD update
(momentum 0.9, weight decay 5e-4, fused) of its weights, through ``optimizer_rows``: at
R < 1 only the sampled rows and their momentum. All rates share one weight matrix and one
optimizer (so the machine holds one copy) and are timed side by side, interleaved round by
round (benchmarks/_common.py); ratios are to R = 1.0 of the same round.

Peak memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one step, minus the resident set before it, plus the head's persistent state (weights
and momentum, the same for every rate: unsampled rows keep theirs). glibc is told to serve
every allocation above 64 KiB by mmap, so a freed tensor leaves the resident set at once and
the next variant's baseline is not inflated. CPU, one process, one thread unless --threads.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

RATES = (1.0, 0.3, 0.1)


def _malloc_returns_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are always mmapped
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give freed heap tops back
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(num_classes: int, dim: int, batch: int, seed: int = 0):
    """The shared head and optimizer, and a step function per rate."""
    import torch

    from facecli.engine.optim import build_optimizer
    from facecli.engine.partial_fc import SampledMarginHead
    from facecli.losses import build_head

    torch.manual_seed(seed)
    head = build_head("arcface", dim, num_classes).train()
    optimizer = build_optimizer("sgd", head.parameters(), 0.1, 5e-4, 0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g).requires_grad_(True)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    heads = {rate: head if rate >= 1 else SampledMarginHead(head, rate, seed).train() for rate in RATES}
    counter = {"step": 0}

    def step_of(rate):
        def step():
            h = heads[rate]
            h.start_step(counter["step"])
            counter["step"] += 1
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
            h.loss(x, y).backward()
            with h.optimizer_rows(optimizer):
                optimizer.step()

        return step

    persistent = 2 * num_classes * dim * 4  # float32 weights + momentum
    return {rate: step_of(rate) for rate in RATES}, persistent


def peak_bytes(step) -> int | None:
    gc.collect()
    before = _rss_kib("VmRSS")
    if not _reset_peak():
        return None
    step()
    return max(0, _rss_kib("VmHWM") - before) * 1024


def measure(num_classes: int, dim: int, batch: int, rounds: int) -> dict:
    steps, persistent = build(num_classes, dim, batch)
    names = {f"R={r:g}": s for r, s in steps.items()}
    transient = {}
    for name, step in names.items():
        step()  # warm-up (allocator, first-touch of the shared state)
        transient[name] = peak_bytes(step)
    times = C.interleaved(names, rounds=rounds, iters=1, warmup=0, log=C.say)
    rows = []
    base = "R=1"
    for name in names:
        t = transient[name]
        rows.append({
            "classes": num_classes, "rate": name, "step_ms": round(1e3 * C.median(times[name]), 1),
            "time_ratio": round(C.ratio_to(times, base, name), 3), "spread_pct": round(C.spread(times[name]), 1),
            "transient_mib": None if t is None else round(t / 2**20), "peak_mib": None if t is None else round((t + persistent) / 2**20),
            "peak_ratio": None if t is None or transient[base] is None else round((t + persistent) / (transient[base] + persistent), 3),
        })  # fmt: skip
    return {"rows": rows, "times": times, "persistent_bytes": persistent}


def main(argv=None) -> None:
    parser = C.common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    _malloc_returns_memory()
    C.set_threads(args.threads)
    classes = [2_000, 20_000] if args.quick else args.classes
    rounds = args.rounds or (2 if args.quick else 3)
    results = {"environment": C.environment(), "batch": args.batch, "dim": args.dim, "by_classes": {}}
    rows = []
    for n in classes:
        C.say(f"C = {n:,}: building the head ({2 * n * args.dim * 4 / 2**20:,.0f} MiB of weights + momentum)")
        out = measure(n, args.dim, args.batch, rounds)
        results["by_classes"][n] = out
        rows += out["rows"]
    columns = [
        ("classes", "C"), ("rate", "rate"), ("step_ms", "step ms"), ("time_ratio", "time / R=1"), ("spread_pct", "spread %"),
        ("transient_mib", "step MiB"), ("peak_mib", "peak MiB (incl. W + momentum)"), ("peak_ratio", "peak / R=1"),
    ]  # fmt: skip
    C.say(C.table(rows, columns, title=f"Head step (ArcFace fwd + bwd + SGD), B={args.batch}, D={args.dim}, CPU, {C.environment()['torch_threads']} thread(s)"))
    C.say(f"results: {C.write_results('partial_fc' + ('_quick' if args.quick else ''), results, args.json)}")


if __name__ == "__main__":
    main()
