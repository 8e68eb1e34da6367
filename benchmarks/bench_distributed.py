"""Distributed: images/s of 1 process against 2 (DistributedDataParallel, gloo on the CPU, NCCL on GPUs).

    python benchmarks/bench_distributed.py                 # resnet18, 64 px, batch 32 per process
    python benchmarks/bench_distributed.py --quick

Each configuration starts its processes afresh (``torch.multiprocessing.spawn``, one intra-op
thread each on the CPU, one GPU each on CUDA), builds the trainer's model (EmbeddingNet +
ArcFace head in ``NetWithLoss``), wraps it in DDP exactly as ``setup.wrap_for_ddp``
does when there is more than one process, and times steady-state steps of the trainer's
step (bench_train_step.Step) plus the trainer's per-step stop-flag all-reduce. A world of one
runs without DDP, as ``facecli train`` does. Configurations alternate round by round.
Scaling efficiency = images/s(2) / (2 x images/s(1)); 1.0 is perfect.

On a machine with fewer free cores than processes the figure measures the contention, not
DDP: read it together with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, cfg: dict, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    import torch.distributed as dist

    from bench_train_step import Step
    from facecli.engine import distributed as dist_utils

    torch.set_num_threads(1)
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    world = dist_utils.init(device) if world_size > 1 else dist_utils.World()
    amp = torch.bfloat16 if device.type == "cuda" else None
    step = Step(cfg["backbone"], cfg["classes"], cfg["batch"], cfg["image_size"], device, amp=amp,
                channels_last=device.type == "cuda", seed=rank)
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = step.model
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            step.model = model
        step.forward_module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def one():
        step()
        dist_utils.agree(world, 1, False)

    for _ in range(cfg["warmup"]):
        one()
    dist_utils.barrier(world)
    C.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        one()
    C.synchronize(device)
    dist_utils.barrier(world)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(out_file).write_text(repr(elapsed))
    if world.distributed:
        dist.destroy_process_group()


def run_world(world_size: int, cfg: dict) -> float:
    """Seconds per step (global) for a world of ``world_size`` processes."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "elapsed")
        mp.spawn(_worker, args=(world_size, cfg, _free_port(), out), nprocs=world_size, join=True)
        return float(Path(out).read_text()) / cfg["steps"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration per round (default 8)")
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 8)
    image_size = 32 if args.quick and args.image_size == 64 else args.image_size
    batch = 8 if args.quick and args.batch == 32 else args.batch
    C.set_threads(1)

    import torch

    device = C.resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < args.processes:
        C.say(f"only {torch.cuda.device_count()} GPU(s): measuring on the CPU with gloo instead")
        device = torch.device("cpu")
    cfg = {"backbone": args.backbone, "classes": args.classes, "batch": batch, "image_size": image_size,
           "device": device.type, "steps": steps, "warmup": 1 if args.quick else 2}
    C.say(f"distributed: 1 vs {args.processes} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), {args.backbone} "
          f"{image_size}px, batch {batch} per process, {args.classes} classes; {rounds} round(s) x {steps} steps")
    times = {1: [], args.processes: []}
    for r in range(rounds):
        for n in ((1, args.processes) if r % 2 == 0 else (args.processes, 1)):
            s = run_world(n, cfg)
            times[n].append(s)
            C.say(f"  round {r + 1}/{rounds}: {n} process(es): {n * batch / s:.1f} images/s")
    rows = []
    ips1 = batch / C.median(times[1])
    for n in times:
        ips = n * batch / C.median(times[n])
        rows.append({"processes": n, "images_per_s": round(ips, 1), "speedup": round(ips / ips1, 3),
                     "efficiency": round(ips / (n * ips1), 3)})
    C.say("\n" + C.table(
        [{**r, "speedup": f"{r['speedup']:.2f}x", "efficiency": f"{100 * r['efficiency']:.0f}%"} for r in rows],
        [("processes", "processes"), ("images_per_s", "images/s (all)"), ("speedup", "vs 1 process"), ("efficiency", "scaling efficiency")],
        title=f"DDP scaling, {args.backbone} {image_size}px, batch {batch}/process, {device.type}, {os.cpu_count()} CPUs",
    ))
    out = C.write_results("distributed", {
        "benchmark": "distributed",
        "config": {**cfg, "processes": args.processes, "rounds": rounds, "quick": args.quick},
        "environment": C.environment(),
        "rows": rows,
        "seconds_per_step": {str(k): v for k, v in times.items()},
    }, args.json)
    C.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
