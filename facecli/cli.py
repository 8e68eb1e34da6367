"""The ``facecli`` command line: thin Typer commands over the engine.

Each command parses flags, merges them with settings, builds objects and calls the
library. Errors a user can cause (:class:`facecli.errors.UserError`) print one line and
exit non-zero; ``facecli --debug ...`` shows the traceback too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape

from facecli import __version__
from facecli.errors import TrainingStopped, UserError
from facecli.ui import console, err_console, progress, warn

app = typer.Typer(
    name="facecli",
    help="Train and evaluate margin-loss face-recognition models (SphereFace, CosFace, ArcFace, CurricularFace, FaceNet).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


class Model(str, Enum):
    sphereface = "sphereface"
    cosface = "cosface"
    arcface = "arcface"
    curricularface = "curricularface"
    facenet = "facenet"


class Backbone(str, Enum):
    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"
    resnet101 = "resnet101"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Scheduler(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


class ResumeFrom(str, Enum):
    latest = "latest"
    min_loss = "min_loss"
    best = "best"


class DetectorName(str, Enum):
    hog = "hog"
    mmod = "mmod"
    haar = "haar"


DETECTOR_HELP = "Face detector for --detect: hog (dlib, default), mmod (dlib CNN: turned and small faces, slower) or haar (OpenCV baseline)."


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


@app.command()
@guarded
def train(
    model: Model = typer.Argument(..., help="Loss: sphereface, cosface, arcface, curricularface or facenet."),
    dataset_path: Optional[Path] = typer.Option(None, help="Dataset root (default: DATASET_PATH); holds CASIA-webface/ and LFW."),
    train_dir: Optional[Path] = typer.Option(None, help="Folder of identity folders, or of train.rec/train.idx (default: under the dataset root)."),
    train_rec: Optional[Path] = typer.Option(None, help="Folder holding insightface's train.rec/train.idx (same as --train-dir on it)."),
    identities: Optional[Path] = typer.Option(None, help="Train only on the identities listed in this file (e.g. LFW's peopleDevTrain.txt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder for evaluation (default: under the dataset root)."),
    backbone: Backbone = typer.Option(Backbone.resnet50, help="Backbone network."),
    pretrained: bool = typer.Option(False, "--pretrained/--no-pretrained", help="Start the backbone from ImageNet weights."),
    embedding_dim: Optional[int] = typer.Option(None, help="Embedding size (default 512; 128 for facenet)."),
    epochs: int = typer.Option(20, help="Epochs to train."),
    batch_size: int = typer.Option(128, help="Batch size per process."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 0.1 for SGD, 1e-3 for AdamW)."),
    optimizer: Optimizer = typer.Option(Optimizer.sgd, help="sgd (momentum 0.9) or adamw."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay (not applied to norms and biases)."),
    scheduler: Scheduler = typer.Option(Scheduler.cosine, help="Learning-rate schedule after warm-up."),
    warmup_epochs: float = typer.Option(0.0, help="Linear warm-up length in epochs."),
    milestones: Optional[str] = typer.Option(None, help="Step schedule: comma-separated epochs where lr drops x0.1."),
    margin: Optional[float] = typer.Option(None, help="Margin m (head default) or FaceNet's triplet margin (0.2)."),
    scale: Optional[float] = typer.Option(None, help="Scale s of the margin head (head default)."),
    curricular_momentum: Optional[float] = typer.Option(None, help="CurricularFace's t momentum (0.01)."),
    images_per_identity: int = typer.Option(4, help="FaceNet: K images per identity in each P x K batch."),
    image_size: int = typer.Option(112, help="Input size in pixels (square)."),
    crop_fraction: Optional[float] = typer.Option(None, help="Centre crop before resizing (default: 0.6 for 250x250 images, else 1)."),
    dropout: float = typer.Option(0.0, help="Dropout before the embedding layer."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA (bf16 where supported, else fp16)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="NHWC layout (default: on for CUDA)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    workers: int = typer.Option(4, min=0, help="DataLoader worker processes."),
    seed: int = typer.Option(0, help="Random seed (data order, flips, initialisation)."),
    checkpoints_dir: Optional[Path] = typer.Option(None, help="Where runs are written (default: CHECKPOINTS_DIR or ./checkpoints)."),
    run_name: Optional[str] = typer.Option(None, help="Run directory name (default: a timestamp)."),
    checkpoint_every: int = typer.Option(0, help="Also save latest.pt every N steps (0: at epoch ends only)."),
    log_every: int = typer.Option(10, help="Log loss, lr and images/s to metrics.jsonl (and W&B) every N steps."),
    eval: bool = typer.Option(True, "--eval/--no-eval", help="Tune the threshold on View 1 and report View 2 at the end."),
    eval_every: int = typer.Option(0, help="Evaluate View 1 every N epochs and keep best.pt (0: never)."),
    val_bin: List[Path] = typer.Option([], "--val-bin", help="insightface .bin sets to evaluate (repeatable)."),
    sharded_head: bool = typer.Option(False, "--sharded-head/--no-sharded-head", help="Shard the class weights across processes (Partial FC style)."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Track in Weights & Biases (default: on when a key is set)."),
    wandb_artifacts: bool = typer.Option(False, help="Upload checkpoints as W&B artifacts."),
):
    """Train a model; writes <checkpoints>/<model>/<run>/ with latest.pt, min_loss.pt, epoch_NNN.pt."""
    from facecli.data import resolve_lfw_dir, resolve_train_dir
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer

    settings = _settings()
    root = dataset_path or settings.dataset_path
    if dataset_path is None and root is not None and train_dir is None and train_rec is None and not Path(root).expanduser().is_dir():
        raise UserError(f"DATASET_PATH {str(root)!r} does not exist or is not a directory.", hint="Fix DATASET_PATH or pass --dataset-path.")
    chosen_train = resolve_train_dir(train_rec or train_dir, root)
    chosen_lfw = resolve_lfw_dir(lfw_dir, root)
    cfg = TrainConfig(
        model=model.value,
        train_dir=str(chosen_train),
        identities_file=str(identities) if identities else None,
        lfw_dir=str(chosen_lfw) if chosen_lfw else None,
        backbone=backbone.value,
        pretrained=pretrained,
        embedding_dim=embedding_dim,
        dropout=dropout,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer.value,
        weight_decay=weight_decay,
        scheduler=scheduler.value,
        warmup_epochs=warmup_epochs,
        milestones=_int_list(milestones, "--milestones"),
        margin=margin,
        scale=scale,
        curricular_momentum=curricular_momentum,
        images_per_identity=images_per_identity,
        image_size=image_size,
        crop_fraction=crop_fraction,
        device=device,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        workers=workers,
        seed=seed,
        run_name=run_name,
        checkpoints_dir=str(checkpoints_dir or settings.checkpoints_dir),
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        eval=eval,
        eval_every=eval_every,
        val_bins=[str(p) for p in val_bin],
        sharded_head=sharded_head,
        wandb=wandb,
        wandb_artifacts=wandb_artifacts,
    )
    trainer = Trainer(cfg, tracker_factory=_tracker_factory(settings, wandb), log=_log, warn=warn, progress_factory=_train_progress)
    result = trainer.run()
    if trainer.world.is_main:
        _print_training_result(result)


def _log(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated epoch numbers, got {text!r}.")
    if any(v <= 0 for v in values):
        raise UserError(f"{flag} epochs must be positive, got {text!r}.")
    return values


@app.command()
@guarded
def resume(
    model: Model = typer.Argument(..., help="The model of the run to continue."),
    from_: ResumeFrom = typer.Option(ResumeFrom.latest, "--from", help="latest, min_loss or best checkpoint of the run."),
    run: Optional[str] = typer.Option(None, "--run", "--run-name", help="Run name (default: the newest run of MODEL). Under torchrun write --run-name (torchrun reads --run as its own --run-path)."),
    epochs: Optional[int] = typer.Option(None, help="Train until this many epochs in total (default: the run's)."),
    checkpoints_dir: Optional[Path] = typer.Option(None, help="Where runs are (default: CHECKPOINTS_DIR or ./checkpoints)."),
    train_dir: Optional[Path] = typer.Option(None, help="Training data, if it moved since the run started."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default: the run's)."),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes (default: the run's)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA (default: the run's)."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Track in Weights & Biases."),
):
    """Continue a run from its latest (or min_loss/best) checkpoint, with everything restored."""
    from facecli.engine.runs import prepare_resume
    from facecli.engine.trainer import Trainer

    settings = _settings()
    path, cfg, ckpt = prepare_resume(
        Path(checkpoints_dir or settings.checkpoints_dir), model.value, run, from_.value,
        epochs=epochs, train_dir=train_dir, device=device, workers=workers, amp=amp, wandb=wandb,
    )
    trainer = Trainer(cfg, resume_from=path, resume_checkpoint=ckpt, tracker_factory=_tracker_factory(settings, wandb), log=_log, warn=warn, progress_factory=_train_progress)
    result = trainer.run()
    if trainer.world.is_main:
        _print_training_result(result)


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
    from facecli.engine.trainer import resolve_device

    return resolve_device(name or "auto")


def _load(checkpoint: Path, device):
    from facecli.engine.checkpoint import load_model

    return load_model(checkpoint, device=device)


def _lfw_for_eval(lfw_dir: Optional[Path]) -> Path:
    from facecli.data import resolve_lfw_dir

    settings = _settings()
    found = resolve_lfw_dir(lfw_dir, settings.dataset_path)
    if found is None:
        raise UserError("No LFW folder: pass --lfw-dir or set DATASET_PATH to a folder holding 'Labeled Faces in the Wild (LFW)' or lfw/.")
    return found


@app.command("eval-lfw")
@guarded
def eval_lfw(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs file (default: the LFW folder's pairs.txt, View 2)."),
    bin: Optional[Path] = typer.Option(None, "--bin", help="Evaluate an insightface lfw.bin instead of image folders."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Flip test-time augmentation."),
    batch_size: Optional[int] = typer.Option(None, help="Embedding batch size (default: 1024 on GPU, 128 on CPU)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    allow_missing: bool = typer.Option(False, help="Evaluate even if some pair images are missing (they are counted)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file (pictures go beside it)."),
):
    """LFW View 2: 10-fold accuracy (threshold of each fold chosen on the other nine), AUC, EER, TAR@FAR."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.reports import verification_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_pair_set, resolve_pairs_arg, save_pictures, write_json

    _positive(batch_size, "--batch-size")
    dev = _device(device)
    fm = _load(checkpoint, dev)
    if bin is not None:
        ev = evaluate_bin(fm.net, fm.preprocess, bin, dev, flip, batch_size, workers, _progress_factory)
    else:
        lfw = _lfw_for_eval(lfw_dir)
        pair_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairs.txt"), find_image_root(lfw), allow_missing=allow_missing)
        ev = evaluate_pair_set(fm.net, fm.preprocess, pair_set, dev, flip, batch_size, workers, _progress_factory, name="LFW")
    console.print(verification_table(ev.report, title=f"{ev.name} verification, {len(ev.scores)} pairs, 10-fold"))
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
    workers: int = typer.Option(2, min=0),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all figures to this JSON file."),
):
    """Evaluate several verification sets (.bin files, LFW folders) and report them in one table."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.reports import summary_table
    from facecli.evaluation.runner import evaluate_bin, evaluate_pair_set, lfw_pair_file, write_json

    if not bin and lfw_dir is None:
        raise UserError("Nothing to evaluate: pass --bin FILE (repeatable) and/or --lfw-dir DIR.")
    _positive(batch_size, "--batch-size")
    dev = _device(device)
    fm = _load(checkpoint, dev)
    results = []
    if lfw_dir is not None:
        pair_set = read_pairs(lfw_pair_file(lfw_dir, "pairs.txt"), find_image_root(lfw_dir))
        results.append(evaluate_pair_set(fm.net, fm.preprocess, pair_set, dev, flip, batch_size, workers, _progress_factory, name="LFW"))
    for path in bin:
        results.append(evaluate_bin(fm.net, fm.preprocess, path, dev, flip, batch_size, workers, _progress_factory))
    console.print(summary_table([(r.name, r.report) for r in results], title="Verification (10-fold)"))
    if json_out:
        write_json(json_out, {r.name: r.to_dict() for r in results})
        console.print(f"Wrote {json_out}", markup=False)


@app.command("tune-threshold")
@guarded
def tune_threshold_cmd(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    lfw_dir: Optional[Path] = typer.Option(None, help="LFW folder (default: under DATASET_PATH)."),
    pairs: Optional[Path] = typer.Option(None, help="Pairs to choose the threshold on (default: pairsDevTrain.txt)."),
    test_pairs: Optional[Path] = typer.Option(None, help="Pairs to report accuracy on (default: pairsDevTest.txt)."),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: int = typer.Option(2, min=0),
    save: bool = typer.Option(False, "--save/--no-save", help="Store the threshold in the checkpoint (atomically)."),
    json_out: Optional[Path] = typer.Option(None, "--json"),
):
    """Choose the verification threshold on View 1 training pairs and report View 1 test accuracy."""
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.engine.checkpoint import set_threshold
    from facecli.evaluation.reports import save_threshold_curve, threshold_table
    from facecli.evaluation.runner import resolve_pairs_arg, tune_threshold, write_json

    _positive(batch_size, "--batch-size")
    dev = _device(device)
    fm = _load(checkpoint, dev)
    lfw = _lfw_for_eval(lfw_dir)
    root = find_image_root(lfw)
    train_set = read_pairs(resolve_pairs_arg(pairs, lfw, "pairsDevTrain.txt"), root)
    test_file = resolve_pairs_arg(test_pairs, lfw, "pairsDevTest.txt")
    test_set = read_pairs(test_file, root)
    choice = tune_threshold(fm.net, fm.preprocess, train_set, test_set, dev, flip, batch_size, workers, _progress_factory)
    console.print(threshold_table(choice.candidates, choice.accuracies, choice.threshold))
    console.print(
        f"Threshold {choice.threshold:.4f}: training-pairs accuracy {100 * choice.train_accuracy:.2f}% ({choice.train_pairs} pairs), "
        f"test-pairs accuracy {100 * choice.test_accuracy:.2f}% ({choice.test_pairs} pairs).",
        markup=False,
    )
    out_dir = json_out.parent if json_out else Path(checkpoint).parent
    picture = save_threshold_curve(choice.candidates, choice.accuracies, choice.threshold, out_dir / "threshold_curve.png")
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
    landmarks: Optional[Path] = typer.Option(None, help="5-point landmarks (CSV/JSON) to align raw photos first."),
    detect: bool = typer.Option(False, "--detect", help="Raw photos: find every face, align it, one row per face (with box, landmarks, score)."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo."),
    flip: bool = typer.Option(True, "--flip/--no-flip"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    workers: int = typer.Option(0, min=0),
):
    """Embed images with a trained model (L2-normalised float32), or compare two faces."""
    from facecli.evaluation.embed_files import run_embed

    _positive(batch_size, "--batch-size")
    if detect and landmarks is not None:
        raise UserError("Give either --landmarks or --detect, not both.")
    code = run_embed(checkpoint, paths, out, compare, landmarks, flip, batch_size, _device(device), workers, _progress_factory,
                     photos.detector_for(detect, detector), largest)
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
    landmarks: Optional[Path] = typer.Option(None, help="CSV or JSON with 5 landmarks per image (eyes, nose, mouth corners)."),
    detect: bool = typer.Option(False, "--detect", help="Find the faces and their landmarks instead (crops NAME_faceK; DST/detections.csv lists them)."),
    detector: DetectorName = typer.Option(DetectorName.hog, help=DETECTOR_HELP),
    largest: bool = typer.Option(False, "--largest", help="With --detect: only the largest face of each photo, under the photo's own name."),
    size: int = typer.Option(112, help="Output size (the ArcFace template is scaled to it)."),
):
    """Warp photos to the standard ArcFace 112x112 template from 5-point landmarks (given, or found with --detect)."""
    from facecli.align import align_folder

    if (landmarks is None) == (not detect):
        raise UserError("Give either --landmarks FILE or --detect.", hint="--detect finds faces and landmarks itself.")
    if detect:
        return photos.align_detected(src, dst, photos.detector_for(detect, detector), largest, size)
    summary = align_folder(src, dst, landmarks, size=size)
    console.print(f"Aligned {len(summary.written)} image(s) into {dst}", markup=False)
    if summary.skipped:
        warn(f"{len(summary.skipped)} image(s) had no landmarks and were skipped, e.g. {summary.skipped[0]}.")
    if summary.missing:
        warn(f"{len(summary.missing)} landmarks entr(y/ies) name no file, e.g. {summary.missing[0]}.")
    if summary.unreadable:
        warn(f"{len(summary.unreadable)} image(s) could not be read, e.g. {summary.unreadable[0][0]}: {summary.unreadable[0][1]}")
        raise typer.Exit(1)


@app.command()
@guarded
def demo(
    out_dir: Path = typer.Option(Path("demo"), "--out", help="Where the synthetic set and the run go."),
    model: Model = typer.Option(Model.arcface, help="Loss to train."),
    backbone: Backbone = typer.Option(Backbone.resnet18, help="Backbone network."),
    epochs: int = typer.Option(4, help="Training epochs."),
    image_size: int = typer.Option(48, help="Input size (the set is drawn at 112 and resized)."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(0.1),
    workers: int = typer.Option(2, min=0),
    seed: int = typer.Option(0),
    identities: int = typer.Option(200, help="Synthetic training identities."),
    test_identities: int = typer.Option(60, help="Synthetic held-out identities."),
    images_per_identity: int = typer.Option(20, help="Synthetic images per identity."),
):
    """The main job on the embedded synthetic set: train on the CPU, show held-out accuracy, trained vs untrained."""
    from rich.table import Table

    from facecli.demo import run_demo

    res = run_demo(
        out_dir, model=model.value, backbone=backbone.value, epochs=epochs, image_size=image_size, batch_size=batch_size,
        lr=lr, workers=workers, seed=seed, identities=identities, test_identities=test_identities,
        images_per_identity=images_per_identity, log=_log, warn=warn, progress=_progress_factory, train_progress=_train_progress,
    )
    t = Table(title=f"Held-out verification: synthetic LFW View 2, {res.trained['pairs']} pairs, 10-fold")
    for col in ("network", "accuracy", "AUC", "EER"):
        t.add_column(col, justify="left" if col == "network" else "right")
    for name, r in (("untrained", res.untrained), (f"trained ({model.value}, {epochs} epochs)", res.trained)):
        t.add_row(name, f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}%", f"{r['auc']:.4f}", f"{100 * r['eer']:.2f}%")
    console.print(t)
    if res.dev_test_accuracy is not None:
        console.print(f"View 1 dev-test accuracy at the threshold tuned on dev-train: {100 * res.dev_test_accuracy:.2f}%", markup=False)
    import shlex

    ckpt, lfw = str(res.run_dir / "latest.pt"), str(out_dir / "data" / "Labeled Faces in the Wild (LFW)")
    console.print(f"Run directory: {res.run_dir}", markup=False)
    console.print(f"Next: facecli eval-lfw {shlex.quote(ckpt)} --lfw-dir {shlex.quote(lfw)}", markup=False)


@app.command()
@guarded
def info(checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt).")):
    """Show what a checkpoint holds (model, backbone, data, progress, threshold, versions)."""
    from rich.table import Table

    from facecli.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    t = Table(title=str(checkpoint), show_header=False)
    cfg = ckpt.get("train_config", {})
    rows = [
        ("model", ckpt["model"]),
        ("backbone", f"{ckpt['net']['backbone']}, {ckpt['net']['embedding_dim']}-d"),
        ("head", json.dumps(ckpt.get("head", {}).get("hparams", {}))),
        ("identities", f"{len(ckpt.get('classes', [])):,}"),
        ("input", json.dumps(ckpt["preprocess"])),
        ("progress", f"epoch {ckpt.get('epoch')} + {ckpt.get('batch_in_epoch')} batches, step {ckpt.get('step')}"),
        ("min epoch loss", str(ckpt.get("min_loss"))),
        ("threshold", str(ckpt.get("threshold"))),
        ("trained with", f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, {cfg.get('optimizer')}/{cfg.get('scheduler')}, {cfg.get('epochs')} epochs"),
        ("versions", json.dumps(ckpt.get("versions", {}))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}.")


# Raw-photo commands (gallery build, identify, export) and the --detect options above.
from facecli.commands import photos  # noqa: E402


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
