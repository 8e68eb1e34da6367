"""Train step: images/s of the full step (backbone + margin head + optimizer) per configuration.

    python benchmarks/bench_train_step.py                         # resnet50 + resnet18, 112x112
    python benchmarks/bench_train_step.py --compile               # add torch.compile variants (default on CUDA)
    python benchmarks/bench_train_step.py --backbones resnet18 --batch 32 --quick

Every variant runs the trainer's own step (``facecli.engine.step.StepRunner``, cudnn.benchmark
on as the trainer sets it) on a fixed synthetic uint8 batch already on the device (data loading
is bench_data.py's business): normalise, seeded flip, optional channels_last, autocast, ArcFace
head over ``--classes`` classes, cross-entropy, backward (GradScaler for fp16), the non-finite
check decided on the device, fused SGD with momentum. Nothing is read back per step.

Variants: precision (fp32; bf16 and fp16 autocast on CUDA) x memory format (NCHW,
channels_last) x (eager, ``torch.compile`` when asked), plus ``naive``: what a first version
does (fp32 NCHW, float images normalised on the host side of the step, the naive ArcFace
head of bench_heads.py, plain SGD). All variants of a backbone alternate round by round;
ratios are to ``naive``. Cold ``torch.compile`` time is reported separately.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


class Step:
    """One configured training step: facecli's own StepRunner on a batch already on the device
    (``naive``: a first version's step, for comparison). ``__call__`` runs it once and returns
    the loss as a device tensor: reading it every step would add a host sync the trainer has not."""

    def __init__(self, backbone, classes, batch, image_size, device, amp=None, channels_last=False, compile=False, naive=False,
                 head="arcface", seed=0):
        import torch

        from facecli.backbones import EmbeddingNet
        from facecli.data.images import Preprocess
        from facecli.engine.device import configure_backends
        from facecli.engine.optim import build_optimizer
        from facecli.engine.setup import NetWithLoss
        from facecli.losses import build_head

        configure_backends(device)  # cudnn.benchmark, as the trainer sets it

        torch.manual_seed(seed)
        self.device, self.amp, self.channels_last, self.naive = device, amp, channels_last, naive
        self.batch, self.image_size = batch, image_size
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g).to(device)
        self.labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.pre = Preprocess(image_size)
        net = EmbeddingNet(backbone, 512, image_size=image_size)
        if naive:
            from bench_heads import naive_arcface

            self.weight = torch.nn.Parameter(torch.empty(classes, 512, device=device).normal_(0.0, 0.01))
            self.model = torch.nn.ModuleDict({"net": net}).to(device)
            self.params = list(self.model.parameters()) + [self.weight]
            self.optimizer = torch.optim.SGD(self.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
            self._naive_head = naive_arcface
            # a first version normalises float images outside the step (ToTensor + Normalize in the loader)
            self.float_images = ((self.images.float() / 255.0) - 0.5) / 0.5
        else:
            self.model = NetWithLoss(net, build_head(head, 512, classes)).to(device)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.optimizer = build_optimizer("sgd", self.model.parameters(), 0.1, 5e-4, 0.9)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        self.forward_module = self.model
        self.compile_seconds = None
        if compile and not naive:
            self.forward_module = torch.compile(self.model)
        self.step_index = 0
        self._compile_pending = compile and not naive
        self.runner = None if naive else self._runner(classes)

    def _runner(self, classes):
        """The trainer's StepRunner around this model: input, forward, backward, guarded update."""
        from types import SimpleNamespace

        from facecli.engine.distributed import World
        from facecli.engine.step import StepRunner
        from facecli.engine.optim import Schedule
        from facecli.engine.setup import RunParts

        parts = RunParts(self.pre, None, [], self.model.net, self.model.head, self.model, None, self.optimizer,
                         Schedule("constant", 0.1, 10**9, 1000), self.scaler, 0, bool(self.channels_last))
        cfg = SimpleNamespace(channels_last=self.channels_last, clip_grad_norm=0.0, seed=0, batch_size=self.batch)
        return StepRunner(parts, self.forward_module, cfg, World(), self.device, self.amp)

    def inputs(self):
        """The step's network input as the trainer builds it (normalised, flipped, laid out)."""
        if self.naive:
            return self.float_images
        return self.runner._inputs(self.images, self.step_index)

    def loss(self, x):
        import torch
        import torch.nn.functional as F

        if self.naive:
            logits = self._naive_head(self.model["net"](x), self.weight, self.labels)
            return F.cross_entropy(logits, self.labels)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.forward_module(x, self.labels)

    def __call__(self):
        if self._compile_pending:
            self._compile_pending = False
            t0 = time.perf_counter()
            self._step()
            C.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - t0
            return float("nan")
        return self._step()

    def _step(self):
        if not self.naive:
            self.runner.forward_module = self.forward_module  # bench_distributed wraps it in DDP afterwards
            loss, _ = self.runner(self.images, self.labels, self.step_index, (self.batch,))
            self.step_index += 1
            return loss
        x = self.inputs()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x)
        value = float(loss.detach())  # a first version's per-step non-finite check (a host sync)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_index += 1
        return value


