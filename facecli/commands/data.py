"""Data commands: ``synth`` (the generated face set), ``pack`` (RecordIO) and ``info`` (what a checkpoint or export holds)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from facecli.commands.common import guarded, progress_factory
from facecli.ui import console, progress, warn


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
    advance = progress_factory("generating faces", total)
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


def register(app: typer.Typer) -> None:
    app.command("synth")(guarded(synth))
    app.command("pack")(guarded(pack))
    app.command("info")(guarded(info))
