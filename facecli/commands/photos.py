"""Commands for raw photos and deployment: ``align``, ``gallery build``, ``identify``, ``export``.

:func:`register` adds them to the app :mod:`facecli.cli` assembles.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rich.markup import escape

from facecli.commands.common import (LANDMARKS_HELP, BatchSize, Detector, DetectorName, Device, FaceCheck, Flip, Largest, MinQuality, Workers,
                                     check_min_quality, check_positive, detector_for, face_check_for, guarded, pick_device, progress_factory, worker_count)
from facecli.errors import UserError
from facecli.ui import console, warn



class Scoring(str, Enum):
    mean = "mean"
    max = "max"


MODEL_HELP = "A facecli checkpoint (.pt) or its ONNX export (.onnx)."


def _warn_photos(found) -> None:
    """Name photos without a face and unreadable ones; neither stops the command."""
    from facecli.faces import no_face_note

    if no_face_note(found):
        warn(no_face_note(found))
    for problem in found.problems:
        warn(f"skipped {problem}")


def align_detected(src: Path, dst: Path, detector, largest: bool, size: int, overwrite: bool = False) -> None:
    """``align --detect``: crops of every face found, and DST/detections.csv."""
    from facecli.faces import align_photos

    done = align_photos(src, dst, detector, largest, size, progress_factory, overwrite)
    _warn_photos(done.found)
    console.print(f"Aligned {len(done.written)} face(s) from {done.found.photos} photo(s) into {dst}; detections in {done.table}", markup=False)
    if done.found.problems:
        raise typer.Exit(1)


def gallery_build(
    model_path: Path = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    people_dir: Path = typer.Argument(..., help="One folder per person (the folder name is the identity), several photos each."),
    out: Path = typer.Option(Path("gallery.npz"), "--out", help="Gallery file to write (.npz)."),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: find the largest face of each and align it first."),
    detector: Detector = DetectorName.hog,
    face_check: FaceCheck = True,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "0",
):
    """Enrol people: every template and each person's mean embedding, tied to the model that made them."""
    from facecli.evaluation.embed_files import check_output
    from facecli.faces import embed_photos
    from facecli.gallery import build_gallery, calibrate, people_folders, save_gallery
    from facecli.models import load_model

    check_positive(batch_size, "--batch-size")
    check_output(out, overwrite)
    people, unread = people_folders(people_dir)
    det = detector_for(detect, detector)
    checker = face_check_for(detect, face_check, detector)
    dev = pick_device(device)
    runner = load_model(model_path, dev)
    files = [photo for _, photos in people for photo in photos]
    label_of = {photo: k for k, (_, photos) in enumerate(people) for photo in photos}
    found = embed_photos(runner, files, det, True, dev, flip, batch_size, worker_count(workers), progress_factory, checker)
    found.problems = unread + found.problems
    _warn_photos(found)
    if not found.records:
        raise UserError(f"No usable face in any of the {found.photos} photo(s) under {people_dir}.",
                        hint="Check the photos" + (", or drop --detect for face crops." if detect else "."))
    gallery = build_gallery([n for n, _ in people], [label_of[r.source] for r in found.records], found.embeddings,
                            [str(r.source) for r in found.records], runner.identity, det.name if det else None)
    missing = sorted(set(n for n, _ in people) - set(gallery.names))
    if missing:
        warn(f"{len(missing)} person/people had no usable photo and were not enrolled: {', '.join(missing[:5])}")
    save_gallery(gallery, out)
    console.print(f"Enrolled {len(gallery.names)} people ({len(found.records)} templates from {found.photos} photos) into {out}", markup=False)
    point = calibrate(gallery)
    if point is not None:
        console.print(f"Open-set threshold {point.threshold:.4f}, {point.source}.", markup=False)
    if found.problems:
        raise typer.Exit(1)


def operating_point(given: float | None, gallery, runner, by: str, far: float):
    """The open-set threshold: --threshold, else calibrated on the gallery, else the model's FAR-calibrated one.

    A threshold stored without a FAR is View 1's accuracy-optimal *verification* threshold:
    it says nothing about how often a stranger is named, so it is never used here.
    """
    from facecli.gallery import OperatingPoint, calibrate, check_threshold

    if given is not None:
        return OperatingPoint(check_threshold(given), "given with --threshold")
    if not 0.0 < far < 1.0:
        raise UserError(f"--far must be between 0 and 1, got {far}.", hint="e.g. --far 0.01 (1 stranger in 100 named).")
    calibrated = calibrate(gallery, by, far)
    if calibrated is not None:
        return calibrated
    if runner.threshold is not None and runner.threshold_far is not None:
        return OperatingPoint(float(runner.threshold), f"stored in {runner.path} for a 1:1 FAR of {runner.threshold_far:g}", runner.threshold_far)
    raise UserError(f"No open-set threshold: the gallery has one person (nothing to calibrate on) and {runner.path} stores no FAR-calibrated threshold.",
                    hint="Enrol at least two people, pass --threshold T, or run `facecli tune-threshold MODEL --far 0.01 --save`.")


