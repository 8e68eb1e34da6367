"""Evaluation: ``eval-lfw`` (View 2, 6,000 pairs) against a per-threshold re-embedding evaluator.

    python benchmarks/bench_eval.py                    # synthetic LFW-sized set, 64 px, resnet18
    python benchmarks/bench_eval.py --lfw-dir ../shared/data/lfw --image-size 112
    python benchmarks/bench_eval.py --quick

* ``facecli``: ``facecli.evaluation.runner.evaluate_pair_set``, the function behind
  ``facecli eval-lfw`` (model loading and the result pictures aside), with its defaults:
  every distinct image embedded once with flip test-time augmentation (2 forward passes per
  distinct image), 2 DataLoader workers, 10-fold protocol over the score table.
* ``naive``: the common homegrown script: for each of 35 thresholds, for every pair, load
  and embed both images again (no flip, batched 32 pairs at a time), record whether the
  decision "same iff cos >= threshold" is right; then the 10 folds pick, on the other nine
  folds, the threshold with the best accuracy. Cost: 35 x pairs x 2 forward passes.

Running the naive evaluator at full size takes hours on a CPU, so by default it runs for real
on a subset (``--naive-pairs`` pairs x ``--naive-thresholds`` thresholds) and its full-size
time is extrapolated by forward-pass count (the work per pass is the same: load, decode,
forward). The table says so. ``--naive-full`` runs it completely.

Both sides use the same untrained network (accuracy is irrelevant to timing) and the same
images. The synthetic set (``facecli synth``, cached under benchmarks/results/cache) has
900 test people x 13 images: 10 folds x 600 pairs touching about 7,600 distinct images, like LFW (7,701).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAIVE_THRESHOLDS = 35


def synthetic_lfw(image_size: int, quick: bool) -> Path:
    from facecli.data.synth import LFW_DIR, generate_synthetic_set

    people, k = (40, 6) if quick else (900, 13)
    root = C.RESULTS / "cache" / f"synth_lfw_{people}x{k}_{image_size}px"
    lfw = root / LFW_DIR
    if not (lfw / "pairs.txt").is_file() or not (root / "facecli-synth.json").is_file():
        C.say(f"generating a synthetic LFW-sized set in {root} (once; {people * k} images)...")
        t0 = time.perf_counter()
        generate_synthetic_set(root, identities=2, test_identities=people, images_per_identity=k, image_size=image_size, seed=0)
        C.say(f"  generated in {time.perf_counter() - t0:.0f} s")
    return lfw


class NaiveEvaluator:
    """Re-embeds both images of every pair for every threshold (what first versions do)."""

    def __init__(self, net, image_size: int, crop_fraction: float | None, device, batch_pairs: int = 32):
        import torchvision.transforms as T

        from facecli.data.images import resolve_crop

        self.net, self.device, self.batch_pairs = net, device, batch_pairs
        self.image_size, self.crop_fraction, self.resolve_crop = image_size, crop_fraction, resolve_crop
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        self.forward_passes = 0

    def load(self, path):
        from PIL import Image

        img = Image.open(path).convert("RGB")
        w, h = img.size
        side = round(min(w, h) * self.resolve_crop((w, h), self.crop_fraction))
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((self.image_size, self.image_size), Image.BILINEAR)
        return self.to_tensor(img)

    def embed(self, paths):
        import torch
        import torch.nn.functional as F

        x = torch.stack([self.load(p) for p in paths]).to(self.device)
        with torch.no_grad():
            z = self.net(x)
        self.forward_passes += x.shape[0]
        return F.normalize(z.float(), dim=1)

    def correct_table(self, pairs, issame, thresholds):
        """(thresholds, pairs) bool: is the decision at that threshold right for that pair."""
        import numpy as np

        table = np.zeros((len(thresholds), len(pairs)), dtype=bool)
        for ti, thr in enumerate(thresholds):
            for start in range(0, len(pairs), self.batch_pairs):
                chunk = pairs[start : start + self.batch_pairs]
                a = self.embed([p[0] for p in chunk])
                b = self.embed([p[1] for p in chunk])
                sim = (a * b).sum(1).cpu().numpy()
                table[ti, start : start + len(chunk)] = (sim >= thr) == issame[start : start + len(chunk)]
        return table

    @staticmethod
    def ten_fold(table, fold_of_pair, thresholds, folds=10):
        import numpy as np

        accs = []
        for f in range(folds):
            test = fold_of_pair == f
            train_acc = table[:, ~test].mean(1)
            best = int(np.argmax(train_acc))
            accs.append(table[best, test].mean())
        return float(np.mean(accs)), thresholds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--lfw-dir", type=Path, default=None, help="a real LFW folder instead of the synthetic set")
    p.add_argument("--image-size", type=int, default=None, help="network input size (default 64; 32 with --quick)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--workers", type=int, default=2, help="facecli's DataLoader workers (eval-lfw's default: 2)")
    p.add_argument("--batch-size", type=int, default=None, help="facecli's embedding batch (default: eval-lfw's)")
    p.add_argument("--naive-pairs", type=int, default=None, help="pairs the naive evaluator runs for real (default 64)")
    p.add_argument("--naive-thresholds", type=int, default=2, help="thresholds the naive evaluator runs for real")
    p.add_argument("--naive-full", action="store_true", help="run the naive evaluator on every pair and all 35 thresholds")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    image_size = args.image_size or (32 if args.quick else 64)
    threads = C.set_threads(args.threads)

    import numpy as np
    import torch

    from facecli.backbones import EmbeddingNet
    from facecli.data.images import Preprocess
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.runner import evaluate_pair_set

    device = C.resolve_device(args.device)
    lfw = args.lfw_dir or synthetic_lfw(image_size, args.quick)
    root = find_image_root(lfw)
    pairs_file = lfw / "pairs.txt" if (lfw / "pairs.txt").is_file() else root.parent / "pairs.txt"
    pair_set = read_pairs(pairs_file, root)
    n_pairs = len(pair_set)
    torch.manual_seed(0)
    net = EmbeddingNet(args.backbone, 512, image_size=image_size).to(device).eval()
    pre = Preprocess(image_size)

    thresholds = np.linspace(-1.0, 1.0, NAIVE_THRESHOLDS)
    naive_pairs = n_pairs if args.naive_full else min(n_pairs, args.naive_pairs or (16 if args.quick else 64))
    naive_thr = NAIVE_THRESHOLDS if args.naive_full else max(1, min(args.naive_thresholds, NAIVE_THRESHOLDS))
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(n_pairs, size=naive_pairs, replace=False))
    sub_pairs = [pair_set.pairs[i] for i in subset]
    sub_same = np.asarray(pair_set.issame)[subset]
    naive_full_passes = NAIVE_THRESHOLDS * n_pairs * 2
    C.say(
        f"eval: {n_pairs} pairs, {len(pair_set.unique_images)} distinct images from {root}, {image_size}px, {args.backbone}, "
        f"{device}, {threads} thread(s); naive runs {naive_pairs} pairs x {naive_thr} thresholds; {rounds} round(s)"
    )

    naive = NaiveEvaluator(net, image_size, pre.crop_fraction, device)
    naive.correct_table(sub_pairs[:4], sub_same[:4], thresholds[:1])  # warm-up, untimed (first-call costs)
    results = {"facecli": [], "naive_subset": []}
    facecli_eval = None
    for r in range(rounds):
        order = ("naive", "facecli") if r % 2 == 0 else ("facecli", "naive")
        for kind in order:
            t0 = time.perf_counter()
            if kind == "facecli":
                facecli_eval = evaluate_pair_set(net, pre, pair_set, device, flip=True, batch_size=args.batch_size, workers=args.workers)
                C.synchronize(device)
                results["facecli"].append(time.perf_counter() - t0)
            else:
                naive.forward_passes = 0
                table = naive.correct_table(sub_pairs, sub_same, thresholds[:naive_thr])
                C.synchronize(device)
                results["naive_subset"].append(time.perf_counter() - t0)
                naive_sub_passes = naive.forward_passes
            C.say(f"  round {r + 1}/{rounds}: {kind} {results['facecli' if kind == 'facecli' else 'naive_subset'][-1]:.1f} s")

    facecli_s = C.median(results["facecli"])
    naive_sub_s = C.median(results["naive_subset"])
    per_pass = naive_sub_s / naive_sub_passes
    naive_full_s = per_pass * naive_full_passes
    naive_acc = None
    if args.naive_full:
        naive_acc, _ = NaiveEvaluator.ten_fold(table, pair_set.fold_of_pair, thresholds)
    facecli_per_pass = facecli_s / facecli_eval.forward_passes
    rows = [
        {
            "evaluator": "facecli eval-lfw (evaluate_pair_set, flip)",
            "forward_passes": facecli_eval.forward_passes,
            "seconds": round(facecli_s, 2),
            "ms_per_pass": round(1e3 * facecli_per_pass, 3),
            "how": "measured, full set",
            "speedup": 1.0,
        },
        {
            "evaluator": f"naive per-threshold re-embedding ({NAIVE_THRESHOLDS} thresholds, no flip)",
            "forward_passes": naive_full_passes,
            "seconds": round(naive_full_s, 1),
            "ms_per_pass": round(1e3 * per_pass, 3),
            "how": ("measured, full set" if args.naive_full else
                    f"extrapolated by forward passes from {naive_pairs} pairs x {naive_thr} thresholds "
                    f"({naive_sub_passes} passes, {naive_sub_s:.1f} s)"),
            "speedup": round(naive_full_s / facecli_s, 2),
        },
    ]
    C.say(
        "\n"
        + C.table(
            [{**r, "speedup": f"{r['speedup']:.1f}x" if r["speedup"] != 1.0 else "1 (reference)"} for r in rows],
            [("evaluator", "evaluator"), ("forward_passes", "forward passes"), ("seconds", "seconds"), ("ms_per_pass", "ms/pass"),
             ("speedup", "naive / facecli"), ("how", "how")],
            title=f"LFW View 2 evaluation, {n_pairs} pairs, {len(pair_set.unique_images)} distinct images, {args.backbone} {image_size}px, {device}",
        )
    )
    C.say(f"facecli: {facecli_eval.report.accuracy:.4f} accuracy (untrained network), {facecli_eval.forward_passes} passes = "
          f"{len(pair_set.unique_images)} distinct images x 2 (flip); pass-count ratio {naive_full_passes / facecli_eval.forward_passes:.1f}x")
    out = C.write_results(
        "eval",
        {
            "benchmark": "eval",
            "config": {"pairs": n_pairs, "unique_images": len(pair_set.unique_images), "image_size": image_size, "backbone": args.backbone,
                       "lfw": str(lfw), "workers": args.workers, "rounds": rounds, "device": str(device), "threads": threads,
                       "naive_pairs": naive_pairs, "naive_thresholds_run": naive_thr, "naive_full": args.naive_full, "quick": args.quick},
            "environment": C.environment(device),
            "rows": rows,
            "times_s": results,
            "facecli_accuracy": facecli_eval.report.accuracy,
            "naive_accuracy": naive_acc,
            "pass_ratio": naive_full_passes / facecli_eval.forward_passes,
        },
        args.json,
    )
    C.say(f"wrote {out}")
    return 0 if math.isfinite(facecli_s) else 1


if __name__ == "__main__":
    raise SystemExit(main())
