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
    """A probe's answer: the best person, "unknown" below the threshold, or "low quality" (no
    decision) below the minimum quality; the top k; the probe's quality (its feature norm)."""

    answer: str
    top: tuple[Match, ...]
    quality: float | None = None


def identify(gallery: Gallery, probes: np.ndarray, threshold: float, k: int = 5, by: str = "mean",
             quality: np.ndarray | None = None, min_quality: float | None = None) -> list[Identification]:
    """Each probe's answer; with ``min_quality``, a probe whose ``quality`` is below it gets none."""
    from facecli.evaluation.quality import LOW_QUALITY

    if min_quality is not None and quality is None:
        raise ValueError("min_quality needs the probes' quality")
    scores = gallery.scores(probes, by)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = []
    for i, (row, idx) in enumerate(zip(scores, order)):
        top = tuple(Match(gallery.names[j], float(row[j])) for j in idx)
        q = None if quality is None else float(quality[i])
        answer = top[0].name if top and top[0].score >= threshold else UNKNOWN
        if min_quality is not None and not q >= min_quality:  # NaN counts as low
            answer = LOW_QUALITY
        out.append(Identification(answer, top, q))
    return out


DEFAULT_FAR = 0.01


@dataclass(frozen=True)
class OperatingPoint:
    """The similarity at or above which a face is named, and where that number comes from."""

    threshold: float
    source: str  # said in every output: a user must know which operating point decided
    far: float | None = None  # the open-set false-alarm rate it was chosen for, when known

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "source": self.source, "far": self.far}


