"""Backbones: parameters, FLOPs and CPU forward speed of every registered backbone at 112x112.

    python benchmarks/bench_backbones.py               # 112 px, batch 8, 3 rounds
    python benchmarks/bench_backbones.py --quick       # 32 px, batch 2: checks the script runs

For each backbone, as the embedding network facecli trains (``EmbeddingNet``, 512-d, plus
MobileFaceNet with the paper's 128-d embedding):

* parameters, counted on the meta device;
* FLOPs of one forward pass of one image, counted by ``torch.utils.flop_counter.FlopCounterMode``
  on the meta device (2 FLOPs per multiply-add; convolutions and matrix products only, not
  BatchNorm, PReLU or additions). Published face-network figures are mostly multiply-adds
  (insightface's arcface_torch README "FLOPs", MobileFaceNet's "MAdds"), so the table gives
  GMACs = GFLOPs / 2 beside them; OpenVINO's model-zoo "GFLOPs" are 2 per multiply-add like ours;
* images/s of an eval-mode, no-grad, float32 forward pass at batch 8 on the CPU, every backbone
  timed once per round in turn (benchmarks/_common.py), the median over rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO))  # benchmark this checkout's facecli, whatever the environment has installed


def variants(names: list[str]) -> list[tuple[str, int]]:
    """(backbone, embedding size): every backbone at 512-d, and MobileFaceNet also at its paper's 128-d."""
    rows = [(name, 512) for name in names]
    if "mobilefacenet" in names:
        rows.append(("mobilefacenet", 128))
    return rows


def count(name: str, dim: int, image_size: int) -> tuple[int, int]:
    """(parameters, forward FLOPs of one image), both on the meta device: no memory, no arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from facecli.backbones import EmbeddingNet

    with torch.device("meta"):
        net = EmbeddingNet(name, dim, image_size=image_size).eval()
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops()


def forward_fn(name: str, dim: int, image_size: int, batch: int):
    """A no-argument callable running one eval forward pass of a fresh network on a fixed batch."""
    import torch

    from facecli.backbones import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet(name, dim, image_size=image_size).eval()
    x = torch.randn(batch, 3, image_size, image_size)

    def run():
        with torch.no_grad():
            net(x)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--backbones", default=None, help="comma-separated (default: all registered)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image_size = 2, 32
    rounds = args.rounds or (1 if args.quick else 3)
    threads = C.set_threads(args.threads)

    from facecli.backbones import BACKBONES

    names = [b.strip() for b in args.backbones.split(",")] if args.backbones else sorted(BACKBONES)
    rows = []
    for name, dim in variants(names):
        params, flops = count(name, dim, args.image_size)
        rows.append({"backbone": name, "embedding_dim": dim, "params_m": params / 1e6, "gflops": flops / 1e9, "gmacs": flops / 2e9})
    C.say(f"backbones: {len(rows)} at {args.image_size}x{args.image_size}, CPU forward at batch {args.batch}, {threads} thread(s), {rounds} rounds")

    calls = {f"{r['backbone']} {r['embedding_dim']}": forward_fn(r["backbone"], r["embedding_dim"], args.image_size, args.batch) for r in rows}
    times = C.interleaved(calls, rounds=rounds, iters=1, warmup=1, log=C.say)
    for r, key in zip(rows, calls):
        r["images_per_s"] = args.batch / C.median(times[key])
        r["noise_pct"] = C.spread(times[key])

    shown = [
        {**r, "params_m": f"{r['params_m']:.3f}", "gflops": f"{r['gflops']:.3f}", "gmacs": f"{r['gmacs']:.3f}",
         "images_per_s": f"{r['images_per_s']:.1f}", "noise_pct": f"{r['noise_pct']:.1f}"}
        for r in rows
    ]  # fmt: skip
    C.say(C.table(
        shown,
        [("backbone", "backbone"), ("embedding_dim", "emb"), ("params_m", "params (M)"), ("gflops", "GFLOPs"),
         ("gmacs", "GMACs"), ("images_per_s", "CPU img/s"), ("noise_pct", "+-%")],
        title=f"Backbones at {args.image_size}x{args.image_size}: FlopCounterMode forward FLOPs of one image; CPU fp32 forward, batch {args.batch}",
    ))  # fmt: skip
    path = C.write_results("bench_backbones", {
        "config": {"image_size": args.image_size, "batch": args.batch, "rounds": rounds, "threads": threads},
        "environment": C.environment(),
        "rows": rows,
        "raw_seconds": times,
    }, args.json)  # fmt: skip
    C.say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
