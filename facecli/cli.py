"""The ``facecli`` command line: thin Typer commands over the engine.

Each command parses flags, merges them with settings, builds objects and calls the
library. Errors a user can cause (:class:`facecli.errors.UserError`) print one line and
exit non-zero; ``facecli --debug ...`` shows the traceback too.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from facecli import __version__
from facecli.engine.runs import CHECKPOINT_NAMES
from facecli.errors import TrainingStopped, UserError
from facecli.hardware import DEVICE_HELP
from facecli.ui import console, err_console, progress, warn


class _Commands(TyperGroup):
    """The command group: plugins are loaded (and a broken one reported in one line) before any command or --help."""

    def main(self, *args, **kwargs):
        from facecli.cli_config import load_plugins

        try:
            load_plugins()
        except UserError as e:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        return super().main(*args, **kwargs)


app = typer.Typer(
    cls=_Commands,
    name="facecli",
    help="Train and evaluate margin-loss face-recognition models (SphereFace, CosFace, ArcFace, CurricularFace, FaceNet).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion: model, backbone and option choices come from the registries
    rich_markup_mode=None,
)

_state = {"debug": False}


ResumeFrom = Enum("ResumeFrom", {name: name for name in CHECKPOINT_NAMES}, type=str)  # resume --from


class DetectorName(str, Enum):
    hog = "hog"
    mmod = "mmod"
    haar = "haar"


DETECTOR_HELP = "Face detector for --detect (and the face check): hog (dlib, default), mmod (dlib CNN: turned and small faces, slower) or haar (OpenCV baseline)."
LANDMARKS_HELP = ("5 landmarks per image (left eye, right eye, nose tip, left and right mouth corner, in the photo's pixels), "
                  "paths relative to the source folder: CSV lines `path,x1,y1,...,x5,y5`; or a CSV with named columns "
                  "source (or path), lm1_x,lm1_y,...,lm5_y, such as `align --detect`'s detections.csv (face 0 of each photo); "
                  "or JSON {\"path\": [[x, y], ...5]}.")
FLIP_HELP = "Average each face's embedding with its mirror image's (as the model was evaluated); --no-flip halves the work."
BATCH_HELP = "Images per forward pass (default: 64 on a CPU, 256 on a GPU; halved on out-of-memory)."
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: the best available). ONNX models run on the CPU."
FACE_CHECK_HELP = ("Without --detect: skip photos in which the detector finds no face (default when the detect extra is installed), "
                   "so a photo of the sky is 'no face', not a person.")


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn user errors into one line and an exit code; keep tracebacks for bugs (and --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                traceback.print_exc()
            _fail(str(e), getattr(e, "exit_code", 2))
        except TrainingStopped as e:
            if _state["debug"]:
                traceback.print_exc()
            err_console.print(e.message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted.", 130)

    return wrapper


def guarded_derived(body: Callable, parameters: Callable):
    """A command whose flags derive from the settings (see :mod:`facecli.cli_config`), with ``guarded``'s errors."""
    from facecli.cli_config import DerivedCommand

    return DerivedCommand(guarded(body), parameters)


def _version(value: bool):
    if value:
        console.print(f"facecli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    _state["debug"] = debug


def _settings():
    from facecli.settings import load_settings

    return load_settings(warn=warn)


def _progress_factory(label: str, total: int):
    """A callable(advance) driving a rich bar; the bar closes when ``total`` is reached."""
    bar = progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=total)
    done = [0]

    def advance(n: int) -> None:
        bar.advance(task, n)
        done[0] += n
        if done[0] >= total:
            bar.stop()

    return advance


def _train_progress():
    return progress(loss="{task.fields[loss]}", lr="{task.fields[lr]}", ips="{task.fields[ips]}")


def _tracker_factory(settings, wandb_flag):
    from facecli.engine.tracking import tracker_factory

    return tracker_factory(settings, wandb_flag, log=_log, warn=warn)