def leave_one_out_scores(gallery: Gallery, by: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(impostor, genuine) scores of each enrolled photo probing the gallery without it.

    Impostor: its best score against the *other* people (what a stranger's best score
    looks like). Genuine: its score against its own person's other photos (NaN when the
    person has one photo), and only when it beats every impostor (a correct rank 1).
    """
    own = gallery.labels
    impostor = np.full(len(own), -np.inf)
    genuine = np.full(len(own), np.nan)
    counts = np.bincount(own, minlength=len(gallery.names))
    means = gallery.means()
    sums = np.zeros_like(means)
    np.add.at(sums, own, gallery.templates.astype(np.float64))
    for start in range(0, len(own), 1024):
        rows = slice(start, start + 1024)
        t, lab = gallery.templates[rows].astype(np.float64), own[rows]
        scores = gallery.scores(t, by)
        k = np.arange(len(lab))
        if by == "mean":
            rest = sums[lab] - t  # the person's other photos
            norm = np.linalg.norm(rest, axis=1)
            mine = np.where(norm > 1e-12, (t * rest).sum(1) / np.maximum(norm, 1e-12), np.nan)
        else:
            sims = t @ gallery.templates.astype(np.float64).T
            sims[k, np.arange(start, start + len(lab))] = -np.inf  # not itself
            sims[gallery.labels[None, :] != lab[:, None]] = -np.inf
            mine = np.where(counts[lab] > 1, sims.max(axis=1), np.nan)
        scores[k, lab] = -np.inf
        impostor[rows] = scores.max(axis=1)
        genuine[rows] = np.where(mine > impostor[rows], mine, np.nan)
    return impostor, genuine


def calibrate(gallery: Gallery, by: str = "mean", far: float = DEFAULT_FAR) -> OperatingPoint | None:
    """The open-set threshold for ``far`` from the gallery's own photos (None with one person).

    The threshold lets through at most ``far`` of the leave-one-out impostor scores; with
    fewer than 1/far of them it sits just above the highest (no false alarm seen).
    """
    if len(gallery.names) < 2:
        return None
    impostor, genuine = leave_one_out_scores(gallery, by)
    ranked = np.sort(impostor)[::-1]
    allowed = int(np.floor(far * len(ranked) + 1e-9))
    threshold = float(np.nextafter(ranked[min(allowed, len(ranked) - 1)], np.inf))
    seen_far = float(np.mean(impostor >= threshold))
    eligible = np.bincount(gallery.labels)[gallery.labels] > 1  # photos whose person has another one
    with np.errstate(invalid="ignore"):
        dir_ = float(np.sum(genuine[eligible] >= threshold) / max(1, int(eligible.sum())))
    few = f"; only {len(ranked)} impostor scores, so FAR {far:g} cannot be resolved" if len(ranked) * far < 1 else ""
    source = (f"calibrated on this gallery for FAR {far:g} (leave-one-out over {len(ranked)} enrolled photos, by {by}: "
              f"FAR {seen_far:.3f}, DIR {dir_:.3f}{few})")
    return OperatingPoint(threshold, source, far)


def check_threshold(value: float) -> float:
    """A similarity threshold given by the user: a finite number in [-1, 1]."""
    if not np.isfinite(value) or not -1.0 <= value <= 1.0:
        raise UserError(f"--threshold {value} is not a cosine similarity.", hint="Give a number from -1 to 1, e.g. --threshold 0.4.")
    return float(value)


def people_folders(root: Path) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """(person, photos) for each sub-folder of ``root`` holding images, and what was skipped.

    One folder per person, links followed like file links (:mod:`facecli.data.files`); a
    link to a folder already read (``Everyone -> .``, or two names for one person) is
    skipped and named, so nobody is enrolled twice or as a "person" made of everyone.
    """
    from facecli.data.files import find_images

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder.", hint="Give a folder with one sub-folder of photos per person.")
    people, problems, seen = [], [], {root.resolve()}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        real = folder.resolve()
        if real in seen or real in root.resolve().parents:
            problems.append(f"{folder}: links to {real}, a folder already read or above {root}; not a person")
            continue
        seen.add(real)
        found = find_images([folder])
        problems += found.skipped
        if found.files:
            people.append((folder.name, found.files))
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as e:
        raise UserError(f"{path} is not a facecli gallery ({type(e).__name__}).", hint="Build one with `facecli gallery build`.") from e
    if not isinstance(header, dict) or header.get("format") != GALLERY_FORMAT:
        raise UserError(f"{path} is not a facecli gallery.", hint="Build one with `facecli gallery build`.")
    if header.get("format_version") != GALLERY_VERSION:
        raise UserError(f"{path} has gallery format version {header.get('format_version')!r}; this facecli reads {GALLERY_VERSION}.")
    problem = _gallery_problem(header, arrays)
    if problem:
        raise UserError(f"{path} is a damaged gallery: {problem}.", hint="Rebuild it with `facecli gallery build`.")
    return Gallery([str(n) for n in arrays["names"]], arrays["labels"].astype(np.int64), arrays["templates"].astype(np.float32),
                   [str(s) for s in arrays["sources"]], header["identity"], header.get("detector"))


def _identity_problem(identity) -> str | None:
    if not isinstance(identity, dict):
        return "its model identity is missing"
    if not isinstance(identity.get("fingerprint"), str) or not isinstance(identity.get("embedding_dim"), int):
        return "its model identity has no weights fingerprint or embedding size"
    return None


def _gallery_problem(header: dict, arrays: dict) -> str | None:
    """What makes a gallery's contents unusable, or None: checked before any of it is used."""
    names, labels, templates, sources = (arrays[k] for k in ("names", "labels", "templates", "sources"))
    checks = [
        (_identity_problem(header.get("identity")) is None, _identity_problem(header.get("identity"))),
        (header.get("detector") is None or isinstance(header.get("detector"), str), "its detector is not a name"),
        (names.ndim == 1 and names.dtype.kind == "U" and len(names) > 0, "its names are not a list of text"),
        (len(set(names.tolist())) == len(names), "two people have the same name"),
        (templates.ndim == 2 and templates.dtype.kind == "f" and templates.shape[0] > 0, "its templates are not a (N, D) float array"),
        (labels.ndim == 1 and labels.dtype.kind in "iu", "its labels are not whole numbers"),
        (sources.ndim == 1 and len(sources) == len(templates) == len(labels), "its labels, templates and sources differ in number"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    if templates.shape[1] != header["identity"]["embedding_dim"]:
        return f"its templates are {templates.shape[1]}-d but its model's embeddings are {header['identity']['embedding_dim']}-d"
    if labels.min() < 0 or labels.max() >= len(names):
        return f"a label is outside 0..{len(names) - 1}"
    if len(np.unique(labels)) != len(names):
        return "a person has no template"
    if not np.isfinite(templates).all() or not np.allclose(np.linalg.norm(templates.astype(np.float64), axis=1), 1.0, atol=1e-3):
        return "a template is not a finite unit vector"
    return None


def check_model(gallery: Gallery, identity: dict, gallery_path: Path, model_path: Path) -> None:
    """Refuse a model whose embeddings are not comparable with the gallery's."""
    want, got = gallery.identity.get("fingerprint"), identity.get("fingerprint")
    if want != got or gallery.templates.shape[1] != int(identity["embedding_dim"]):
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

