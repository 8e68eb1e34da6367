"""Does the feature norm rank face quality? LFW View 2's error-versus-reject curve against chance.

``eval-lfw --erc`` draws FNMR at the FAR-1e-3 threshold as the lowest-quality pairs (the
worse face's feature norm) are rejected. A falling curve alone does not show that the norm
knows anything: this script puts beside it the same rejection in random order (mean and
central 95% of ``--shuffles`` orders), and repeats both on the View 2 pairs whose people are
all outside the checkpoint's training identities (a View 1 run trains on peopleDevTrain,
who appear in View 2 too).

    python benchmarks/erc_lfw.py --checkpoint runs/lfw_view1/checkpoints/magface/<run>/latest.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, set_threads  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def fnmr_after_reject(scores, issame, order, threshold: float, fraction: float) -> float:
    keep = order[int(round(fraction * len(scores))):]
    genuine = scores[keep][issame[keep]]
    return float(np.mean(genuine < threshold))


def compare(scores: np.ndarray, issame: np.ndarray, quality: np.ndarray, fractions, shuffles: int, seed: int = 0) -> dict:
    """The quality order's FNMR at each rejected fraction, and random orders' mean and 95% band."""
    from facecli.evaluation.quality import error_reject_curve

    curve = error_reject_curve(scores, issame, quality)
    order = np.argsort(quality, kind="stable")
    rng = np.random.default_rng(seed)
    random = np.array([[fnmr_after_reject(scores, issame, rng.permutation(len(scores)), curve.threshold, f) for f in fractions]
                       for _ in range(shuffles)])
    rows = []
    for j, f in enumerate(fractions):
        lo, hi = np.percentile(random[:, j], [2.5, 97.5])
        rows.append({"reject": f, "fnmr_quality": fnmr_after_reject(scores, issame, order, curve.threshold, f),
                     "fnmr_random_mean": float(random[:, j].mean()), "fnmr_random_95": [float(lo), float(hi)],
                     "random_at_or_below_quality": float(np.mean(random[:, j] <= fnmr_after_reject(scores, issame, order, curve.threshold, f)))})
    return {"threshold": curve.threshold, "pairs": int(len(scores)), "genuine": int(issame.sum()), "impostor": int((~issame).sum()), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--lfw", type=Path, default=SHARED / "lfw")
    ap.add_argument("--shuffles", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / "erc_lfw.json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    import facecli
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.runner import evaluate_pair_set

    model = facecli.load_model(args.checkpoint)
    pair_set = read_pairs(args.lfw / "pairs.txt", find_image_root(args.lfw))
    ev = evaluate_pair_set(Embedder(model.net, model.preprocess, "cpu", flip=True), pair_set)
    if ev.pair_quality is None:
        sys.exit(f"{args.checkpoint}: no quality score (train it with magface or adaface)")
    trained = set(model.checkpoint.get("classes", [])) if model.checkpoint else set()
    unseen = np.array([a.parent.name not in trained and b.parent.name not in trained for a, b in pair_set.pairs])
    fractions = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    out = {"checkpoint": str(args.checkpoint), "threads": threads, "view2_accuracy": float(ev.report.accuracy),
           "all_pairs": compare(ev.scores, ev.issame, ev.pair_quality, fractions, args.shuffles),
           "unseen_people": compare(ev.scores[unseen], ev.issame[unseen], ev.pair_quality[unseen], fractions, args.shuffles)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    for part in ("all_pairs", "unseen_people"):
        r = out[part]
        print(f"{part}: {r['pairs']} pairs ({r['genuine']} genuine), threshold {r['threshold']:.4f} for FAR 1e-3")
        for row in r["rows"]:
            lo, hi = row["fnmr_random_95"]
            print(f"  reject {100 * row['reject']:4.0f}%: FNMR {100 * row['fnmr_quality']:.2f}% by quality, "
                  f"{100 * row['fnmr_random_mean']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}] at random")
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
