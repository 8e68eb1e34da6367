"""One-GPU check: facecli's training step against the naive reference on the same card.

    benchmarks/gpu_check.sh                   # resnet50, 112x112, batch 256, bf16: under 5 minutes
    benchmarks/gpu_check.sh --compile         # also torch.compile (adds a cold compile, 1-3 minutes)
    benchmarks/gpu_check.sh --peak-tflops 989 # the card's dense bf16 peak, if it is not in the table below
    benchmarks/gpu_check.sh --device cpu --quick   # smoke test of the script itself, no GPU needed

Trains a few hundred steps of resnet50 at 112x112 (ArcFace over CASIA-WebFace's 10,575
classes, SGD) on a synthetic batch already on the GPU, with facecli's defaults on CUDA: bf16
autocast (fp16 where the card has no bf16) and channels_last. It prints images/s and the
fraction of the card's bf16 matrix peak the step reaches: FLOPs of one forward + backward
counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
elementwise work is not counted, as usual for model FLOPs utilisation), times steps per
second, divided by (a) the card's datasheet dense bf16 peak (table below or
``--peak-tflops``) and (b) the bf16 matmul rate this card actually reaches on a large square
product, measured here. Then the naive reference pipeline (fp32, NCHW, naive head, plain SGD)
runs on the same card for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOPS, matched
# in order against torch.cuda.get_device_name(). Anything else: pass --peak-tflops.
BF16_PEAK_TFLOPS = [
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bGH200\b", 989.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bH200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10G\b", None),  # not published by NVIDIA
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.0),  # with fp32 accumulation, as torch uses
]


def datasheet_peak(name: str) -> float | None:
    import re

    for pattern, value in BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return value
    return None


def matmul_tflops(device, dtype, n: int, seconds: float = 3.0) -> float:
    """The rate of a large square matrix product on this device (what the card can really do)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    C.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):
            a @ b
        reps += 10
        C.synchronize(device)
        if time.perf_counter() - t0 > seconds:
            break
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def timed_steps(step, steps: int, warmup: int, budget_s: float, device) -> tuple[float, int]:
    """Seconds per step over up to ``steps`` steps (fewer if ``budget_s`` runs out)."""
    for _ in range(warmup):
        step()
    C.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while n < steps:
        step()
        n += 1
        if n % 10 == 0 and time.perf_counter() - t0 > budget_s:
            break
    C.synchronize(device)
    return (time.perf_counter() - t0) / n, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--classes", type=int, default=10_575)
    p.add_argument("--steps", type=int, default=300, help="timed facecli steps")
    p.add_argument("--naive-steps", type=int, default=60, help="timed naive steps")
    p.add_argument("--budget-s", type=float, default=75.0, help="stop a timed loop early after this many seconds")
    p.add_argument("--compile", action="store_true", help="also time facecli with torch.compile (--compile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (overrides the table)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)

    import torch

    from bench_train_step import Step, step_flops

    device = C.resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and not args.quick:
        C.say("No CUDA device: this check is for a GPU. Use --device cpu --quick to test the script itself.")
        return 2
    if args.quick:
        args.batch, args.image_size, args.classes = min(args.batch, 8), min(args.image_size, 32), min(args.classes, 500)
        args.steps, args.naive_steps, args.backbone = min(args.steps, 3), min(args.naive_steps, 2), "resnet18"
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]
    peak = args.peak_tflops or (datasheet_peak(name) if cuda else None)
    C.say(f"GPU check on {name}: {args.backbone} {args.image_size}x{args.image_size}, batch {args.batch}, ArcFace over "
          f"{args.classes} classes, facecli {amp_name}{' + channels_last' if cuda else ''} vs naive fp32")
    if cuda:
        torch.backends.cudnn.benchmark = False  # facecli's trainer leaves cuDNN's default; so does this check

    C.say("measuring the card's bf16 matmul rate...")
    mm = matmul_tflops(device, amp or torch.float32, 8192 if cuda else 256, seconds=3.0 if cuda else 0.5)
    C.say(f"  large {amp_name} matmul: {mm:.3g} TFLOPS"
          + (f" (datasheet peak {peak:.0f})" if peak else " (datasheet peak unknown: pass --peak-tflops)"))

    variants = [("facecli", dict(amp=amp, channels_last=cuda, compile=False))]
    if args.compile:
        variants.append(("facecli --compile", dict(amp=amp, channels_last=cuda, compile=True)))
    variants.append(("naive reference (fp32, NCHW)", dict(naive=True)))

    rows, flops = [], None
    for label, kw in variants:
        step = Step(args.backbone, args.classes, args.batch, args.image_size, device, **kw)
        if flops is None and not kw.get("naive"):
            flops = step_flops(step)  # eager count, the same model for every variant
            C.say(f"  one step = {flops / 1e12:.3f} TFLOP (forward + backward, FlopCounterMode)")
        if kw.get("compile"):
            step()
            C.say(f"  {label}: cold compile + first step {step.compile_seconds:.0f} s")
        n_steps = args.naive_steps if kw.get("naive") else args.steps
        per_step, done = timed_steps(step, n_steps, warmup=5 if cuda else 1, budget_s=args.budget_s, device=device)
        achieved = flops / per_step / 1e12
        rows.append({
            "pipeline": label,
            "steps": done,
            "images_per_s": round(args.batch / per_step, 1),
            "step_ms": round(1e3 * per_step, 2),
            "achieved_tflops": round(achieved, 2),
            "pct_of_datasheet_bf16_peak": round(100 * achieved / peak, 1) if peak else None,
            "pct_of_measured_matmul": round(100 * achieved / mm, 1),
        })
        C.say(f"  {label}: {rows[-1]['images_per_s']} images/s over {done} steps")
        del step
        if kw.get("compile"):
            torch._dynamo.reset()  # drop the compiled graphs (and the model they hold)
        if cuda:
            torch.cuda.empty_cache()
    base = rows[-1]["images_per_s"]
    for r in rows:
        r["speedup_vs_naive"] = round(r["images_per_s"] / base, 2)
    C.say("\n" + C.table(
        [{**r, "speedup_vs_naive": f"{r['speedup_vs_naive']:.2f}x",
          "pct_of_datasheet_bf16_peak": "n/a" if r["pct_of_datasheet_bf16_peak"] is None else f"{r['pct_of_datasheet_bf16_peak']}%",
          "pct_of_measured_matmul": f"{r['pct_of_measured_matmul']}%"} for r in rows],
        [("pipeline", "pipeline"), ("images_per_s", "images/s"), ("step_ms", "ms/step"), ("achieved_tflops", "TFLOPS"),
         ("pct_of_datasheet_bf16_peak", "of bf16 peak"), ("pct_of_measured_matmul", "of measured matmul"),
         ("speedup_vs_naive", "vs naive")],
        title=f"{args.backbone} {args.image_size}x{args.image_size} train step, batch {args.batch}, {name}",
    ))
    C.say("(the naive row's TFLOPS use the same FLOP count, i.e. its fraction of the bf16 peak it does not use)")
    out = C.write_results("gpu_check", {
        "benchmark": "gpu_check",
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"device": str(device), "amp": amp_name},
        "environment": C.environment(device),
        "device_name": name,
        "step_tflop": flops / 1e12,
        "datasheet_bf16_peak_tflops": peak,
        "measured_matmul_tflops": round(mm, 1),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }, args.json)
    C.say(f"wrote {out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