def _print_training_result(result) -> None:
    console.print(
        f"Done: {result.epochs} epoch(s), {result.steps} steps, last loss "
        f"{result.last_loss:.4f}" if result.last_loss is not None else f"Done: {result.steps} steps",
        markup=False,
    )
    console.print(f"Run directory: {result.run_dir}", markup=False)


def _train_parameters() -> list[inspect.Parameter]:
    from facecli.cli_config import _param, choice_type, config_options, plugins_for_parameters
    from facecli.engine.config import choices

    plugins_for_parameters()
    fixed = [
        _param("model", Optional[choice_type("model", choices("model"))], typer.Argument(None, help="Loss to train (may come from --config instead).", show_default=False)),
        _param("config", Optional[Path], typer.Option(None, "--config", help="YAML, TOML or JSON file of settings (keys as in --print-config); flags override it.")),
        _param("print_config", bool, typer.Option(False, "--print-config", help="Print the resolved configuration as YAML (what --config reads) and train nothing.")),
        _param("dataset_path", Optional[Path], typer.Option(None, help="Dataset root (default: DATASET_PATH); holds CASIA-webface/ and LFW.")),
        _param("train_rec", Optional[Path], typer.Option(None, help="Folder holding insightface's train.rec/train.idx (same as --train-dir on it).")),
    ]
    return fixed + config_options()


def _train(**kw):
    """Train a model; writes <checkpoints>/<model>/<run>/ with latest.pt, min_loss.pt, epoch_NNN.pt, config.yaml."""
    from facecli.engine.config import dump_yaml
    from facecli.engine.trainer import Trainer

    settings = _settings()
    cfg = _train_config(kw, settings)
    if kw["print_config"]:
        console.print(dump_yaml(cfg), markup=False, highlight=False, end="")
        return
    trainer = Trainer(cfg, tracker_factory=_tracker_factory(settings, cfg.wandb), log=_log, warn=warn, progress_factory=_train_progress)
    result = trainer.run()
    if trainer.world.is_main:
        _print_training_result(result)


def _train_config(kw: dict, settings):
    """File < flags, validated before any data is looked at; then the data folders (not for --print-config)."""
    from facecli.cli_config import train_values, with_data_paths
    from facecli.engine.config import TrainConfig

    values, origins = train_values(kw, settings.checkpoints_dir, warn)
    cfg = TrainConfig.build(values, origins)
    root = kw["dataset_path"] or settings.dataset_path
    return with_data_paths(cfg, root, check=not kw["print_config"], root_given=kw["dataset_path"] is not None)


train = app.command("train")(guarded_derived(_train, _train_parameters))


