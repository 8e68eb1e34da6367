"""Raw photos to face embeddings: detect every face, warp it to the ArcFace template, embed.

Used by ``embed --detect``, ``align --detect``, ``gallery build`` and ``identify``. A photo
without a face is counted and named, an unreadable one is reported with its reason; neither
stops the job. Without a detector each image is taken as one already-cropped face, through
the model's own preprocessing (its centre-crop fraction), as ``embed`` always did.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from facecli.align import _output_name, _save, align_face, load_photo, refuse_existing
from facecli.data.files import find_images
from facecli.engine.checkpoint import atomic_write
from facecli.data.folders import ImageFiles
from facecli.data.images import Preprocess, to_rgb
from facecli.detect import Detector, Face, keep_largest
from facecli.errors import ImageError, UserError

Progress = Callable[[str, int], Callable[[int], None]]

COLUMN_NAMES = {
    "box": ["box_x1", "box_y1", "box_x2", "box_y2"],
    "landmarks": [f"lm{i}_{a}" for i in range(1, 6) for a in "xy"],
}


def column_names(columns: dict[str, np.ndarray]) -> list[str]:
    """Unique CSV header names of the per-row extras: face, score, box_x1..box_y2, lm1_x..lm5_y."""
    return [n for key in columns for n in COLUMN_NAMES.get(key, [key])]


@dataclass
class FaceRecord:
    """One face found in a photo (``face`` is None when the whole image is the face)."""

    source: Path
    index: int  # face number within its photo, best detector score first
    face: Face | None = None


@dataclass
class Detections:
    records: list[FaceRecord] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable photos, with the reason
    photos: int = 0


def no_face_note(found) -> str | None:
    """The warning naming photos without a face (first five), or None when every photo had one."""
    if not found.no_face:
        return None
    names = ", ".join(str(p) for p in found.no_face[:5]) + (", ..." if len(found.no_face) > 5 else "")
    return f"no face found in {len(found.no_face)} of {found.photos} photo(s): {names}"


def photo_pixels(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as displayed (EXIF orientation applied): the frame landmarks refer to."""
    with load_photo(Path(path), str(path)) as photo:
        return np.asarray(to_rgb(photo), dtype=np.uint8)


def detect_faces(files: Sequence[Path], detector: Detector, largest: bool = False,
                 advance: Callable[[int], None] | None = None) -> Detections:
    """Every face (or the largest, with ``largest``) of every photo."""
    out = Detections()
    for path in files:
        out.photos += 1
        try:
            faces = detector.detect(photo_pixels(path))
        except ImageError as e:
            out.problems.append(str(e))
        else:
            faces = keep_largest(faces) if largest else faces
            if not faces:
                out.no_face.append(Path(path))
            out.records += [FaceRecord(Path(path), k, f) for k, f in enumerate(faces)]
        if advance:
            advance(1)
    return out


def aligned_face(record: FaceRecord, size: int) -> np.ndarray:
    """The face of ``record`` warped to the size x size ArcFace template, (S, S, 3) uint8."""
    with load_photo(record.source, str(record.source)) as photo:
        return np.array(align_face(photo, record.face.landmarks, size=size))  # writable: torch.from_numpy shares it


class AlignedFaces(Dataset):
    """Detected faces as the network's uint8 input, samples ``(image, index, problem)``."""

    def __init__(self, records: Sequence[FaceRecord], preprocess: Preprocess):
        self.records, self.size = list(records), preprocess.image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            pixels = aligned_face(self.records[i], self.size)
        except ImageError as e:  # the photo changed or vanished since detection
            return None, i, str(e)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), i, None


