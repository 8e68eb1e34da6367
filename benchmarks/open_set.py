"""Open-set identification of LFW strangers at the operating point `facecli identify` chooses.

    python benchmarks/open_set.py --checkpoint RUN/latest.pt [--far 0.01] [--enrol 2]

People of ``peopleDevTest.txt`` with at least 4 images whom the checkpoint never trained on
(its label map says which) are split alternately: half are enrolled (their first
``--enrol`` images), half are strangers (all their images). The threshold is the one
``identify`` uses by default: calibrated leave-one-out on the gallery's own photos for
``--far`` (:func:`facecli.gallery.calibrate`), never on the strangers. Reported:

* DIR: share of the enrolled people's other images named right (rank 1) at or above it;
* FAR: share of the strangers' images given a name (top score at or above it); the rest
  come back "unknown".

Images are used as given (the model's centre crop, as ``identify`` without ``--detect``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, set_threads  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def dev_test_people(lfw: Path, trained: set[str], min_images: int = 4) -> dict[str, list[Path]]:
    """peopleDevTest.txt people with >= min_images images, none of them trained on."""
    people = {}
    for line in (lfw / "peopleDevTest.txt").read_text().splitlines()[1:]:
        name, count = line.split("\t")
        if int(count) >= min_images and name not in trained:
            people[name] = [lfw / "lfw-deepfunneled" / name / f"{name}_{i:04d}.jpg" for i in range(1, int(count) + 1)]
    return people


def measure(model, people: dict[str, list[Path]], enrol: int, far: float, batch_size: int = 64) -> dict:
    from facecli.gallery import build_gallery, calibrate

    names = sorted(people)
    members, strangers = names[0::2], names[1::2]
    enrolled = [(k, p) for k, n in enumerate(members) for p in people[n][:enrol]]
    probes = [(k, p) for k, n in enumerate(members) for p in people[n][enrol:]]
    stranger_photos = [p for n in strangers for p in people[n]]
    start = time.perf_counter()
    vectors = model.embed([p for _, p in enrolled] + [p for _, p in probes] + stranger_photos, batch_size=batch_size)
    seconds = time.perf_counter() - start
    g_vec, p_vec, s_vec = np.split(vectors, [len(enrolled), len(enrolled) + len(probes)])
    gallery = build_gallery(members, [k for k, _ in enrolled], g_vec, [str(p) for _, p in enrolled], model.identity, None)
    rows = []
    for target in sorted({far, 0.1}):
        point = calibrate(gallery, "mean", target)
        probe_scores, stranger_scores = gallery.scores(p_vec), gallery.scores(s_vec)
        truth = np.array([k for k, _ in probes])
        right = (probe_scores.argmax(1) == truth) & (probe_scores.max(1) >= point.threshold)
        named = stranger_scores.max(1) >= point.threshold
        rows.append({"target_far": target, "threshold": point.threshold, "source": point.source,
                     "dir": float(right.mean()), "far": float(named.mean()), "unknown": float(1 - named.mean()),
                     "rank1": float((probe_scores.argmax(1) == truth).mean())})
    return {"enrolled_people": len(members), "enrolled_images": len(enrolled), "probe_images": len(probes),
            "stranger_people": len(strangers), "stranger_images": len(stranger_photos), "embed_seconds": seconds, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--lfw", type=Path, default=SHARED / "lfw")
    ap.add_argument("--far", type=float, default=0.01, help="target FAR of the calibrated threshold (identify's --far)")
    ap.add_argument("--enrol", type=int, default=2, help="images enrolled per person")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / "open_set.json")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    import facecli

    model = facecli.load_model(args.checkpoint)
    trained = set(model.checkpoint.get("classes", [])) if model.checkpoint else set()
    out = measure(model, dev_test_people(args.lfw, trained), args.enrol, args.far)
    out.update(checkpoint=str(args.checkpoint), threads=threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{out['enrolled_people']} people enrolled ({out['enrolled_images']} images), {out['probe_images']} of their other images, "
          f"{out['stranger_images']} images of {out['stranger_people']} strangers; embedding {out['embed_seconds']:.0f} s on {threads} thread(s)")
    for r in out["rows"]:
        print(f"target FAR {r['target_far']:g}: threshold {r['threshold']:.4f}; DIR {100 * r['dir']:.1f}% (rank-1 {100 * r['rank1']:.1f}%), "
              f"strangers named {100 * r['far']:.1f}%, 'unknown' {100 * r['unknown']:.1f}%")


if __name__ == "__main__":
    main()
