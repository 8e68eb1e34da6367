"""Raw photos on real faces: the detectors compared, 1:N identification, ONNX export parity.

    python benchmarks/raw_photos.py --checkpoint ATT.pt [--lfw-checkpoint LFW.pt] [--lfw-images 2000]

* **Detection** (``--skip-detection`` to leave out): every detector on the same fixed random
  subset of LFW (``--lfw-images``, seed 0; 0 for all 13,233) and on all 400 AT&T images,
  interleaved image by image so load hits all alike. An LFW image counts as detected
  when a box holds its centre (LFW centres the named person); AT&T when any box is found.
  Time is ``detect()`` alone (decoding excluded), per image, on one thread: CPU time of
  the process (robust to other jobs on a shared machine) and wall time.
* **Identification** on the people a checkpoint never trained on (its label map says which):
  closed set, enrol the first half of each person's images (AT&T: 5 of 10), identify the
  rest (rank-1, rank-5); open set, enrol only part of the people, the others' images are
  impostors: detection-and-identification rate (rank-1 right and score >= t, a photo
  without a detected face counts as a miss) against false-accept rate (an impostor's top
  score >= t), at the checkpoint's threshold and at the thresholds giving FAR 1% and 10%
  (chosen on the impostors themselves: an optimistic, oracle threshold). Run on the images
  as they are (the model's own centre crop) and with ``--detect`` (HOG, largest face,
  ArcFace alignment).
* **View 1 framing** (with ``--lfw-checkpoint``): the checkpoint's View 1 dev-test accuracy
  on the images as they are (its centre crop) and on HOG-detected, ArcFace-aligned faces,
  each with its threshold chosen on ``pairsDevTrain.txt``.
* **Export parity**: max |difference| of L2-normalised embeddings, PyTorch vs onnxruntime,
  on 32 real face images and their mirror images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, set_threads  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- data


def lfw_people(lfw: Path, min_images: int = 1) -> dict[str, list[Path]]:
    people = {}
    for line in (lfw / "lfw-names.txt").read_text().splitlines():
        name, count = line.split("\t")
        if int(count) >= min_images:
            people[name] = [lfw / "lfw-deepfunneled" / name / f"{name}_{i:04d}.jpg" for i in range(1, int(count) + 1)]
    return people


def att_people(att: Path) -> dict[str, list[Path]]:
    return {f"s{i}": [att / f"s{i}" / f"{j}.pgm" for j in range(1, 11)] for i in range(1, 41)}


def lfw_subset(lfw: Path, count: int, seed: int = 0) -> list[Path]:
    files = [f for photos in lfw_people(lfw).values() for f in photos]
    if not count or count >= len(files):
        return files
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.choice(len(files), count, replace=False))]


# ---------------------------------------------------------------------- detection


def _holds_centre(face, width: int, height: int) -> bool:
    x0, y0, x1, y1 = face.box
    return x0 <= width / 2 <= x1 and y0 <= height / 2 <= y1


def compare_detectors(names: list[str], sets: dict[str, list[Path]]) -> list[dict]:
    """Detection rate, boxes per image and ms per image of each detector on each set."""
    from facecli.detect import make_detector
    from facecli.faces import photo_pixels

    detectors = {n: make_detector(n) for n in names}
    rows = []
    for set_name, files in sets.items():
        stats = {n: {"found": 0, "boxes": 0, "seconds": 0.0, "cpu": 0.0} for n in names}
        for k, path in enumerate(files):
            pixels = photo_pixels(path)
            order = names if k % 2 == 0 else names[::-1]
            for n in order:
                start, cpu = time.perf_counter(), time.process_time()
                faces = detectors[n].detect(pixels)
                stats[n]["seconds"] += time.perf_counter() - start
                stats[n]["cpu"] += time.process_time() - cpu
                hit = any(_holds_centre(f, pixels.shape[1], pixels.shape[0]) for f in faces) if set_name.startswith("LFW") else bool(faces)
                stats[n]["found"] += hit
                stats[n]["boxes"] += len(faces)
        for n in names:
            s = stats[n]
            rows.append({"set": set_name, "images": len(files), "detector": n, "detection_rate": s["found"] / len(files),
                         "boxes_per_image": s["boxes"] / len(files), "ms_per_image": 1000 * s["seconds"] / len(files),
                         "cpu_ms_per_image": 1000 * s["cpu"] / len(files)})
            print(f"  {set_name}: {n} {100 * s['found'] / len(files):.2f}%, {1000 * s['cpu'] / len(files):.1f} CPU ms/image "
                  f"({1000 * s['seconds'] / len(files):.1f} ms wall)", flush=True)
    return rows


# ----------------------------------------------------------------- identification


def unseen(people: dict[str, list[Path]], classes: list[str]) -> dict[str, list[Path]]:
    trained = set(classes)
    return {n: f for n, f in people.items() if n not in trained}


def split(people: dict[str, list[Path]], holdout_every: int):
    """(enrolled {name: first half}, genuine probes [(name, photo)], impostor photos): every Nth person held out."""
    enrol, genuine, impostors = {}, [], []
    for k, (name, photos) in enumerate(sorted(people.items())):
        if holdout_every and k % holdout_every == holdout_every - 1:
            impostors += photos
            continue
        half = len(photos) // 2
        enrol[name] = photos[:half]
        genuine += [(name, p) for p in photos[half:]]
    return enrol, genuine, impostors


def _embed(runner, photos, detector) -> dict[Path, np.ndarray]:
    from facecli.faces import embed_photos

    found = embed_photos(runner, photos, detector, largest=True, batch_size=64)
    return {r.source: e for r, e in zip(found.records, found.embeddings)}


def _gallery(runner, enrol: dict[str, list[Path]], detector):
    from facecli.gallery import build_gallery

    names = sorted(enrol)
    photos = [p for n in names for p in enrol[n]]
    vectors = _embed(runner, photos, detector)
    kept = [p for p in photos if p in vectors]
    label = {p: k for k, n in enumerate(names) for p in enrol[n]}
    return build_gallery(names, [label[p] for p in kept], np.stack([vectors[p] for p in kept]), kept, runner.identity, None)


def _top(gallery, vectors: dict, photos: list[Path]) -> tuple[np.ndarray, list]:
    """(best score, ranked names) per photo; -inf and [] where no face was found."""
    found = [p for p in photos if p in vectors]
    scores = gallery.scores(np.stack([vectors[p] for p in found])) if found else np.zeros((0, len(gallery.names)))
    by_photo = {p: s for p, s in zip(found, scores)}
    best, ranked = [], []
    for p in photos:
        s = by_photo.get(p)
        best.append(-np.inf if s is None else float(s.max()))
        ranked.append([] if s is None else [gallery.names[j] for j in np.argsort(-s, kind="stable")])
    return np.array(best), ranked


def closed_set(runner, people, detector) -> dict:
    enrol, genuine, _ = split(people, 0)
    gallery = _gallery(runner, enrol, detector)
    vectors = _embed(runner, [p for _, p in genuine], detector)
    _, ranked = _top(gallery, vectors, [p for _, p in genuine])
    truth = [n for n, _ in genuine]
    return {"people": len(enrol), "enrolled_images": int(len(gallery.labels)), "probes": len(genuine),
            "rank1": float(np.mean([r[:1] == [t] for r, t in zip(ranked, truth)])),
            "rank5": float(np.mean([t in r[:5] for r, t in zip(ranked, truth)])),
            "probes_without_face": int(sum(not r for r in ranked))}


def open_set(runner, people, detector, holdout_every: int, threshold: float | None) -> dict:
    enrol, genuine, impostors = split(people, holdout_every)
    gallery = _gallery(runner, enrol, detector)
    vectors = _embed(runner, [p for _, p in genuine] + impostors, detector)
    g_best, g_ranked = _top(gallery, vectors, [p for _, p in genuine])
    i_best, _ = _top(gallery, vectors, impostors)
    right = np.array([r[:1] == [n] for r, (n, _) in zip(g_ranked, genuine)])
    points = {}
    for label, t in [("checkpoint", threshold), ("FAR 1%", _far_threshold(i_best, 0.01)), ("FAR 10%", _far_threshold(i_best, 0.10))]:
        if t is not None:
            points[label] = {"threshold": t, "DIR": float(np.mean(right & (g_best >= t))), "FAR": float(np.mean(i_best >= t))}
    return {"enrolled_people": len(enrol), "genuine_probes": len(genuine), "impostor_people": len(people) - len(enrol),
            "impostor_probes": len(impostors), "points": points}


def _far_threshold(impostor_best: np.ndarray, far: float) -> float:
    """The smallest threshold with at most ``far`` of the impostors accepted."""
    scores = np.sort(impostor_best[np.isfinite(impostor_best)])[::-1]
    allowed = int(np.floor(far * len(impostor_best)))
    return float(np.nextafter(scores[allowed], np.inf)) if allowed < len(scores) else float(scores[-1])


def identification(checkpoint: Path, people: dict, holdout_every: int, threshold: float | None, label: str) -> list[dict]:
    from facecli.detect import make_detector
    from facecli.models import load_model

    runner = load_model(checkpoint)
    test_people = unseen(people, runner_classes(checkpoint)) or people
    threshold = threshold if threshold is not None else runner.threshold
    rows = []
    for mode, detector in (("as given (model's crop)", None), ("--detect hog, aligned", make_detector("hog"))):
        start = time.perf_counter()
        row = {"set": label, "checkpoint": str(checkpoint), "mode": mode, "closed": closed_set(runner, test_people, detector),
               "open": open_set(runner, test_people, detector, holdout_every, threshold)}
        row["seconds"] = time.perf_counter() - start
        print(f"  {label}, {mode}: rank-1 {100 * row['closed']['rank1']:.2f}% over {row['closed']['people']} people; open set {json.dumps(row['open']['points'])}", flush=True)
        rows.append(row)
    if len(test_people) < len(people):  # for reference: everyone, trained-on people included
        rows.append({"set": label, "checkpoint": str(checkpoint), "mode": "as given, all people (trained-on included)", "closed": closed_set(runner, people, None)})
        print(f"  {label}, all people: rank-1 {100 * rows[-1]['closed']['rank1']:.2f}%", flush=True)
    return rows


def runner_classes(checkpoint: Path) -> list[str]:
    from facecli.engine.checkpoint import load_checkpoint

    return list(load_checkpoint(checkpoint).get("classes", []))


# ----------------------------------------------------------------- View 1 framing


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def view1_framing(checkpoint: Path, lfw: Path) -> list[dict]:
    """View 1 dev-test accuracy of one checkpoint: the model's centre crop vs detection + alignment.

    Each mode chooses its own threshold on ``pairsDevTrain.txt`` and is scored on
    ``pairsDevTest.txt``. With ``--detect`` the largest face of each image is aligned; an
    image where HOG finds no face keeps its centre-crop embedding (counted).
    """
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.detect import make_detector
    from facecli.evaluation.protocol import best_threshold
    from facecli.models import load_model

    root = find_image_root(lfw)
    train, test = (read_pairs(lfw / f"pairsDev{s}.txt", root) for s in ("Train", "Test"))
    paths = sorted(set(train.unique_images) | set(test.unique_images))
    runner = load_model(checkpoint)
    centre = _unit(embed_each(runner, paths, None))
    rows = []
    for mode, detector in (("as given (model's crop)", None), ("--detect hog, aligned", make_detector("hog"))):
        start = time.perf_counter()
        vectors, fallbacks = centre, 0
        if detector is not None:
            found = _embed(runner, paths, detector)
            fallbacks = sum(p not in found for p in paths)
            vectors = np.stack([_unit(found[p][None])[0] if p in found else centre[k] for k, p in enumerate(paths)])
        thr, train_acc = best_threshold(_pair_scores(vectors, paths, train), train.issame)
        test_acc = float(np.mean((_pair_scores(vectors, paths, test) >= thr) == np.asarray(test.issame)))
        rows.append({"checkpoint": str(checkpoint), "mode": mode, "threshold": float(thr), "dev_train": float(train_acc),
                     "dev_test": test_acc, "images": len(paths), "no_face_centre_crop_used": fallbacks,
                     "seconds": time.perf_counter() - start})
        print(f"  View 1, {mode}: threshold {thr:.4f}, dev-test {100 * test_acc:.2f}% ({fallbacks} images without a face)", flush=True)
    return rows


def _pair_scores(vectors: np.ndarray, paths: list[Path], pair_set) -> np.ndarray:
    where = {p: k for k, p in enumerate(paths)}
    return np.array([vectors[where[a]] @ vectors[where[b]] for a, b in pair_set.pairs])


def embed_each(runner, paths: list[Path], detector) -> np.ndarray:
    found = _embed(runner, paths, detector)
    return np.stack([found[p] for p in paths])


def view1_table(rows: list[dict]) -> str:
    lines = ["| checkpoint | faces | threshold (dev-train accuracy) | dev-test | images without a face |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {Path(r['checkpoint']).parent.name} | {r['mode']} | {r['threshold']:.4f} ({100 * r['dev_train']:.2f}%) | "
                     f"{100 * r['dev_test']:.2f}% | {r['no_face_centre_crop_used']} of {r['images']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- export


def export_parity(checkpoint: Path, photos: list[Path]) -> dict:
    import torch

    from facecli.data.images import decode_image
    from facecli.export import export_model
    from facecli.models import load_model

    runner = load_model(checkpoint)
    pre = runner.preprocess
    images = torch.stack([decode_image(p, pre.image_size, pre.crop_fraction) for p in photos])
    with tempfile.TemporaryDirectory() as tmp:
        report = export_model(runner, Path(tmp) / "model.onnx", images, f"{len(photos)} real face images")
    return {"checkpoint": str(checkpoint), "images": report.images, "max_difference": report.max_difference, "opset": report.opset}


# ------------------------------------------------------------------------ tables


def detection_table(rows: list[dict]) -> str:
    lines = ["| set | detector | detected | boxes per image | CPU ms per image | wall ms per image |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['detector']} | {100 * r['detection_rate']:.1f}% | {r['boxes_per_image']:.2f} | "
                     f"{r.get('cpu_ms_per_image', float('nan')):.1f} | {r['ms_per_image']:.1f} |")
    return "\n".join(lines)


def identification_table(rows: list[dict]) -> str:
    lines = ["| set | checkpoint | faces | closed set: people, rank-1, rank-5 | open set: enrolled / impostor people | DIR at FAR 1% (t) | DIR at FAR 10% (t) | at the checkpoint's threshold: DIR, FAR |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        c, o = r["closed"], r.get("open")
        closed = f"{c['people']}, {100 * c['rank1']:.1f}%, {100 * c['rank5']:.1f}%"
        closed += f" ({c['probes_without_face']} of {c['probes']} probes without a face)" if c["probes_without_face"] else ""
        head = f"| {r['set']} | {r.get('checkpoint', '')} | {r['mode']} | {closed} |"
        if o is None:
            lines.append(f"{head} | | | |")
            continue
        pts = o["points"]
        cell = lambda k: f"{100 * pts[k]['DIR']:.1f}% ({pts[k]['threshold']:.3f})" if k in pts else "-"  # noqa: E731
        ck = pts.get("checkpoint")
        at = f"{100 * ck['DIR']:.1f}%, {100 * ck['FAR']:.1f}%" if ck else "no threshold stored"
        lines.append(f"{head} {o['enrolled_people']} / {o['impostor_people']} "
                     f"({o['genuine_probes']} + {o['impostor_probes']} probes) | {cell('FAR 1%')} | {cell('FAR 10%')} | {at} |")
    return "\n".join(lines)


def report(out: dict) -> str:
    parts = []
    if out.get("detection"):
        parts.append(detection_table(out["detection"]))
    if out.get("identification"):
        parts.append(identification_table(out["identification"]))
    if out.get("view1"):
        parts.append(view1_table(out["view1"]))
    for key in ("export", "lfw_export"):
        if out.get(key):
            e = out[key]
            parts.append(f"Export parity ({e['checkpoint']}): max |difference| {e['max_difference']:.2e} on {e['images']} real faces and their mirror images (opset {e['opset']}).")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="AT&T checkpoint (e.g. the recipe of tests/test_att_faces.py)")
    ap.add_argument("--lfw-checkpoint", type=Path, help="LFW checkpoint (e.g. benchmarks/lfw_view1.py's)")
    ap.add_argument("--threshold", type=float, default=None, help="open-set threshold (default: the checkpoint's)")
    ap.add_argument("--lfw-images", type=int, default=2000, help="LFW images for the detector comparison (0: all 13,233)")
    ap.add_argument("--detectors", default="hog,mmod,haar")
    ap.add_argument("--skip-detection", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / "raw_photos.json")
    ap.add_argument("--report", type=Path, nargs="+", help="only print the tables of earlier runs' JSON files")
    args = ap.parse_args()
    if args.report:
        merged: dict = {"detection": [], "identification": []}
        for path in args.report:
            data = json.loads(path.read_text())
            merged["detection"] += data.get("detection", [])
            merged["identification"] += data.get("identification", [])
            merged.update({k: data[k] for k in ("export", "lfw_export", "view1") if k in data})
        print(report(merged))
        return
    threads = set_threads(args.threads)
    lfw, att = SHARED / "lfw", SHARED / "att_faces"
    out = {"machine": f"{platform.machine()}, {threads} thread(s)", "python": platform.python_version()}
    if not args.skip_detection:
        print("Detection:", flush=True)
        out["detection"] = compare_detectors(args.detectors.split(","), {
            f"LFW ({args.lfw_images or 'all'} images, seed 0)": lfw_subset(lfw, args.lfw_images), "AT&T (400 images)": [f for fs in att_people(att).values() for f in fs]})
    out["identification"] = []
    if args.checkpoint:
        print("AT&T identification:", flush=True)
        out["identification"] += identification(args.checkpoint, att_people(att), 2, args.threshold, "AT&T")
        out["export"] = export_parity(args.checkpoint, [p for fs in att_people(att).values() for p in fs[:1]][:32])
        print(f"  export parity: {out['export']}", flush=True)
    if args.lfw_checkpoint:
        print("LFW identification (people with >= 4 images):", flush=True)
        out["identification"] += identification(args.lfw_checkpoint, lfw_people(lfw, 4), 5, args.threshold, "LFW")
        print("LFW View 1, centre crop vs detection + alignment:", flush=True)
        out["view1"] = view1_framing(args.lfw_checkpoint, lfw)
        out["lfw_export"] = export_parity(args.lfw_checkpoint, lfw_subset(lfw, 32, seed=1))
        print(f"  export parity: {out['lfw_export']}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(report(out))
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