def _log(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def _resume_parameters() -> list[inspect.Parameter]:
    from facecli.cli_config import _param, choice_type, config_options, plugins_for_parameters, resume_keys
    from facecli.engine.config import choices
    from facecli.engine.runs import MIN_LOSS_RULE

    plugins_for_parameters()
    fixed = [
        _param("model", choice_type("model", choices("model")), typer.Argument(..., help="The model of the run to continue.")),
        _param("from_", ResumeFrom, typer.Option(ResumeFrom.latest, "--from", help=f"latest, min_loss or best checkpoint of the run. {MIN_LOSS_RULE} (none before the warm-up ends); best.pt: the best View 1 dev-test accuracy (--eval-every).")),
        _param("run", Optional[str], typer.Option(None, "--run", "--run-name", help="Run name (default: the newest run of MODEL). Under torchrun write --run-name (torchrun reads --run as its own --run-path).")),
    ]
    return fixed + config_options(keys=resume_keys())


def _resume(**kw):
    """Continue a run from its latest (or min_loss/best) checkpoint, with everything restored."""
    from facecli.cli_config import given_values
    from facecli.engine.runs import prepare_resume
    from facecli.engine.trainer import Trainer

    settings = _settings()
    overrides = given_values(kw)
    checkpoints_dir = Path(overrides.pop("checkpoints_dir", None) or settings.checkpoints_dir)
    path, cfg, ckpt = prepare_resume(checkpoints_dir, kw["model"].value, kw["run"], kw["from_"].value, overrides)
    trainer = Trainer(cfg, resume_from=path, resume_checkpoint=ckpt, tracker_factory=_tracker_factory(settings, cfg.wandb), log=_log, warn=warn, progress_factory=_train_progress)
    result = trainer.run()
    if trainer.world.is_main:
        _print_training_result(result)


resume = app.command("resume")(guarded_derived(_resume, _resume_parameters))


@app.command()
@guarded
def synth(
    out_dir: Path = typer.Argument(..., help="Where to write CASIA-webface/ and 'Labeled Faces in the Wild (LFW)/'."),
    identities: int = typer.Option(200, help="Training identities."),
    test_identities: int = typer.Option(60, help="Held-out LFW-style identities (disjoint from training)."),
    images_per_identity: int = typer.Option(20, help="Images per identity."),
    image_size: int = typer.Option(112, help="Image size in pixels."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same bytes."),
):
    """Write the procedurally generated face set in the CASIA-WebFace and LFW layouts."""
    from facecli.data.synth import generate_synthetic_set

    total = (identities + test_identities) * images_per_identity
    advance = _progress_factory("generating faces", total)
    summary = generate_synthetic_set(
        out_dir, identities=identities, test_identities=test_identities, images_per_identity=images_per_identity,
        image_size=image_size, seed=seed, progress=advance,
    )
    console.print(
        f"Wrote {summary.train_images:,} training images of {summary.train_identities} identities to {summary.train_dir}\n"
        f"and {summary.test_images:,} LFW-style images of {summary.test_identities} held-out people to {summary.lfw_dir}\n"
        f"(View 2: 10 folds x {2 * summary.pairs_per_fold} pairs; View 1: {summary.dev_train_pairs} dev-train, {summary.dev_test_pairs} dev-test pairs).",
        markup=False,
    )
    console.print(f"Train with: facecli train arcface --dataset-path {str(out_dir)!r}", markup=False)


def _device(name: str | None):
    from facecli.engine.device import resolve_device

    return resolve_device(name or "auto")


def _load(checkpoint: Path, device):
    from facecli.models import load_model

    return load_model(checkpoint, device=device)


WORKERS_HELP = "DataLoader worker processes, or auto (the CPUs this process may use, less one, at most 16)."


def _embedder(checkpoint: Path, device: str | None, flip: bool, batch_size: int | None, workers: str, amp: bool = True):
    """(loaded model, its Embedder): what every evaluation command starts from."""
    from facecli.data.workers import resolve_workers
    from facecli.evaluation.embedding import Embedder

    _positive(batch_size, "--batch-size")
    try:
        workers = resolve_workers(workers)
    except ValueError:
        raise UserError(f"--workers must be a non-negative integer or auto, got {workers!r}.") from None
    dev = _device(device)
    fm = _load(checkpoint, dev)
    return fm, Embedder(fm.net, fm.preprocess, fm.device_for(dev), flip, batch_size, workers, amp)


def _lfw_for_eval(lfw_dir: Optional[Path], fm) -> Path:
    """--lfw-dir, else the checkpoint's own lfw_dir while it exists, else LFW under DATASET_PATH."""
    from facecli.data import lfw_for_evaluation

    saved = ((getattr(fm, "checkpoint", None) or {}).get("train_config") or {}).get("lfw_dir")
    return lfw_for_evaluation(lfw_dir, saved, _settings().dataset_path)


@app.command("eval-lfw")
@guarded
def eval_lfw(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: the checkpoint's own lfw_dir while it exists, else under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs file (default: the LFW folder's pairs.txt, View 2)."),
    bin: Optional[Path] = typer.Option(None, "--bin", help="Evaluate an insightface lfw.bin instead of image folders."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Flip test-time augmentation."),
    batch_size: Optional[int] = typer.Option(None, help="Embedding batch size (default: 1024 on GPU, 128 on CPU)."),
    device: Optional[str] = typer.Option(None, help=f"{DEVICE_HELP}."),
    workers: str = typer.Option("auto", help=WORKERS_HELP),
    allow_missing: bool = typer.Option(False, help="Evaluate even if some pair images are missing (they are counted)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file (pictures go beside it)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA (as in training)."),
):
    """LFW View 2: 10-fold accuracy (threshold of each fold chosen on the other nine), AUC, EER, TAR@FAR."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.reports import verification_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_pair_set, resolve_pairs_arg, save_pictures, write_json

    fm, embedder = _embedder(checkpoint, device, flip, batch_size, workers, amp)
    if bin is not None:
        ev = evaluate_bin(embedder, bin, _progress_factory)
    else:
        lfw = _lfw_for_eval(lfw_dir, fm)
        pair_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairs.txt"), find_image_root(lfw), allow_missing=allow_missing)
        ev = evaluate_pair_set(embedder, pair_set, _progress_factory, name="LFW")
    console.print(verification_table(ev.report, title=f"{ev.name} verification, {len(ev.scores)} pairs, 10-fold"))
    _warn_if_bunched(float(sorted(ev.report.fold_thresholds)[len(ev.report.fold_thresholds) // 2]), ev.scores)
    console.print(
        f"{ev.unique_images} distinct images, {ev.forward_passes} forward passes, {ev.seconds:.1f} s"
        + (f", {ev.missing} pairs missing" if ev.missing else ""),
        markup=False,
    )
    out_dir = json_out.parent if json_out else Path(checkpoint).parent
    stem = json_out.stem if json_out else f"eval_{ev.name.lower()}"
    pictures = save_pictures(ev, out_dir, stem)
    if json_out:
        data = ev.to_dict()
        data.update(checkpoint=str(checkpoint), flip=flip, pictures=[str(p) for p in pictures])
        write_json(json_out, data)
        console.print(f"Wrote {json_out}", markup=False)
    console.print(f"Pictures: {', '.join(str(p) for p in pictures)}", markup=False)


@app.command("eval")
@guarded
def eval_sets(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    bin: List[Path] = typer.Option([], "--bin", help="insightface .bin verification sets (repeatable)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="Also evaluate LFW View 2 from image folders."),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: str = typer.Option("auto", help=WORKERS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all figures to this JSON file."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA (as in training)."),
):
    """Evaluate several verification sets (.bin files, LFW folders) and report them in one table."""
    from facecli.evaluation.reports import summary_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_lfw_view2, write_json

    if not bin and lfw_dir is None:
        raise UserError("Nothing to evaluate: pass --bin FILE (repeatable) and/or --lfw-dir DIR.")
    fm, embedder = _embedder(checkpoint, device, flip, batch_size, workers, amp)
    results = []
    if lfw_dir is not None:
        results.append(evaluate_lfw_view2(embedder, lfw_dir, _progress_factory))
    for path in bin:
        results.append(evaluate_bin(embedder, path, _progress_factory))
    console.print(summary_table([(r.name, r.report) for r in results], title="Verification (10-fold)"))
    if json_out:
        write_json(json_out, {r.name: r.to_dict() for r in results})
        console.print(f"Wrote {json_out}", markup=False)


@app.command("tune-threshold")
@guarded
def tune_threshold_cmd(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: the checkpoint's own lfw_dir while it exists, else under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs to choose the threshold on (default: pairsDevTrain.txt)."),
    test_pairs: Optional[Path] = typer.Option(None, help="Pairs to report accuracy on (default: pairsDevTest.txt)."),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: str = typer.Option("auto", help=WORKERS_HELP),
    save: bool = typer.Option(False, "--save/--no-save", help="Store the threshold in the checkpoint (atomically)."),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA (as in training)."),
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
    fm, embedder = _embedder(checkpoint, device, flip, batch_size, workers, amp)
    if save and fm.kind == "onnx":
        raise UserError(f"{checkpoint} is an ONNX export; --save stores the threshold in a checkpoint.",
                        hint="Tune and save on the .pt checkpoint, then export it again.")
    if far is not None:
        from facecli.commands.operating_point import tune_far

        lfw = None if folders is not None else _lfw_for_eval(lfw_dir, fm)
        return tune_far(embedder, checkpoint, far, folders, lfw, impostor_pairs, bootstrap, seed, save, json_out, _progress_factory)
    lfw = _lfw_for_eval(lfw_dir, fm)
    root = find_image_root(lfw)
    train_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairsDevTrain.txt"), root)
    test_set = read_pairs(resolve_pairs_arg(test_pairs, lfw, "pairsDevTest.txt"), root)
    choice = tune_threshold(embedder, train_set, test_set, _progress_factory)
    console.print(threshold_table(choice.candidates, choice.accuracies, choice.threshold))
    _warn_if_bunched(choice.threshold)
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


@app.command()
@guarded
def embed(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt) or its ONNX export (.onnx)."),
    paths: List[Path] = typer.Argument(..., help="Images and/or folders (searched recursively)."),
    out: Optional[Path] = typer.Option(None, help="Output: .npz (embeddings + paths), .npy or .csv (default: embeddings.npz)."),
    compare: bool = typer.Option(False, "--compare", help="With two images: print their similarity and same/different."),
    landmarks: Optional[Path] = typer.Option(None, help="Align raw photos first with these landmarks. " + LANDMARKS_HELP),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: find every face, align it, one row per face (with box, landmarks, score)."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo."),
    face_check: bool = typer.Option(True, "--face-check/--no-face-check", help="With --compare: " + FACE_CHECK_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help=FLIP_HELP),
    batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    workers: int = typer.Option(0, min=0, help="Image-decoding worker processes (0: in this process)."),
):
    """Embed images with a trained model (L2-normalised float32), or compare two faces."""
    from facecli.evaluation.embed_files import run_embed

    _positive(batch_size, "--batch-size")
    if detect and landmarks is not None:
        raise UserError("Give either --landmarks or --detect, not both.")
    checker = photos.face_check_for(detect or landmarks is not None, face_check and compare, detector)
    code = run_embed(checkpoint, paths, out, compare, landmarks, flip, batch_size, _device(device), workers, _progress_factory,
                     photos.detector_for(detect, detector), largest, checker, overwrite)
    if code:
        raise typer.Exit(code)


@app.command()
@guarded
def pack(
    src_dir: Path = typer.Argument(..., help="Folder of identity folders."),
    out_dir: Path = typer.Argument(..., help="Where to write train.rec, train.idx, property."),
    overwrite: bool = typer.Option(False, help="Replace an existing train.rec."),
):
    """Pack identity folders into insightface's RecordIO format (train.rec/train.idx/property)."""
    from facecli.data.recordio import pack_folders

    bar = progress()
    with bar:
        task = bar.add_task("packing", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = pack_folders(src_dir, out_dir, advance, overwrite=overwrite)
    console.print(f"Packed {summary.num_images} images of {summary.num_classes} identities into {summary.out_dir}", markup=False)
    if summary.skipped:  # a count; the reasons are in skipped_files
        warn(f"Skipped {summary.skipped} unreadable image(s), e.g. {summary.skipped_files[0]}.")


@app.command()
@guarded
def align(
    src: Path = typer.Argument(..., help="An image or a folder of raw photos."),
    dst: Path = typer.Argument(..., help="Where aligned 112x112 faces are written (same relative paths)."),
    landmarks: Optional[Path] = typer.Option(None, help=LANDMARKS_HELP),
    detect: bool = typer.Option(False, "--detect", help="Find the faces and their landmarks instead (crops NAME_faceK; DST/detections.csv lists them)."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo, under the photo's own name."),
    size: int = typer.Option(112, help="Output size (the ArcFace template is scaled to it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files in DST (and, with --detect, the crops of the run that wrote DST/detections.csv)."),
):
    """Warp photos to the standard ArcFace 112x112 template from 5-point landmarks (given, or found with --detect)."""
    from facecli.align import align_folder

    if (landmarks is None) == (not detect):
        raise UserError("Give either --landmarks FILE or --detect.", hint="--detect finds faces and landmarks itself.")
    if detect:
        return photos.align_detected(src, dst, photos.detector_for(detect, detector), largest, size, overwrite)
    summary = align_folder(src, dst, landmarks, size=size, overwrite=overwrite)
    console.print(f"Aligned {len(summary.written)} image(s) into {dst}", markup=False)
    if summary.skipped:
        warn(f"{len(summary.skipped)} image(s) had no landmarks and were skipped, e.g. {summary.skipped[0]}.")
    if summary.missing:
        warn(f"{len(summary.missing)} landmarks entr(y/ies) name no file, e.g. {summary.missing[0]}.")
    if summary.unreadable:
        warn(f"{len(summary.unreadable)} image(s) could not be read, e.g. {summary.unreadable[0][0]}: {summary.unreadable[0][1]}")
        raise typer.Exit(1)


def _demo_parameters() -> list[inspect.Parameter]:
    from facecli.cli_config import _param, choice_type, config_options, plugins_for_parameters
    from facecli.demo import DEMO_SETTINGS, HEAD_SETTINGS
    from facecli.engine.config import choices

    plugins_for_parameters()
    model = choice_type("model", choices("model"))
    fixed = [
        _param("out_dir", Path, typer.Option(Path("demo"), "--out", help="Where the synthetic set and the run go.")),
        _param("model", model, typer.Option(model("arcface"), help="Loss to train.")),
        _param("identities", int, typer.Option(200, help="Synthetic training identities.")),
        _param("test_identities", int, typer.Option(60, help="Synthetic held-out identities.")),
        _param("images_per_identity", int, typer.Option(20, help="Synthetic images per identity.")),
    ]
    keys = set(DEMO_SETTINGS) - set(HEAD_SETTINGS)
    return fixed + config_options(keys=keys, defaults=DEMO_SETTINGS)


def _demo(**kw):
    """The main job on the embedded synthetic set: train on the CPU, show held-out accuracy, trained vs untrained."""
    import shlex

    from rich.table import Table

    from facecli.cli_config import given_values
    from facecli.demo import run_demo

    out_dir, model = kw["out_dir"], kw["model"].value
    res = run_demo(
        out_dir, model=model, settings=given_values(kw), identities=kw["identities"], test_identities=kw["test_identities"],
        images_per_identity=kw["images_per_identity"], log=_log, warn=warn, progress=_progress_factory, train_progress=_train_progress,
    )
    t = Table(title=f"Held-out verification: synthetic LFW View 2, {res.trained['pairs']} pairs, 10-fold")
    for col in ("network", "accuracy", "AUC", "EER"):
        t.add_column(col, justify="left" if col == "network" else "right")
    for name, r in (("untrained", res.untrained), (f"trained ({model}, {res.epochs} epochs)", res.trained)):
        t.add_row(name, f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}%", f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}%")
    console.print(t)
    if res.dev_test_accuracy is not None:
        console.print(f"View 1 dev-test accuracy at the threshold tuned on dev-train: {100 * res.dev_test_accuracy:.2f}%", markup=False)
    ckpt, lfw = str(res.run_dir / "latest.pt"), str(out_dir / "data" / "Labeled Faces in the Wild (LFW)")
    console.print(f"Run directory: {res.run_dir}", markup=False)
    console.print(f"Next: facecli eval-lfw {shlex.quote(ckpt)} --lfw-dir {shlex.quote(lfw)}", markup=False)


demo = app.command("demo")(guarded_derived(_demo, _demo_parameters))


@app.command()
@guarded
def info(checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt) or its ONNX export (.onnx).")):
    """Show what a checkpoint holds (model, backbone, data, progress, threshold, versions), or an ONNX export's metadata."""
    from rich.markup import escape
    from rich.table import Table

    rows = _onnx_rows(checkpoint) if checkpoint.suffix.lower() == ".onnx" else _checkpoint_rows(checkpoint)
    t = Table(title=escape(str(checkpoint)), show_header=False)
    for k, v in rows:
        t.add_row(k, escape(v))
    console.print(t)


def _threshold_text(threshold, far) -> str:
    if far is None:
        return f"{threshold} (verification)" if threshold is not None else "None"
    return f"{threshold} (calibrated for FAR {far})"


def _checkpoint_rows(checkpoint: Path) -> list[tuple[str, str]]:
    from facecli.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.get("train_config", {})
    return [
        ("model", ckpt["model"]),
        ("backbone", f"{ckpt['net']['backbone']}, {ckpt['net']['embedding_dim']}-d"),
        ("head", json.dumps(ckpt.get("head", {}).get("hparams", {}))),
        ("identities", f"{len(ckpt.get('classes', [])):,}"),
        ("input", json.dumps(ckpt["preprocess"])),
        ("progress", f"epoch {ckpt.get('epoch')} + {ckpt.get('batch_in_epoch')} batches, step {ckpt.get('step')}"),
        ("min epoch loss", str(ckpt.get("min_loss"))),
        ("threshold", _threshold_text(ckpt.get("threshold"), ckpt.get("threshold_far"))),
        ("trained with", f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, {cfg.get('optimizer')}/{cfg.get('scheduler')}, {cfg.get('epochs')} epochs"),
        ("versions", json.dumps(ckpt.get("versions", {}))),
    ]


def _onnx_rows(path: Path) -> list[tuple[str, str]]:
    """An ONNX export described from its facecli metadata (checked as :func:`facecli.models.load_model` checks it)."""
    from facecli.models import load_model

    model = load_model(path)
    ident = model.identity
    return [
        ("format", "facecli ONNX export (runs on onnxruntime's CPU provider)"),
        ("model", ident["model"]),
        ("backbone", f"{ident['backbone']}, {ident['embedding_dim']}-d"),
        ("input", json.dumps(model.preprocess.to_dict())),
        ("weights fingerprint", ident["fingerprint"]),
        ("threshold", _threshold_text(model.threshold, model.threshold_far)),
        ("exported from", str(model.source)),
    ]


def _warn_if_bunched(threshold: float, scores=None) -> None:
    from facecli.engine.health import warn_if_bunched

    warn_if_bunched(warn, threshold, scores)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}.")


# Raw-photo commands (gallery build, identify, export) and the --detect options above.
from facecli.commands import photos  # noqa: E402
from facecli.commands import ijb as _ijb_commands  # noqa: E402,F401  (eval-ijb, ijb-from-folders)


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS") is None and os.environ.get("LOCAL_WORLD_SIZE"):
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        app(prog_name="facecli")
    except SystemExit as e:
        _exit_now_if_wandb_left_running(e.code)
        raise
    _exit_now_if_wandb_left_running(0)


def _exit_now_if_wandb_left_running(code) -> None:
    """Exit without wandb's exit hook when W&B was left behind at the end of a run.

    That hook waits for wandb's service process, which waits out an unreachable or slow
    host (tens of seconds); the tracker already gave up on it with a warning, and the
    service process ends by itself when facecli is gone. Everything facecli writes is
    already on disk (checkpoints fsync'ed, metrics appended line by line).
    """
    tracking = sys.modules.get("facecli.engine.tracking")
    if tracking is None or not tracking.wandb_left_running():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    sys.exit(main())
