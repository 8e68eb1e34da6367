"""Commands for raw photos and deployment: ``gallery build``, ``identify``, ``export``.

Registered on facecli's Typer app when :mod:`facecli.cli` imports this module; the
``--detect`` options of ``embed`` and ``align`` come from here too (:func:`detector_for`).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from facecli.cli import DETECTOR_HELP, DetectorName, _device, _positive, _progress_factory, app, guarded
from facecli.errors import UserError
from facecli.ui import console, warn

gallery_app = typer.Typer(help="Enrol people for 1:N identification (facecli identify).", no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


class Scoring(str, Enum):
    mean = "mean"
    max = "max"


MODEL_HELP = "A facecli checkpoint (.pt) or its ONNX export (.onnx)."


def detector_for(detect: bool, name: DetectorName):
    """The detector to use, or None without --detect (images are then face crops)."""
    if not detect:
        return None
    from facecli.detect import make_detector

    return make_detector(name.value)


def _warn_photos(found) -> None:
    """Name photos without a face and unreadable ones; neither stops the command."""
    from facecli.faces import no_face_note

    if no_face_note(found):
        warn(no_face_note(found))
    for problem in found.problems:
        warn(f"skipped {problem}")


def align_detected(src: Path, dst: Path, detector, largest: bool, size: int) -> None:
    """``align --detect``: crops of every face found, and DST/detections.csv."""
    from facecli.faces import align_photos

    done = align_photos(src, dst, detector, largest, size, _progress_factory)
    _warn_photos(done.found)
    console.print(f"Aligned {len(done.written)} face(s) from {done.found.photos} photo(s) into {dst}; detections in {done.table}", markup=False)
    if done.found.problems:
        raise typer.Exit(1)


@gallery_app.command("build")
@guarded
def gallery_build(
    model_path: Path = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    people_dir: Path = typer.Argument(..., help="One folder per person (the folder name is the identity), several photos each."),
    out: Path = typer.Option(Path("gallery.npz"), "--out", help="Gallery file to write (.npz)."),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: find the largest face of each and align it first."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: int = typer.Option(0, min=0),
):
    """Enrol people: every template and each person's mean embedding, tied to the model that made them."""
    from facecli.faces import embed_photos
    from facecli.gallery import build_gallery, people_folders, save_gallery
    from facecli.models import open_model

    _positive(batch_size, "--batch-size")
    people, unread = people_folders(people_dir)
    det = detector_for(detect, detector)
    dev = _device(device)
    runner = open_model(model_path, dev)
    files = [photo for _, photos in people for photo in photos]
    label_of = {photo: k for k, (_, photos) in enumerate(people) for photo in photos}
    found = embed_photos(runner, files, det, True, dev, flip, batch_size, workers, _progress_factory)
    found.problems = unread + found.problems
    _warn_photos(found)
    if not found.records:
        raise UserError(f"No usable face in any of the {found.photos} photo(s) under {people_dir}.", hint="Check the photos, or drop --detect for face crops.")
    gallery = build_gallery([n for n, _ in people], [label_of[r.source] for r in found.records], found.embeddings,
                            [str(r.source) for r in found.records], runner.identity, det.name if det else None)
    missing = sorted(set(n for n, _ in people) - set(gallery.names))
    if missing:
        warn(f"{len(missing)} person/people had no usable photo and were not enrolled: {', '.join(missing[:5])}")
    save_gallery(gallery, out)
    console.print(f"Enrolled {len(gallery.names)} people ({len(found.records)} templates from {found.photos} photos) into {out}", markup=False)
    if found.problems:
        raise typer.Exit(1)


def _threshold(given: float | None, runner) -> float:
    if given is not None:
        return given
    if runner.threshold is None:
        raise UserError(f"{runner.path} stores no threshold, so 'unknown' cannot be decided.",
                        hint=f"Pass --threshold T, or run `facecli tune-threshold {runner.path} --save` first.")
    return float(runner.threshold)


def _identify_table(found, results, threshold: float) -> Table:
    t = Table(title=f"Identification (threshold {threshold:.4f})")
    for col in ("photo", "face", "box", "answer", "similarity", "next best"):
        t.add_column(col, justify="right" if col in ("face", "similarity") else "left")
    for record, res in zip(found.records, results):
        others = ", ".join(f"{m.name} {m.score:.3f}" for m in res.top[1:])
        box = "whole image" if record.face is None else "{:.0f},{:.0f}-{:.0f},{:.0f}".format(*record.face.box)
        t.add_row(str(record.source), str(record.index), box, res.answer, f"{res.top[0].score:.4f}", others)
    return t


