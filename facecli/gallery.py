"""1:N identification: a gallery of enrolled people and the ranking of probe faces against it.

A gallery (``.npz``, read without pickle) keeps every enrolled template (unit embedding),
its person and source photo, the people's names, and the identity of the model that made
it (weights fingerprint, preprocessing): embeddings of different models are not comparable,
so :func:`check_model` refuses a probe model that is not the gallery's.

A probe is scored against each person by cosine similarity to the person's mean template
(``by="mean"``, renormalised; robust to one bad photo) or to their best template
(``by="max"``). Below the threshold the answer is "unknown" (open set).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facecli.errors import UserError

GALLERY_FORMAT = "facecli-gallery"
GALLERY_VERSION = 1
UNKNOWN = "unknown"
SCORINGS = ("mean", "max")


@dataclass
class Gallery:
    names: list[str]  # P enrolled people
    labels: np.ndarray  # (N,) person index of each template
    templates: np.ndarray  # (N, D) float32 unit rows
    sources: list[str]  # (N,) photo of each template
    identity: dict  # the model's (see facecli.models.identity_of_checkpoint)
    detector: str | None = None  # how faces were found at enrolment; None: images were face crops

    def means(self) -> np.ndarray:
        """(P, D) unit mean template per person."""
        sums = np.zeros((len(self.names), self.templates.shape[1]), dtype=np.float64)
        np.add.at(sums, self.labels, self.templates.astype(np.float64))
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)

    def scores(self, probes: np.ndarray, by: str = "mean") -> np.ndarray:
        """(M, P) similarity of each probe to each person."""
        probes = np.asarray(probes, dtype=np.float64)
        if by == "mean":
            return probes @ self.means().T
        if by == "max":
            sims = probes @ self.templates.astype(np.float64).T
            out = np.full((len(probes), len(self.names)), -np.inf)
            for person in range(len(self.names)):
                out[:, person] = sims[:, self.labels == person].max(axis=1)
            return out
        raise UserError(f"Unknown scoring {by!r}.", hint=f"Choose one of: {', '.join(SCORINGS)}.")


@dataclass(frozen=True)
class Match:
    name: str
    score: float


@dataclass(frozen=True)
class Identification:
    """A probe's answer: the best person, or "unknown" below the threshold, and the top k."""

    answer: str
    top: tuple[Match, ...]


def identify(gallery: Gallery, probes: np.ndarray, threshold: float, k: int = 5, by: str = "mean") -> list[Identification]:
    scores = gallery.scores(probes, by)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(scores, order):
        top = tuple(Match(gallery.names[j], float(row[j])) for j in idx)
        out.append(Identification(top[0].name if top and top[0].score >= threshold else UNKNOWN, top))
    return out


def people_folders(root: Path) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """(person, photos) for each sub-folder of ``root`` holding images, and what could not be read.

    One folder per person; folders are walked like ``embed`` walks them (links leading
    outside a folder are reported, not followed).
    """
    from facecli.evaluation.embed_files import collect_images

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder.", hint="Give a folder with one sub-folder of photos per person.")
    people, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos, _, skipped = collect_images([folder])
        problems += skipped
        if photos:
            people.append((folder.name, photos))
    if not people:
        raise UserError(f"{root}: no person folders with images.", hint="Lay it out as PEOPLE/<name>/<photo>.jpg, several photos each.")
    return people, problems


def build_gallery(names: Sequence[str], labels: Sequence[int], embeddings: np.ndarray, sources: Sequence[str],
                  identity: dict, detector: str | None) -> Gallery:
    """A gallery of the people that kept at least one template (names renumbered to match)."""
    labels = np.asarray(labels, dtype=np.int64)
    present = sorted(set(labels.tolist()))
    remap = {old: new for new, old in enumerate(present)}
    return Gallery(
        names=[names[i] for i in present],
        labels=np.array([remap[i] for i in labels.tolist()], dtype=np.int64),
        templates=np.asarray(embeddings, dtype=np.float32),
        sources=[str(s) for s in sources],
        identity=identity,
        detector=detector,
    )


def save_gallery(gallery: Gallery, path: Path) -> Path:
    """Write the gallery atomically as ``.npz`` of plain arrays."""
    from facecli.engine.checkpoint import atomic_write

    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise UserError(f"Gallery file {path} should end in .npz.")
    header = {"format": GALLERY_FORMAT, "format_version": GALLERY_VERSION, "identity": gallery.identity, "detector": gallery.detector}
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(header, sort_keys=True)), names=np.array(gallery.names, dtype=str),
             labels=gallery.labels, templates=gallery.templates, sources=np.array(gallery.sources, dtype=str))
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def load_gallery(path: Path) -> Gallery:
    """Read a gallery written by :func:`save_gallery`; one line saying why not otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such gallery file.", hint="Build one with `facecli gallery build CKPT PEOPLE/ --out gallery.npz`.")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {k: data[k] for k in ("names", "labels", "templates", "sources")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as e:
        raise UserError(f"{path} is not a facecli gallery ({type(e).__name__}).", hint="Build one with `facecli gallery build`.") from e
    if not isinstance(header, dict) or header.get("format") != GALLERY_FORMAT:
        raise UserError(f"{path} is not a facecli gallery.", hint="Build one with `facecli gallery build`.")
    if header.get("format_version") != GALLERY_VERSION:
        raise UserError(f"{path} has gallery format version {header.get('format_version')!r}; this facecli reads {GALLERY_VERSION}.")
    return Gallery([str(n) for n in arrays["names"]], arrays["labels"].astype(np.int64), arrays["templates"].astype(np.float32),
                   [str(s) for s in arrays["sources"]], header["identity"], header.get("detector"))


def check_model(gallery: Gallery, identity: dict, gallery_path: Path, model_path: Path) -> None:
    """Refuse a model whose embeddings are not comparable with the gallery's."""
    want, got = gallery.identity.get("fingerprint"), identity.get("fingerprint")
    if want != got:
        raise UserError(
            f"{gallery_path} was built with another model (weights {want}, {gallery.identity.get('model')}/"
            f"{gallery.identity.get('backbone')}); {model_path} has weights {got}.",
            hint=f"Identify with the gallery's model, or rebuild the gallery with {model_path}.",
        )


def framing_mismatch(gallery: Gallery, probe_detector: str | None) -> str | None:
    """A warning when the probes are framed unlike the enrolled faces (aligned vs as given).

    A model scores faces framed alike; mixing detected, aligned crops with photos used as
    given costs a large share of rank-1 (the README's raw-photos table), silently.
    """
    enrolled = gallery.detector
    if (enrolled is None) == (probe_detector is None):
        return None
    if enrolled is not None:
        return (f"the gallery was enrolled from detected, aligned faces ({enrolled}) but these photos are used as given; "
                "add --detect so both are framed alike.")
    return ("the gallery was enrolled from face crops used as given but these photos are detected and aligned; "
            "drop --detect, or rebuild the gallery with --detect.")