def step_flops(step: Step) -> int:
    """FLOPs of one forward + backward (matrix products and convolutions, as counted by
    torch.utils.flop_counter.FlopCounterMode; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = step.inputs()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step.loss(x)
        loss.backward()
    step.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def variant_specs(device, compile_: bool):
    import torch

    precisions = [("fp32", None)]
    if device.type == "cuda":
        precisions.append(("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16))
        if torch.cuda.is_bf16_supported():
            precisions.append(("fp16", torch.float16))
    specs = [("naive (fp32, NCHW, naive head)", dict(naive=True))]
    for pname, dtype in precisions:
        for cl in (False, True):
            for comp in ((False, True) if compile_ else (False,)):
                name = f"facecli {pname}{' channels_last' if cl else ''}{' compile' if comp else ''}"
                specs.append((name, dict(amp=dtype, channels_last=cl, compile=comp)))
    return specs


def facecli_default_name(device) -> str:
    """The configuration ``facecli train`` uses on this device without flags."""
    import torch

    if device.type == "cuda":
        return f"facecli {'bf16' if torch.cuda.is_bf16_supported() else 'fp16'} channels_last"
    return "facecli fp32"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--backbones", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32 on CPU, 256 on CUDA)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--classes", type=int, default=10_575)
    p.add_argument("--iters", type=int, default=None, help="steps per variant per round")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="add torch.compile variants (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args(argv)
    threads = C.set_threads(args.threads)

    import torch

    device = C.resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (8 if args.quick else (256 if cuda else 32))
    image_size = 32 if args.quick and args.image_size == 112 else args.image_size
    classes = 500 if args.quick and args.classes == 10_575 else args.classes
    rounds = args.rounds or (2 if args.quick else (5 if cuda else 3))
    iters = args.iters or (1 if args.quick else (20 if cuda else 2))
    compile_ = cuda if args.compile is None else args.compile
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if args.quick and args.backbones == "resnet50,resnet18":
        backbones = ["resnet18"]
    C.say(f"train step: {backbones} at {image_size}x{image_size}, batch {batch}, {classes} classes, {device}, {threads} thread(s); "
          f"{rounds} rounds x {iters} steps; compile {'on' if compile_ else 'off'}")

    rows, all_times, compile_s = [], {}, {}
    for backbone in backbones:
        steps = {}
        for name, kw in variant_specs(device, compile_):
            steps[name] = Step(backbone, classes, batch, image_size, device, **kw)
            if kw.get("compile"):
                steps[name]()  # cold compile, timed apart
                compile_s[f"{backbone} {name}"] = round(steps[name].compile_seconds, 1)
                C.say(f"  {backbone} {name}: cold compile + first step {steps[name].compile_seconds:.0f} s")
        times = C.interleaved({n: s for n, s in steps.items()}, rounds, iters, warmup=2, device=device,
                              log=lambda m, b=backbone: C.say(f"{b}{m}"))
        all_times[backbone] = times
        base = "naive (fp32, NCHW, naive head)"
        default = facecli_default_name(device)
        for name in steps:
            rows.append({
                "backbone": backbone,
                "variant": name,
                "facecli_default": name == default,
                "images_per_s": round(batch / C.median(times[name]), 1),
                "noise_pct": round(C.spread(times[name]), 1),
                "speedup_vs_naive": round(C.ratio_to(times, name, base), 3),
            })
        del steps
        if cuda:
            torch.cuda.empty_cache()

    C.say("\n" + C.table(
        [{**r, "speedup_vs_naive": f"{r['speedup_vs_naive']:.2f}x",
          "variant": r["variant"] + ("  <- facecli default" if r["facecli_default"] else "")} for r in rows],
        [("backbone", "backbone"), ("variant", "variant"), ("images_per_s", "images/s"), ("noise_pct", "+-%"),
         ("speedup_vs_naive", "vs naive")],
        title=f"Full train step at {image_size}x{image_size}, batch {batch}, ArcFace over {classes} classes, {device}",
    ))
    for k, v in compile_s.items():
        C.say(f"cold torch.compile + first step, {k}: {v} s")
    out = C.write_results("train_step", {
        "benchmark": "train_step",
        "config": {"backbones": backbones, "batch": batch, "image_size": image_size, "classes": classes, "rounds": rounds,
                   "iters": iters, "compile": compile_, "device": str(device), "threads": threads, "quick": args.quick},
        "environment": C.environment(device),
        "rows": rows,
        "compile_seconds": compile_s,
        "times_s": all_times,
    }, args.json)
    C.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