def _identify_json(found, results, threshold: float, gallery_path: Path, model_path: Path) -> str:
    rows = []
    for record, res in zip(found.records, results):
        row = {"photo": str(record.source), "face": record.index, "answer": res.answer, "top": [{"name": m.name, "similarity": m.score} for m in res.top]}
        if record.face is not None:
            row.update(box=list(record.face.box), score=record.face.score, landmarks=record.face.landmarks.tolist())
        rows.append(row)
    return json.dumps({"gallery": str(gallery_path), "model": str(model_path), "threshold": threshold, "faces": rows,
                       "no_face": [str(p) for p in found.no_face], "problems": found.problems}, indent=2)


def _all_failed(found) -> None:
    """Nothing to identify: say why in one line."""
    if found.problems:
        more = f" (and {len(found.problems) - 1} more)" if len(found.problems) > 1 else ""
        raise UserError(found.problems[0] + more)
    raise UserError(f"No face found in the {found.photos} photo(s).", hint="Try --detector mmod, or give face crops without --detect.")


@app.command()
@guarded
def identify(
    gallery_path: Path = typer.Argument(..., metavar="GALLERY", help="A gallery from `facecli gallery build` (.npz)."),
    model_path: Path = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " Must be the gallery's model."),
    photos: List[Path] = typer.Argument(..., help="Photos (or folders of photos) to identify."),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: identify every face found (see --largest)."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many identities to list per face."),
    threshold: Optional[float] = typer.Option(None, help="Similarity below which the answer is 'unknown' (default: the model's tuned threshold)."),
    by: Scoring = typer.Option(Scoring.mean, help="Score a person by their mean template or their best template."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: int = typer.Option(0, min=0),
):
    """Who is this? The top-k enrolled people for each face, or "unknown" below the threshold."""
    from facecli.evaluation.embed_files import collect_images
    from facecli.faces import embed_photos
    from facecli.gallery import check_model, framing_mismatch, identify as rank
    from facecli.gallery import load_gallery
    from facecli.models import open_model

    _positive(batch_size, "--batch-size")
    gallery = load_gallery(gallery_path)
    det = detector_for(detect, detector)
    dev = _device(device)
    runner = open_model(model_path, dev)
    check_model(gallery, runner.identity, gallery_path, model_path)
    limit = _threshold(threshold, runner)
    mismatch = framing_mismatch(gallery, det.name if det is not None else None)
    if mismatch:
        warn(mismatch)
    files, _, missing = collect_images(photos)
    found = embed_photos(runner, files, det, largest, dev, flip, batch_size, workers, _progress_factory)
    found.problems = missing + found.problems
    if not found.records:
        _all_failed(found)
    results = rank(gallery, found.embeddings, limit, top_k, by.value)
    if json_out:
        console.print_json(_identify_json(found, results, limit, gallery_path, model_path))
    else:
        _warn_photos(found)
        console.print(_identify_table(found, results, limit))
    if found.problems:
        raise typer.Exit(1)


def _check_images(paths: List[Path], preprocess) -> tuple[object, str]:
    """Up to 32 face crops to compare PyTorch and onnxruntime on; (None, '') when none given."""
    import torch

    from facecli.data.images import decode_image
    from facecli.evaluation.embed_files import collect_images

    if not paths:
        return None, ""
    files, _, problems = collect_images(paths)
    if problems or not files:
        raise UserError(problems[0] if problems else f"No images in {', '.join(map(str, paths))} for --check-images.")
    files = files[:32]
    images = torch.stack([decode_image(f, preprocess.image_size, preprocess.crop_fraction) for f in files])
    return images, f"{len(files)} image(s) from {', '.join(map(str, paths))}"


@app.command()
@guarded
def export(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    out: Path = typer.Argument(..., help="The ONNX file to write (.onnx)."),
    check_images: List[Path] = typer.Option([], "--check-images", help="Face images or folders to check the export on (default: 8 synthetic faces)."),
):
    """Export the embedding network to ONNX (dynamic batch, preprocessing in the metadata) and check it against PyTorch."""
    from facecli.export import TOLERANCE, export_model
    from facecli.models import open_model

    runner = open_model(checkpoint, "cpu")
    images, source = _check_images(check_images, runner.preprocess)
    report = export_model(runner, out, images, source)
    console.print(f"Wrote {report.path} (ONNX opset {report.opset}, dynamic batch axis, input {runner.preprocess.image_size}x{runner.preprocess.image_size} RGB).", markup=False)
    console.print(
        f"onnxruntime vs PyTorch on {report.image_source} and their mirror images: max |difference| of L2-normalised embeddings "
        f"{report.max_difference:.2e} (limit {TOLERANCE:g}).",
        markup=False,
    )
