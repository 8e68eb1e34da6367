"""Train step before and after the sync-free loop: images/s and host reads per step, side by side.

    python benchmarks/bench_step_syncs.py                  # resnet18, 112x112, batch 32, CPU
    python benchmarks/bench_step_syncs.py --device cuda --backbone resnet50 --batch 256

``before`` is facecli's step as it was (commit 81c2e8b, ``Trainer._train_step`` and the loop
around it): normalisation constants built on the device every step, flip coins drawn on the
host and copied with a blocking ``.to()``, the loss read with ``float()`` before
``backward()`` for the non-finite check, foreach SGD. ``after`` is today's
``facecli.engine.step.StepRunner`` with its ``DeviceStats``, read once per 10 steps. Both
train the same network on the same batch; rounds alternate. Host reads are counted with
torch.profiler (``aten::_local_scalar_dense``, ``aten::item``, ``aten::is_nonzero``, and the
loop's named read). On a CPU the reads cost little (nothing runs ahead to wait for); the
ratio that matters is measured on a GPU, where each read drains the device's queue.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def parts_for(backbone: str, classes: int, image_size: int, device, seed: int = 0) -> SimpleNamespace:
    """What the trainer's setup builds, for a synthetic run (no data set needed)."""
    import torch

    from facecli.backbones import EmbeddingNet
    from facecli.data.images import Preprocess
    from facecli.engine.optim import Schedule, build_optimizer
    from facecli.engine.setup import NetWithLoss
    from facecli.losses import build_loss

    torch.manual_seed(seed)
    net = EmbeddingNet(backbone, 512, image_size=image_size)
    model = NetWithLoss(net, build_loss("arcface", 512, classes)).to(device)
    return SimpleNamespace(
        model=model, net=net, head=model.head, preprocess=Preprocess(image_size), schedule=Schedule("constant", 0.1, 10**6, 1000),
        scaler=torch.amp.GradScaler("cuda", enabled=False), margin_warmup_steps=0, channels_last=torch.device(device).type == "cuda",
        optimizer=build_optimizer("sgd", model.parameters(), 0.1, 5e-4, 0.9),
    )


class Before:
    """The step as facecli ran it before the sync-free loop."""

    def __init__(self, parts, device):
        import torch

        self.p, self.device = parts, device
        params = list(parts.model.parameters())
        decay = [q for q in params if q.ndim > 1]
        rest = [q for q in params if q.ndim <= 1]
        self.optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}], lr=0.1, momentum=0.9)

    def __call__(self, images, labels, step: int) -> None:
        import numpy as np
        import torch

        pre = self.p.preprocess
        x = images.to(self.device, non_blocking=True)
        mean = torch.tensor(pre.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x.float().div_(255.0) - mean) / std
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([0, step, 2]).generate_state(1)[0]))
        coins = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(coins.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.p.model(x, labels.to(self.device, non_blocking=True))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError("non-finite loss")
        loss.backward()
        self.optimizer.step()


class After:
    """Today's step: StepRunner plus the device-side statistics, read every 10 steps."""

    def __init__(self, parts, device):
        from facecli.engine.distributed import World
        from facecli.engine.step import DeviceStats, StepRunner

        cfg = SimpleNamespace(seed=0, batch_size=0)
        self.runner = StepRunner(parts, parts.model, cfg, World(), device, None)
        self.stats = DeviceStats(device)

    def __call__(self, images, labels, step: int) -> None:
        self.runner.cfg.batch_size = images.shape[0]
        loss, bad = self.runner(images, labels, step, (images.shape[0],))
        self.stats.add(loss, bad, step, images.shape[0])
        if (step + 1) % 10 == 0:
            self.stats.start_read(step + 1)


def host_reads_per_step(step_fn, images, labels, steps: int) -> float:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for k in range(steps):
            step_fn(images, labels, k)
    names = [e.name for e in prof.events()]
    reads = sum(names.count(op) for op in SYNC_OPS)
    return reads / steps


def main(argv=None) -> dict:
    p = C.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch, args.steps, args.rounds = 32, 8, 10, 2
    threads = C.set_threads(args.threads)
    device = C.resolve_device(args.device)
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    steps = {"before": Before(parts_for(args.backbone, args.classes, args.image_size, device), device),
             "after": After(parts_for(args.backbone, args.classes, args.image_size, device), device)}
    reads = {name: host_reads_per_step(fn, images, labels, 10) for name, fn in steps.items()}

    def run(name):
        def body():
            for k in range(args.steps):
                steps[name](images, labels, k)
            C.synchronize(device)
        return body

    times = C.interleaved({name: run(name) for name in steps}, rounds=args.rounds or 5, iters=1, warmup=1, device=device, log=C.say)
    rows = []
    for name in steps:
        ips = args.batch * args.steps / C.median(times[name])
        rows.append({"step": name, "images_per_s": round(ips, 1), "spread": f"±{C.spread(times[name]):.0f}%",
                     "host_reads_per_step": round(reads[name], 2), "speed_vs_before": round(1.0 / C.ratio_to(times, "before", name), 3)})
    print(C.table(rows, [("step", "step"), ("images_per_s", "images/s"), ("spread", "spread"), ("host_reads_per_step", "host reads/step"), ("speed_vs_before", "speed x before")],
                  title=f"{args.backbone} {args.image_size}px batch {args.batch} on {device} ({threads} threads)"))
    result = {"environment": C.environment(device), "args": vars(args), "rows": rows}
    C.write_results("bench_step_syncs", result, args.json)
    return result


if __name__ == "__main__":
    main()
