"""IJB-B/IJB-C commands: ``eval-ijb`` (the published 1:1 protocol) and ``ijb-from-folders`` (a test set anyone can build).

:func:`register` adds them to the app :mod:`facecli.cli` assembles.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from facecli.commands.common import Amp, BatchSize, Device, JsonOut, Workers, embedder_for, guarded, progress_factory
from facecli.errors import UserError
from facecli.ui import console


class IjbTarget(str, Enum):
    IJBC = "IJBC"
    IJBB = "IJBB"


def _refuse_existing(path: Optional[Path], overwrite: bool) -> None:
    if path is not None and Path(path).exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it.")


def _save_features(path: Path, meta, raw) -> None:
    """Each image's flip-summed feature before any normalisation or score weighting, with its name."""
    from facecli.engine.checkpoint import atomic_write

    arrays = dict(names=np.asarray(meta.image_names), features=raw.features, landmarks=meta.landmarks, detector_scores=meta.detector_scores)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def eval_ijb(
    checkpoint: Path = typer.Argument(..., help="A facecli checkpoint (.pt)."),
    ijb_dir: Path = typer.Option(..., "--ijb-dir", help="insightface's IJB_release/IJBC (or IJBB) folder with loose_crop/ and meta/ (or IJB_release itself)."),
    target: IjbTarget = typer.Option(IjbTarget.IJBC, help="IJBC or IJBB (meta/ijbc_* or meta/ijbb_*)."),
    normalize_images: bool = typer.Option(False, "--normalize-images", help="L2-normalise each image's feature before pooling (not their default 'N1')."),
    detector_score: bool = typer.Option(True, "--detector-score/--no-detector-score", help="Weight each image by its detector score (their 'D1')."),
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Workers = "auto",
    json_out: JsonOut = None,
    save_features: Optional[Path] = typer.Option(None, "--save-features", help="Write each image's flip-summed feature (unnormalised, unweighted) and name to this .npz."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep image features in the cache (keyed by the weights) so a stopped run restarts where it was."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --json / --save-features files."),
    amp: Amp = True,
):
    """IJB-B/IJB-C 1:1 template verification as insightface's eval_ijbc.py: TAR at FAR 1e-6..1e-1, AUC."""
    from facecli.data.ijb import check_images, read_ijb_meta, resolve_ijb_dir
    from facecli.data.index import default_cache_dir
    from facecli.evaluation.ijb import cache_key, evaluate_ijb
    from facecli.evaluation.reports import ijb_table, save_ijb_roc
    from facecli.evaluation.runner import write_json
    from facecli.models import weights_fingerprint

    for path in (json_out, save_features):
        _refuse_existing(path, overwrite)
    ijb_dir = resolve_ijb_dir(ijb_dir, target.value)
    meta = read_ijb_meta(ijb_dir, target.value)
    crops = check_images(ijb_dir, meta)
    fm, embedder = embedder_for(checkpoint, device, True, batch_size, workers, amp)
    embedder.normalize = False
    key = cache_key(weights_fingerprint(fm.net.state_dict()), fm.preprocess.to_dict(), meta, crops)
    cache_file = default_cache_dir() / "ijb" / f"{key}.npz" if cache else None
    advance = progress_factory(f"embedding {target.value}", len(meta.image_names))
    report, raw = evaluate_ijb(embedder, meta, crops, cache_file, advance, normalize_images, detector_score)
    console.print(ijb_table(report))
    console.print(
        f"{report.distinct_images:,} distinct images ({report.embedded_now:,} embedded now, the rest from the cache), "
        f"{report.forward_passes:,} forward passes, {report.seconds:.1f} s",
        markup=False,
    )
    out_dir, stem = (json_out.parent, json_out.stem) if json_out else (Path(checkpoint).parent, f"eval_{target.value.lower()}")
    picture = save_ijb_roc(report.fpr, report.tpr, report.auc, out_dir / f"{stem}_roc.png", target.value)
    if save_features:
        _save_features(save_features, meta, raw)
        console.print(f"Wrote {save_features}", markup=False)
    if json_out:
        write_json(json_out, {**report.to_dict(), "checkpoint": str(checkpoint), "picture": str(picture)})
        console.print(f"Wrote {json_out}", markup=False)
    console.print(f"Picture: {picture}", markup=False)


def ijb_from_folders(
    src: Path = typer.Argument(..., help="Identity folders (e.g. a synth set's LFW folder, or LFW's people)."),
    out_dir: Path = typer.Argument(..., help="Where to write loose_crop/ and meta/ (must not hold them yet)."),
    target: IjbTarget = typer.Option(IjbTarget.IJBC, help="Spelling of the meta file names (ijbc_* or ijbb_*)."),
    templates_per_identity: int = typer.Option(2, min=2, help="Templates per person (genuine pairs are all pairs of them)."),
    max_identities: Optional[int] = typer.Option(None, min=2, help="Use only the first N identity folders (sorted)."),
    max_impostors: int = typer.Option(100_000, min=1, help="At most this many different-person template pairs (seeded sample)."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same files."),
):
    """Write an IJB_release-format set from identity folders: templates of media of images, 5 landmarks, pairs."""
    from facecli.data.ijb import identity_folders, build_ijb_from_folders

    people = identity_folders(src, max_identities)
    advance = progress_factory("writing crops", sum(len(files) for _, files in people))
    s = build_ijb_from_folders(src, out_dir, target.value, seed, templates_per_identity, max_identities, max_impostors, advance)
    console.print(
        f"Wrote {s.images} images of {s.identities} people to {s.out_dir}: {s.face_rows} face rows, {s.templates} templates, "
        f"{s.media} media, {s.genuine_pairs} genuine and {s.impostor_pairs} impostor template pairs.",
        markup=False,
    )
    console.print(f"Evaluate with: facecli eval-ijb CHECKPOINT --ijb-dir {str(out_dir)!r} --target {target.value}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("eval-ijb")(guarded(eval_ijb))
    app.command("ijb-from-folders")(guarded(ijb_from_folders))
