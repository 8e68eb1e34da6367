"""``tune-threshold --far``: an operating point at a target false-accept rate (the command's output half).

Called by :func:`facecli.commands.evaluation.tune_threshold_cmd`; the numbers come from
:mod:`facecli.evaluation.operating_point`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.table import Table

from facecli.errors import UserError
from facecli.ui import console, warn


def _people(folders: Optional[Path], lfw: Optional[Path]):
    from facecli.evaluation.operating_point import identity_images, lfw_people_images
    from facecli.evaluation.runner import lfw_pair_file

    if folders is not None:
        paths, labels, names = identity_images(folders)
        return paths, labels, f"identity folders {folders}"
    people_file = lfw_pair_file(lfw, "peopleDevTest.txt")
    paths, labels, names = lfw_people_images(lfw, people_file)
    return paths, labels, f"LFW {people_file.name} people"


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def _table(op, source: str) -> Table:
    t = Table(title=f"Operating point at FAR {op.far_target:g} ({source})")
    for col in ("", "value", "95% interval (bootstrap over identities)"):
        t.add_column(col, justify="right")
    t.add_row("threshold", f"{op.threshold:.6f}", f"{op.threshold_ci[0]:.6f} .. {op.threshold_ci[1]:.6f}")
    t.add_row("TAR", _pct(op.tar), f"{_pct(op.tar_ci[0])} .. {_pct(op.tar_ci[1])}")
    t.add_row("FAR (calibration)", _pct(op.far), f"{_pct(op.far_ci[0])} .. {_pct(op.far_ci[1])}")
    t.add_section()
    mark = "within" if op.heldout_within else "OUTSIDE"
    t.add_row("FAR (held-out people)", _pct(op.heldout_far), f"{mark} {_pct(op.far_prediction[0])} .. {_pct(op.far_prediction[1])} (95% prediction)")
    t.add_row("TAR (held-out people)", _pct(op.heldout_tar), "")
    return t


def tune_far(embedder, checkpoint: Path, far: float, folders: Optional[Path], lfw: Optional[Path], impostor_pairs: int,
             bootstrap: int, seed: int, save: bool, json_out: Optional[Path], progress) -> None:
    from facecli.engine.checkpoint import set_threshold
    from facecli.evaluation.operating_point import operating_point
    from facecli.evaluation.runner import write_json

    if impostor_pairs < 1 or bootstrap < 1:
        raise UserError("--impostor-pairs and --bootstrap must be positive.")
    paths, labels, source = _people(folders, lfw)
    emb = embedder.paths(paths, progress("embedding people", len(paths)))
    if emb.bad:
        raise UserError(f"{len(emb.bad)} image(s) could not be decoded, e.g. {emb.bad[0]}.")
    op = operating_point(emb.vectors, labels, far, impostor_pairs, bootstrap, seed)
    c, h = op.calibration, op.heldout
    console.print(
        f"{len(paths):,} images of {len(set(labels.tolist()))} people, split by person (seed {seed}): calibration {c['identities']} people, "
        f"{c['genuine_pairs']:,} genuine and {c['impostor_pairs']:,} impostor pairs (all genuine, a seeded sample of impostors); "
        f"held out {h['identities']} people, {h['genuine_pairs']:,} genuine and {h['impostor_pairs']:,} impostor pairs.",
        markup=False,
    )
    console.print(_table(op, source))
    if not op.measurable:
        warn(f"{c['impostor_pairs']:,} calibration impostor pairs cannot measure FAR {far:g} (needs at least {1 / far:,.0f}): "
             "the threshold is above every impostor and its FAR interval is not informative. Use more people or --impostor-pairs.")
    if save:
        set_threshold(checkpoint, op.threshold, f"tune-threshold --far {far:g} on {source} (seed {seed})", far=far, far_ci=op.far_ci)
        console.print(f"Stored threshold {op.threshold:.6f} (FAR {far:g}) in {checkpoint}", markup=False)
    if json_out:
        write_json(json_out, {**op.to_dict(), "checkpoint": str(checkpoint), "source": source})
        console.print(f"Wrote {json_out}", markup=False)
