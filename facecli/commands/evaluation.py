"""Evaluation commands: ``eval-lfw``, ``eval``, ``tune-threshold`` and ``embed``.

Each starts from :func:`facecli.commands.common.embedder_for` (a model and its embedder)
and calls :mod:`facecli.evaluation`; the shared options are the aliases of
:mod:`facecli.commands.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from facecli.commands.common import (FACE_CHECK_HELP, LANDMARKS_HELP, Amp, BatchSize, Detector, DetectorName, Device, Flip, JsonOut, Largest,
                                     MinQuality, Workers, check_positive, detector_for, embedder_for, face_check_for, guarded,
                                     lfw_for_eval, pick_device, progress_factory, require_quality_score, warn_if_bunched,
                                     worker_count)
from facecli.commands.operating_point import tune_far
from facecli.errors import UserError
from facecli.ui import console


def eval_lfw(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: the checkpoint's own lfw_dir while it exists, else under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs file (default: the LFW folder's pairs.txt, View 2)."),
    bin: Optional[Path] = typer.Option(None, "--bin", help="Evaluate an insightface lfw.bin instead of image folders."),
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "auto",
    allow_missing: bool = typer.Option(False, help="Evaluate even if some pair images are missing (they are counted)."),
    json_out: JsonOut = None,
    amp: Amp = True,
    erc: bool = typer.Option(False, "--erc", help="Also draw the error-versus-reject curve: FNMR at the FAR-1e-3 threshold as the lowest-quality pairs (the worse face's feature norm) are rejected, 0-50% (PNG and JSON)."),
):
    """LFW View 2: 10-fold accuracy (threshold of each fold chosen on the other nine), AUC, EER, TAR@FAR."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.reports import verification_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_pair_set, resolve_pairs_arg, save_pictures, write_json

    fm, embedder = embedder_for(checkpoint, device, flip, batch_size, workers, amp)
    if erc:
        require_quality_score(fm.model, "--erc")
    if bin is not None:
        ev = evaluate_bin(embedder, bin, progress_factory)
    else:
        lfw = lfw_for_eval(lfw_dir, fm)
        pair_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairs.txt"), find_image_root(lfw), allow_missing=allow_missing)
        ev = evaluate_pair_set(embedder, pair_set, progress_factory, name="LFW")
    console.print(verification_table(ev.report, title=f"{ev.name} verification, {len(ev.scores)} pairs, 10-fold"))
    warn_if_bunched(float(sorted(ev.report.fold_thresholds)[len(ev.report.fold_thresholds) // 2]), ev.scores)
    console.print(
        f"{ev.unique_images} distinct images, {ev.forward_passes} forward passes, {ev.seconds:.1f} s"
        + (f", {ev.missing} pairs missing" if ev.missing else ""),
        markup=False,
    )
    out_dir = json_out.parent if json_out else Path(checkpoint).parent
    stem = json_out.stem if json_out else f"eval_{ev.name.lower()}"
    pictures = save_pictures(ev, out_dir, stem)
    if erc:
        pictures += _error_reject(ev, out_dir, stem)
    if json_out:
        data = ev.to_dict()
        data.update(checkpoint=str(checkpoint), flip=flip, pictures=[str(p) for p in pictures])
        write_json(json_out, data)
        console.print(f"Wrote {json_out}", markup=False)
    console.print(f"Pictures: {', '.join(str(p) for p in pictures)}", markup=False)


def _error_reject(ev, out_dir: Path, stem: str) -> list[Path]:
    """``eval-lfw --erc``: the curve's PNG and JSON, and one line on what rejecting 10% does."""
    from facecli.evaluation.quality import erc_of, write_erc

    if ev.pair_quality is None:
        raise UserError("--erc needs each pair's image qualities; this evaluation (a .bin set) has none.", hint="Evaluate LFW from its image folders for --erc.")
    curve = erc_of(ev)
    png, js = write_erc(curve, out_dir / f"{stem}_erc.png", out_dir / f"{stem}_erc.json")
    console.print(f"Error versus reject (threshold {curve.threshold:.4f} for FAR {curve.far:g}): FNMR {100 * curve.fnmr[0]:.2f}% "
                  f"with every pair, {100 * curve.fnmr_at(0.1):.2f}% with the lowest-quality 10% rejected.", markup=False)
    return [png, js]


def eval_sets(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    bin: List[Path] = typer.Option([], "--bin", help="insightface .bin verification sets (repeatable)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="Also evaluate LFW View 2 from image folders."),
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "auto",
    json_out: JsonOut = None,
    amp: Amp = True,
):
    """Evaluate several verification sets (.bin files, LFW folders) and report them in one table."""
    from facecli.evaluation.reports import summary_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_lfw_view2, write_json

    if not bin and lfw_dir is None:
        raise UserError("Nothing to evaluate: pass --bin FILE (repeatable) and/or --lfw-dir DIR.")
    fm, embedder = embedder_for(checkpoint, device, flip, batch_size, workers, amp)
    results = []
    if lfw_dir is not None:
        results.append(evaluate_lfw_view2(embedder, lfw_dir, progress_factory))
    for path in bin:
        results.append(evaluate_bin(embedder, path, progress_factory))
    console.print(summary_table([(r.name, r.report) for r in results], title="Verification (10-fold)"))
    if json_out:
        write_json(json_out, {r.name: r.to_dict() for r in results})
        console.print(f"Wrote {json_out}", markup=False)


def tune_threshold_cmd(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: the checkpoint's own lfw_dir while it exists, else under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs to choose the threshold on (default: pairsDevTrain.txt)."),
    test_pairs: Optional[Path] = typer.Option(None, help="Pairs to report accuracy on (default: pairsDevTest.txt)."),
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "auto",
    save: bool = typer.Option(False, "--save/--no-save", help="Store the threshold in the checkpoint (atomically)."),
    json_out: JsonOut = None,
    amp: Amp = True,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing picture (CHECKPOINT-NAME_threshold_curve.png) and --json file."),
    far: Optional[float] = typer.Option(None, "--far", help="Instead: the threshold for this false-accept rate (e.g. 1e-4), with identity-bootstrap intervals and a held-out check."),
    folders: Optional[Path] = typer.Option(None, "--folders", help="With --far: your identity folders (default: the LFW people of peopleDevTest.txt)."),
    impostor_pairs: int = typer.Option(1_000_000, help="With --far: at most this many impostor pairs per half (seeded sample)."),
    bootstrap: int = typer.Option(300, help="With --far: bootstrap resamples of identities."),
    seed: int = typer.Option(0, help="With --far: seed of the identity split, impostor sample and bootstrap."),
):
    """Choose the verification threshold on View 1 training pairs and report View 1 test accuracy (or, with --far, a FAR operating point).

    Writes CHECKPOINT-NAME_threshold_curve.png beside the checkpoint (or the --json file)."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.engine.checkpoint import set_threshold
    from facecli.evaluation.reports import save_threshold_curve, threshold_table
    from facecli.evaluation.runner import resolve_pairs_arg, tune_threshold, write_json

    out_dir = json_out.parent if json_out else Path(checkpoint).parent
    picture = out_dir / f"{Path(checkpoint).stem}_threshold_curve.png"
    for path in (picture, json_out):
        if path is not None and path.exists() and not overwrite:
            raise UserError(f"{path} already exists.", hint="Pass --overwrite to replace it, or --json elsewhere.")
    fm, embedder = embedder_for(checkpoint, device, flip, batch_size, workers, amp)
    if save and fm.kind == "onnx":
        raise UserError(f"{checkpoint} is an ONNX export; --save stores the threshold in a checkpoint.",
                        hint="Tune and save on the .pt checkpoint, then export it again.")
    if far is not None:
        lfw = None if folders is not None else lfw_for_eval(lfw_dir, fm)
        return tune_far(embedder, checkpoint, far, folders, lfw, impostor_pairs, bootstrap, seed, save, json_out, progress_factory)
    lfw = lfw_for_eval(lfw_dir, fm)
    root = find_image_root(lfw)
    train_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairsDevTrain.txt"), root)
    test_set = read_pairs(resolve_pairs_arg(test_pairs, lfw, "pairsDevTest.txt"), root)
    choice = tune_threshold(embedder, train_set, test_set, progress_factory)
    console.print(threshold_table(choice.candidates, choice.accuracies, choice.threshold))
    warn_if_bunched(choice.threshold)
    console.print(
        f"Threshold {choice.threshold:.4f}: training-pairs accuracy {100 * choice.train_accuracy:.2f}% ({choice.train_pairs} pairs), "
        f"test-pairs accuracy {100 * choice.test_accuracy:.2f}% ({choice.test_pairs} pairs).",
        markup=False,
    )
    picture = save_threshold_curve(choice.candidates, choice.accuracies, choice.threshold, picture)
    console.print(f"Picture: {picture}", markup=False)
    if save:
        set_threshold(checkpoint, choice.threshold, f"tune-threshold on {Path(pairs or 'pairsDevTrain.txt').name}")
        console.print(f"Stored threshold {choice.threshold:.4f} in {checkpoint}", markup=False)
    if json_out:
        write_json(json_out, {**choice.to_dict(), "checkpoint": str(checkpoint), "picture": str(picture)})
        console.print(f"Wrote {json_out}", markup=False)


def embed(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt) or its ONNX export (.onnx)."),
    paths: List[Path] = typer.Argument(..., help="Images and/or folders (searched recursively)."),
    out: Optional[Path] = typer.Option(None, help="Output: .npz (embeddings + paths), .npy or .csv (default: embeddings.npz)."),
    compare: bool = typer.Option(False, "--compare", help="With two images: print their similarity and same/different."),
    landmarks: Optional[Path] = typer.Option(None, help="Align raw photos first with these landmarks. " + LANDMARKS_HELP),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: find every face, align it, one row per face (with box, landmarks, score)."),
    detector: Detector = DetectorName.hog,
    largest: Largest = False,
    face_check: bool = typer.Option(True, "--face-check/--no-face-check", help="With --compare: " + FACE_CHECK_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    min_quality: MinQuality = None,
    flip: Flip = True,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "0",
):
    """Embed images with a trained model (L2-normalised float32, each face's quality beside it), or compare two faces."""
    from facecli.evaluation.embed_files import run_embed

    check_positive(batch_size, "--batch-size")
    if detect and landmarks is not None:
        raise UserError("Give either --landmarks or --detect, not both.")
    if min_quality is not None and not compare:
        raise UserError("--min-quality decides two faces with --compare; a written file keeps every face with its quality.",
                        hint="Add --compare, or filter the file's quality column yourself.")
    checker = face_check_for(detect or landmarks is not None, face_check and compare, detector)
    code = run_embed(checkpoint, paths, out, compare, landmarks, flip, batch_size, pick_device(device), worker_count(workers), progress_factory,
                     detector_for(detect, detector), largest, checker, overwrite, min_quality)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("eval-lfw")(guarded(eval_lfw))
    app.command("eval")(guarded(eval_sets))
    app.command("tune-threshold")(guarded(tune_threshold_cmd))
    app.command("embed")(guarded(embed))