def _identify_table(found, results, point) -> Table:
    t = Table(title=f"Identification (threshold {point.threshold:.4f}: {escape(point.source)})")
    width = max([len(r.answer) for r in results] + [6])
    for col in ("photo", "face", "box", "answer", "similarity", "quality", "next best"):
        t.add_column(col, justify="right" if col in ("face", "similarity", "quality") else "left", overflow="fold",
                     min_width=width if col == "answer" else None, no_wrap=col == "answer")
    for record, res in zip(found.records, results):
        others = ", ".join(f"{escape(m.name)} {m.score:.3f}" for m in res.top[1:])
        box = "whole image" if record.face is None else "{:.0f},{:.0f}-{:.0f},{:.0f}".format(*record.face.box)
        t.add_row(escape(str(record.source)), str(record.index), box, escape(res.answer), f"{res.top[0].score:.4f}", _quality_text(res.quality), others)
    return t


def _quality_text(quality: float | None) -> str:
    return "" if quality is None else f"{quality:.3g}"


def _identify_json(found, results, point, gallery_path: Path, model_path: Path) -> str:
    rows = []
    for record, res in zip(found.records, results):
        row = {"photo": str(record.source), "face": record.index, "answer": res.answer, "quality": res.quality,
               "top": [{"name": m.name, "similarity": m.score} for m in res.top]}
        if record.face is not None:
            row.update(box=list(record.face.box), score=record.face.score, landmarks=record.face.landmarks.tolist())
        rows.append(row)
    return json.dumps({"gallery": str(gallery_path), "model": str(model_path), "threshold": point.threshold, "operating_point": point.as_dict(),
                       "faces": rows, "no_face": [str(p) for p in found.no_face], "problems": found.problems}, indent=2, allow_nan=False)


def _all_failed(found, detected: bool) -> None:
    """Nothing to identify: say why in one line (the hint names --detect only when it was used)."""
    if found.problems:
        more = f" (and {len(found.problems) - 1} more)" if len(found.problems) > 1 else ""
        raise UserError(found.problems[0] + more)
    if found.photos == 0:
        raise UserError("No images to identify.", hint="Give photos or folders holding .jpg/.png images.")
    hint = "Try --detector mmod, or give face crops without --detect." if detected else "Try --detector mmod, or check that the photos show faces."
    raise UserError(f"No face found in the {found.photos} photo(s).", hint=hint)


