"""Margin heads: forward + backward of each facecli head against a naive reference and the floor.

    python benchmarks/bench_heads.py                  # B=256, C=10,575, D=512 (CASIA-WebFace)
    python benchmarks/bench_heads.py --quick          # tiny, checks the script runs

Three things are timed side by side, interleaved round by round (benchmarks/_common.py):

* ``floor``: the no-margin cost every head must pay: normalise embeddings and weights,
  one matrix multiply, scale, cross-entropy; forward and backward;
* ``facecli <head>``: ``facecli.losses.build_head(...)`` then cross-entropy;
* ``naive <head>``: the same formula written the way first versions usually are:
  python-indexed in-place replacement of the target logit (``logits[arange(B), y] = ...``),
  ``acos`` of the target for angular margins, and for CurricularFace the reference
  implementation's boolean-mask gathers (``hard = cos[mask]; cos[mask] = hard * (t + hard)``).

Each naive head is checked to give the same loss as the facecli head before timing.
Inputs are random, as at the start of training: then almost every non-target entry is a
CurricularFace "hard" negative (cos_j > cos(theta_y + m)), the costly case for the mask
version; the fraction is reported.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# ----------------------------------------------------------------------------- naive heads


def _naive_cos(x, weight):
    import torch.nn.functional as F

    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)


def naive_cosface(x, weight, labels, s=64.0, m=0.35):
    import torch

    cos = _naive_cos(x, weight)
    idx = torch.arange(cos.shape[0], device=cos.device)
    logits = cos.clone()
    logits[idx, labels] = cos[idx, labels] - m
    return logits * s


def naive_arcface(x, weight, labels, s=64.0, m=0.5):
    import torch

    cos = _naive_cos(x, weight)
    idx = torch.arange(cos.shape[0], device=cos.device)
    target = cos[idx, labels]
    theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    new = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    logits = cos.clone()
    logits[idx, labels] = new
    return logits * s


def naive_sphereface(x, weight, labels, s=30.0, m=1.5):
    import torch

    cos = _naive_cos(x, weight)
    idx = torch.arange(cos.shape[0], device=cos.device)
    theta = torch.acos(cos[idx, labels].clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    k = torch.floor(m * theta.detach() / math.pi)
    psi = (-1.0) ** k * torch.cos(m * theta) - 2.0 * k
    logits = cos.clone()
    logits[idx, labels] = psi
    return logits * s


class NaiveCurricularFace:
    """The CurricularFace reference implementation (HuangYG123/CurricularFace head/metrics.py)."""

    def __init__(self, s=64.0, m=0.5, momentum=0.01):
        self.s, self.m, self.momentum = s, m, momentum
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m
        self.t = None

    def __call__(self, x, weight, labels):
        import torch

        cos_theta = _naive_cos(x, weight)
        if self.t is None:
            self.t = torch.zeros(1, device=cos_theta.device)
        with torch.no_grad():
            origin_cos = cos_theta.clone()  # noqa: F841  (kept as in the reference)
        target_logit = cos_theta[torch.arange(0, x.size(0)), labels].view(-1, 1)
        sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
        cos_theta_m = target_logit * self.cos_m - sin_theta * self.sin_m
        mask = cos_theta > cos_theta_m
        final_target_logit = torch.where(target_logit > self.threshold, cos_theta_m, target_logit - self.mm)
        hard_example = cos_theta[mask]
        with torch.no_grad():
            self.t = target_logit.mean() * self.momentum + (1 - self.momentum) * self.t
        cos_theta[mask] = hard_example * (self.t + hard_example)
        cos_theta.scatter_(1, labels.view(-1, 1).long(), final_target_logit)
        return cos_theta * self.s


def floor_logits(x, weight, labels, s=64.0):
    import torch.nn.functional as F

    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1)) * s


# ----------------------------------------------------------------------------- benchmark

HEAD_NAMES = ("cosface", "arcface", "sphereface", "curricularface")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=10_575)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--iters", type=int, default=None, help="calls per variant per round")
    p.add_argument("--heads", default=",".join(HEAD_NAMES))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.classes, args.dim = 16, 300, 32
    rounds = args.rounds or (3 if args.quick else 7)
    threads = C.set_threads(args.threads)

    import torch
    import torch.nn.functional as F

    from facecli.losses import build_head

    device = C.resolve_device(args.device)
    iters = args.iters or (2 if args.quick else (20 if device.type == "cuda" else 2))
    torch.manual_seed(0)
    B, N, D = args.batch, args.classes, args.dim
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    C.say(f"heads: B={B} C={N} D={D} on {device}, {threads} thread(s); {rounds} rounds x {iters} calls, fwd+bwd, fp32")

    x0 = torch.randn(B, D, device=device)
    labels = torch.randint(0, N, (B,), device=device)
    weight0 = torch.empty(N, D, device=device).normal_(0.0, 0.01)

    # every variant owns a weight Parameter of the same values; its gradient is zeroed by set_to_none
    def owned_weight():
        return torch.nn.Parameter(weight0.clone())

    variants = {}
    checks = {}
    w_floor = owned_weight()

    def floor_run():
        w_floor.grad = None
        x = x0.detach().requires_grad_(True)
        loss = F.cross_entropy(floor_logits(x, w_floor, labels), labels)
        loss.backward()

    variants["floor"] = floor_run

    naive_fns = {
        "cosface": lambda x, w, y: naive_cosface(x, w, y),
        "arcface": lambda x, w, y: naive_arcface(x, w, y),
        "sphereface": lambda x, w, y: naive_sphereface(x, w, y),
        "curricularface": NaiveCurricularFace(),
    }
    hard_fraction = None
    for name in heads:
        head = build_head(name, D, N).to(device)
        with torch.no_grad():
            head.weight.copy_(weight0)
        w_naive = owned_weight()
        naive = naive_fns[name]

        # same formula: compare loss and gradients on the same inputs (CurricularFace: t starts at 0
        # in both and both update it from this batch before using it)
        xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        la = F.cross_entropy(head(xa, labels), labels)
        lb = F.cross_entropy(naive(xb, w_naive, labels), labels)
        la.backward()
        lb.backward()

        def rel(a, b):
            return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)

        checks[name] = {
            "loss_facecli": la.item(),
            "loss_naive": lb.item(),
            "grad_x_rel_diff": rel(xa.grad, xb.grad),
            "grad_w_rel_diff": rel(head.weight.grad, w_naive.grad),
        }
        head.weight.grad, w_naive.grad = None, None
        if not (math.isclose(la.item(), lb.item(), rel_tol=1e-4, abs_tol=1e-4) and checks[name]["grad_x_rel_diff"] < 1e-3
                and checks[name]["grad_w_rel_diff"] < 1e-3):
            C.say(f"WARNING: {name}: facecli and naive differ: {checks[name]}")
        if name == "curricularface":
            head.t.zero_()
            naive.t = None
            with torch.no_grad():
                cos = head.cosine(x0)
                cos_y = cos.gather(1, labels.view(-1, 1))
                m = head.margin
                thr = cos_y * math.cos(m) - (1 - cos_y * cos_y).clamp_min(0).sqrt() * math.sin(m)
                hard = (cos > thr).float()
                hard.scatter_(1, labels.view(-1, 1), 0.0)
                hard_fraction = hard.sum().item() / (B * (N - 1))

        def facecli_run(head=head):
            head.weight.grad = None
            x = x0.detach().requires_grad_(True)
            F.cross_entropy(head(x, labels), labels).backward()

        def naive_run(naive=naive, w=w_naive):
            w.grad = None
            x = x0.detach().requires_grad_(True)
            F.cross_entropy(naive(x, w, labels), labels).backward()

        variants[f"facecli {name}"] = facecli_run
        variants[f"naive {name}"] = naive_run

    times = C.interleaved(variants, rounds, iters, warmup=1, device=device, log=C.say)

    for name, c in checks.items():
        C.say(f"{name}: loss facecli {c['loss_facecli']:.6f} naive {c['loss_naive']:.6f}; "
              f"max relative gradient difference x {c['grad_x_rel_diff']:.1e}, W {c['grad_w_rel_diff']:.1e}")
    rows = []
    for name, ts in times.items():
        row = {
            "variant": name,
            "ms": round(1e3 * C.median(ts), 2),
            "noise_pct": round(C.spread(ts), 1),
            "vs_floor": round(C.ratio_to(times, "floor", name), 3),
        }
        head_name = name.split(" ", 1)[1] if " " in name else None
        if name.startswith("facecli "):
            row["speedup_vs_naive"] = round(C.ratio_to(times, name, f"naive {head_name}"), 3)
        rows.append(row)
    text = C.table(
        [
            {**r, "vs_floor": f"{r['vs_floor']:.3f}x", "speedup_vs_naive": (f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "")}
            for r in rows
        ],
        [("variant", "variant"), ("ms", "median ms"), ("noise_pct", "+-%"), ("vs_floor", "time / floor"), ("speedup_vs_naive", "naive time / facecli time")],
        title=f"Margin heads, forward + backward, B={B} C={N} D={D}, {device}, {threads} thread(s)",
    )
    C.say("\n" + text)
    if hard_fraction is not None:
        C.say(f"CurricularFace hard negatives in these inputs: {100 * hard_fraction:.1f}% of non-target entries")
    out = C.write_results(
        "heads",
        {
            "benchmark": "heads",
            "config": {"batch": B, "classes": N, "dim": D, "rounds": rounds, "iters": iters, "device": str(device), "threads": threads, "quick": args.quick},
            "environment": C.environment(device),
            "rows": rows,
            "times_s": times,
            "loss_checks": checks,
            "curricular_hard_fraction": hard_fraction,
        },
        args.json,
    )
    C.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
