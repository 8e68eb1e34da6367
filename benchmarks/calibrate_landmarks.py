"""Derive the constants of facecli/detect.py from LFW, and check the derived ArcFace points.

dlib's CC0 5-point predictor gives eye corners and the nose base; ArcFace wants eye
centres, nose tip and mouth corners. ``TEMPLATE_NOSE_BASE`` is the mean nose base in the
ArcFace frame after placing the two eye centres on the template's eyes (one similarity per
face); ``HAAR_BOX_POINTS`` are the mean ArcFace points inside OpenCV's Haar boxes.

The check compares the derived points with the 68-point predictor's (eye centres = mean
of the six eye points, nose tip = point 30, mouth corners = 48 and 54), in units of the
inter-ocular distance. The 68-point model (iBUG 300-W, non-commercial) is only read here,
as a yardstick; facecli never loads it.

    python benchmarks/calibrate_landmarks.py --images 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facecli.align import ARCFACE_TEMPLATE, load_photo  # noqa: E402
from facecli.detect import (  # noqa: E402
    TEMPLATE_NOSE_BASE, DlibDetector, HaarDetector, _affine_from_3, _apply, _eye_similarity, _model_file, arcface_points,
)

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def dev_train_images(lfw: Path, count: int, seed: int) -> list[Path]:
    """``count`` random images of the people in peopleDevTrain.txt (fixed seed)."""
    lines = (lfw / "peopleDevTrain.txt").read_text().split("\n")[1:]
    people = [ln.split("\t") for ln in lines if ln.strip()]
    paths = [lfw / "lfw-deepfunneled" / n / f"{n}_{i:04d}.jpg" for n, c in people for i in range(1, int(c) + 1)]
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), count, replace=False))]


def in_template_frame(points: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Points mapped by the similarity that carries (left, right) onto the template's eyes."""
    forward = _eye_similarity(left, right)  # template -> photo
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    return points @ inverse[:, :2].T + inverse[:, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lfw-dir", type=Path, default=LFW)
    args = ap.parse_args()

    hog, haar = DlibDetector("hog", 1), HaarDetector()
    sp68 = hog.dlib.shape_predictor(_model_file("shape_predictor_68_face_landmarks.dat"))
    bases, haar_points = [], []
    errors: dict[str, list] = {"facecli (nose by affine, mouth by eyes)": [], "all five by the eyes": [], "all five by the affine": []}
    for path in dev_train_images(args.lfw_dir, args.images, args.seed):
        rgb = np.asarray(load_photo(path, str(path)).convert("RGB"))
        rects, _, _ = hog._detector.run(rgb, 1, 0.0)
        if not rects:
            continue
        rect = max(rects, key=lambda r: r.area())
        p5 = np.array([(p.x, p.y) for p in hog._predictor(rgb, rect).parts()], dtype=float)
        p68 = np.array([(p.x, p.y) for p in sp68(rgb, rect).parts()], dtype=float)
        left, right = (p5[2] + p5[3]) / 2, (p5[0] + p5[1]) / 2
        bases.append(in_template_frame(p5[4:5], left, right)[0])
        truth = np.stack([p68[36:42].mean(0), p68[42:48].mean(0), p68[30], p68[48], p68[54]])
        iod = np.linalg.norm(truth[1] - truth[0])
        affine = _affine_from_3(np.stack([ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1], TEMPLATE_NOSE_BASE]), np.stack([left, right, p5[4]]))
        variants = (arcface_points(p5), _apply(_eye_similarity(left, right), ARCFACE_TEMPLATE), _apply(affine, ARCFACE_TEMPLATE))
        for errs, points in zip(errors.values(), variants):
            errs.append(np.linalg.norm(points - truth, axis=1) / iod)
        centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
        for f in haar.detect(rgb):
            x0, y0, x1, y1 = f.box
            if x0 <= centre[0] <= x1 and y0 <= centre[1] <= y1:
                haar_points.append((arcface_points(p5) - [x0, y0]) / [x1 - x0, y1 - y0])
                break
    names = ["left eye", "right eye", "nose tip", "left mouth", "right mouth"]
    print(f"{len(bases)} faces found by HOG in {args.images} images")
    print("TEMPLATE_NOSE_BASE =", np.round(np.mean(bases, axis=0), 2).tolist())
    print(f"HAAR_BOX_POINTS ({len(haar_points)} faces) =", np.round(np.mean(haar_points, axis=0), 4).tolist())
    print("mean distance to the 68-point model's points, in inter-ocular distances:")
    for label, err in errors.items():
        e = np.mean(err, axis=0)
        print(f"  {label}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, e)) + f"; mean {e.mean():.3f}")


if __name__ == "__main__":
    main()