@dataclass
class FaceEmbeddings:
    """Unit embeddings, one row per face, with where each face came from."""

    records: list[FaceRecord]
    embeddings: np.ndarray  # (N, D) float32
    no_face: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    photos: int = 0
    quality: np.ndarray | None = None  # (N,) float32 feature norms before L2 normalisation

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row face index, detector score, box (x0, y0, x1, y1) and landmarks (x1, y1, ..., y5)."""
        faces = [r.face for r in self.records]
        if not faces or any(f is None for f in faces):
            return {}
        return {
            "face": np.array([r.index for r in self.records], dtype=np.int64),
            "score": np.array([f.score for f in faces], dtype=np.float32),
            "box": np.array([f.box for f in faces], dtype=np.float32).reshape(-1, 4),
            "landmarks": np.array([f.landmarks for f in faces], dtype=np.float32).reshape(-1, 10),
        }


def face_checked(files: Sequence[Path], checker: Detector, advance: Callable[[int], None] | None = None) -> Detections:
    """Photos used as given, but only those in which ``checker`` finds a face.

    Without it a photo of the sky is "a face" to the network and gets the nearest
    enrolled name; a face check decides "no face" before "who".
    """
    found = detect_faces(files, checker, largest=True, advance=advance)
    found.records = [FaceRecord(r.source, 0) for r in found.records]
    return found


def embed_photos(runner, files: Sequence[Path], detector: Detector | None = None, largest: bool = False,
                 device="cpu", flip: bool = True, batch_size: int | None = None, workers: int = 0,
                 progress: Progress | None = None, face_check: Detector | None = None) -> FaceEmbeddings:
    """Detect (when given a detector), align and embed; unreadable photos are reported, not raised.

    Without a detector each photo is one face used as given; with ``face_check`` only the
    photos in which it finds a face (the others are listed in ``no_face``).
    """
    files = [Path(f) for f in files]
    if detector is None:
        if face_check is not None:
            found = face_checked(files, face_check, progress("checking for faces", len(files)) if progress else None)
        else:
            found = Detections(records=[FaceRecord(f, 0) for f in files], photos=len(files))
        dataset: Dataset = ImageFiles([r.source for r in found.records], runner.preprocess)
    else:
        found = detect_faces(files, detector, largest, progress("detecting faces", len(files)) if progress else None)
        dataset = AlignedFaces(found.records, runner.preprocess)
    if not found.records:
        dim = runner.embedding_dim
        return FaceEmbeddings([], np.zeros((0, dim), np.float32), found.no_face, found.problems, found.photos, np.zeros(0, np.float32))
    advance = progress("embedding", len(dataset)) if progress else None
    emb = runner.embed_dataset(dataset, device, flip, batch_size, workers, advance)
    keep = [r for r, ok in zip(found.records, emb.ok) if ok]
    return FaceEmbeddings(keep, emb.vectors[emb.ok].astype(np.float32), found.no_face, found.problems + emb.bad, found.photos,
                          quality=emb.quality[emb.ok].astype(np.float32))


@dataclass
class AlignedPhotos:
    """What :func:`align_photos` wrote: crops, their detections table, and the photos it could not use."""

    written: list[Path]
    table: Path
    found: Detections


def _crop_name(rel: str, index: int, largest: bool) -> str:
    """``a/b.jpg`` for the one face with ``--largest``, else ``a/b_face0.jpg``, ``a/b_face1.jpg``, ..."""
    path = PurePosixPath(rel)
    name = rel if largest else str(path.with_name(f"{path.stem}_face{index}{path.suffix}"))
    return _output_name(name)[0]


def _sources(src: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(photo, path relative to ``src``) for a folder walked recursively, or a single photo; and what was skipped."""
    found = find_images([src])
    return list(zip(found.files, found.keys)), found.skipped


def _previous_crops(table: Path, dst: Path) -> list[Path]:
    """Crops listed by an older ``detections.csv`` (only names inside ``dst``): a rerun removes them."""
    try:
        with table.open(newline="") as fh:
            names = [row.get("aligned", "") for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    root = dst.resolve()
    out = []
    for name in names:
        path = (dst / name) if name else None
        if path is not None and path.resolve().is_relative_to(root) and path.resolve() != root:
            out.append(path)
    return out


def _plan_crops(found: Detections, rel_of: dict, dst: Path, largest: bool) -> list[tuple[FaceRecord, str]]:
    """(record, crop name) for every face; a crop that would replace a source photo is refused."""
    sources = {p.resolve() for p in rel_of}
    plan = [(r, _crop_name(rel_of[r.source], r.index, largest)) for r in found.records]
    for _, name in plan:
        if (dst / name).resolve() in sources:
            raise UserError(f"{dst / name}: the aligned face would overwrite its source photo; nothing was written.",
                            hint="Write aligned faces to a separate folder.")
    return plan


def align_photos(src: Path, dst: Path, detector: Detector, largest: bool = False, size: int = 112,
                 progress: Progress | None = None, overwrite: bool = False) -> AlignedPhotos:
    """Detect faces in ``src`` (a photo or a folder) and write each one aligned under ``dst``.

    Relative paths are kept; ``dst/detections.csv`` lists every crop with its source photo
    (relative to ``src``), box, score and landmarks (in the source photo's pixels): it is
    a landmarks file for ``align --landmarks``. Existing files are replaced only with
    ``overwrite``, and then the crops of the run that wrote the old table go too.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"{src}: source not found.", hint="Give a photo or a folder of photos.")
    if src.is_dir() and (dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents):
        raise UserError(f"{dst}: output folder is the source folder or inside it.", hint="Write aligned faces to a separate folder.")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder.", hint="With --detect, DST is the folder the faces go to.")
    table = dst / "detections.csv"
    refuse_existing([table], overwrite)
    sources, skipped = _sources(src)
    rel_of = dict(sources)
    found = detect_faces([p for p, _ in sources], detector, largest, progress("detecting faces", len(sources)) if progress else None)
    found.problems = skipped + found.problems
    plan = _plan_crops(found, rel_of, dst, largest)
    refuse_existing([dst / name for _, name in plan], overwrite)
    for stale in _previous_crops(table, dst) if table.exists() else []:
        stale.unlink(missing_ok=True)
    written, rows = [], []
    for record, out_rel in plan:
        out = dst / out_rel
        _save(Image.fromarray(aligned_face(record, size)), out, _output_name(out_rel)[1])
        written.append(out)
        f = record.face
        rows.append([out_rel, rel_of[record.source], record.index, f"{f.score:.4f}", *(f"{v:.2f}" for v in f.box), *(f"{v:.2f}" for v in f.landmarks.ravel())])
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["aligned", "source", "face", "score"] + column_names({"box": None, "landmarks": None}))
    w.writerows(rows)
    atomic_write(table, lambda fh: fh.write(text.getvalue().encode()))
    return AlignedPhotos(written, table, found)