def identify(
    gallery_path: Path = typer.Argument(..., metavar="GALLERY", help="A gallery from `facecli gallery build` (.npz)."),
    model_path: Path = typer.Argument(..., metavar="MODEL", help=MODEL_HELP + " Must be the gallery's model."),
    photos: List[Path] = typer.Argument(..., help="Photos (or folders of photos) to identify."),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: identify every face found (see --largest)."),
    detector: Detector = DetectorName.hog,
    largest: Largest = False,
    face_check: FaceCheck = True,
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many identities to list per face."),
    threshold: Optional[float] = typer.Option(None, help="Similarity below which the answer is 'unknown' (default: calibrated on the gallery for --far)."),
    far: float = typer.Option(0.01, "--far", help="Without --threshold: the share of strangers allowed a name, calibrated leave-one-out on the gallery's photos."),
    by: Scoring = typer.Option(Scoring.mean, help="Score a person by their mean template or their best template."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    min_quality: MinQuality = None,
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "0",
):
    """Who is this? "No face" first, then the top-k enrolled people for each face, or "unknown" below the open-set threshold."""
    from facecli.data.files import collect_images
    from facecli.faces import embed_photos
    from facecli.gallery import check_model, framing_mismatch, identify as rank
    from facecli.gallery import load_gallery
    from facecli.models import load_model

    check_positive(batch_size, "--batch-size")
    gallery = load_gallery(gallery_path)
    det = detector_for(detect, detector)
    dev = pick_device(device)
    runner = load_model(model_path, dev)
    check_model(gallery, runner.identity, gallery_path, model_path)
    check_min_quality(min_quality, runner.model)
    point = operating_point(threshold, gallery, runner, by.value, far)
    mismatch = framing_mismatch(gallery, det.name if det is not None else None)
    if mismatch:
        warn(mismatch)
    checker = face_check_for(detect, face_check, detector)
    files, _, missing = collect_images(photos)
    found = embed_photos(runner, files, det, largest, dev, flip, batch_size, worker_count(workers), progress_factory, checker)
    found.problems = missing + found.problems
    if not found.records:
        _all_failed(found, detect)
    results = rank(gallery, found.embeddings, point.threshold, top_k, by.value, quality=found.quality, min_quality=min_quality)
    if json_out:
        console.print_json(_identify_json(found, results, point, gallery_path, model_path))
    else:
        _warn_photos(found)
        console.print(_identify_table(found, results, point))
    if found.problems:
        raise typer.Exit(1)


def _check_images(paths: List[Path], preprocess) -> tuple[object, str, list[str]]:
    """Up to 32 face crops to compare PyTorch and onnxruntime on, and the files skipped; (None, '', []) when none given."""
    import torch

    from facecli.data.files import collect_images
    from facecli.data.images import decode_image
    from facecli.errors import ImageError

    if not paths:
        return None, "", []
    files, _, skipped = collect_images(paths)
    images = []
    for f in files:
        if len(images) == 32:
            break
        try:
            images.append(decode_image(f, preprocess.image_size, preprocess.crop_fraction))
        except ImageError as e:
            skipped.append(str(e))
    if not images:
        raise UserError((skipped[0] + "; " if skipped else "") + f"no readable image in {', '.join(map(str, paths))} for --check-images.")
    return torch.stack(images), f"{len(images)} image(s) from {', '.join(map(str, paths))}", skipped


def export(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    out: Path = typer.Argument(..., help="The ONNX file to write (.onnx)."),
    check_images: List[Path] = typer.Option([], "--check-images", help="Face images or folders to check the export on (default: 8 synthetic faces); unreadable ones are skipped and named."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT file."),
):
    """Export the embedding network to ONNX (dynamic batch, preprocessing in the metadata) and check it against PyTorch."""
    from facecli.export import TOLERANCE, export_model
    from facecli.models import load_model

    runner = load_model(checkpoint, "cpu")
    images, source, skipped = _check_images(check_images, runner.preprocess)
    for problem in skipped:
        warn(f"--check-images: skipped {problem}")
    report = export_model(runner, out, images, source, overwrite=overwrite)
    console.print(f"Wrote {report.path} (ONNX opset {report.opset}, dynamic batch axis, input {runner.preprocess.image_size}x{runner.preprocess.image_size} RGB).", markup=False)
    console.print(
        f"onnxruntime vs PyTorch on {report.image_source} and their mirror images: max |difference| of L2-normalised embeddings "
        f"{report.max_difference:.2e} (limit {TOLERANCE:g}).",
        markup=False,
    )


def align(
    src: Path = typer.Argument(..., help="An image or a folder of raw photos."),
    dst: Path = typer.Argument(..., help="Where aligned 112x112 faces are written (same relative paths)."),
    landmarks: Optional[Path] = typer.Option(None, help=LANDMARKS_HELP),
    detect: bool = typer.Option(False, "--detect", help="Find the faces and their landmarks instead (crops NAME_faceK; DST/detections.csv lists them)."),
    detector: Detector = DetectorName.hog,
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo, under the photo's own name."),
    size: int = typer.Option(112, help="Output size (the ArcFace template is scaled to it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files in DST (and, with --detect, the crops of the run that wrote DST/detections.csv)."),
):
    """Warp photos to the standard ArcFace 112x112 template from 5-point landmarks (given, or found with --detect)."""
    from facecli.align import align_folder

    if (landmarks is None) == (not detect):
        raise UserError("Give either --landmarks FILE or --detect.", hint="--detect finds faces and landmarks itself.")
    if detect:
        return align_detected(src, dst, detector_for(detect, detector), largest, size, overwrite)
    summary = align_folder(src, dst, landmarks, size=size, overwrite=overwrite)
    console.print(f"Aligned {len(summary.written)} image(s) into {dst}", markup=False)
    if summary.skipped:
        warn(f"{len(summary.skipped)} image(s) had no landmarks and were skipped, e.g. {summary.skipped[0]}.")
    if summary.missing:
        warn(f"{len(summary.missing)} landmarks entr(y/ies) name no file, e.g. {summary.missing[0]}.")
    if summary.unreadable:
        warn(f"{len(summary.unreadable)} image(s) could not be read, e.g. {summary.unreadable[0][0]}: {summary.unreadable[0][1]}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("align")(guarded(align))
    gallery = typer.Typer(help="Enrol people for 1:N identification (facecli identify).", no_args_is_help=True)
    gallery.command("build")(guarded(gallery_build))
    app.add_typer(gallery, name="gallery")
    app.command("identify")(guarded(identify))
    app.command("export")(guarded(export))
