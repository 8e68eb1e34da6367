"""``facecli embed``: embeddings of a user's own images, and a same/different answer.

Files are found by :mod:`facecli.data.files` (links followed, non-regular files skipped
and named), like every other command that reads a user's photos.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from facecli.data.files import collect_images
from facecli.data.images import Preprocess, decode_image
from facecli.faces import column_names
from facecli.errors import ImageError, UserError


class _Files(Dataset):
    """Image files, optionally aligned by 5-point landmarks first."""

    def __init__(self, files, keys, preprocess: Preprocess, landmarks: dict | None):
        self.files, self.keys, self.preprocess, self.landmarks = files, keys, preprocess, landmarks

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            if self.landmarks is None:
                img = decode_image(path, self.preprocess.image_size, self.preprocess.crop_fraction)
            else:
                img = self._aligned(path, self.keys[i])
        except ImageError as e:
            return None, i, str(e)
        return img, i, None

    def _aligned(self, path: Path, key: str):
        from PIL import Image, ImageOps, UnidentifiedImageError

        from facecli.align import align_face

        points = self.landmarks.get(key)
        if points is None:
            points = self.landmarks.get(Path(key).name)
        if points is None and "/" not in key:
            # A file named on the command line: like `facecli align IMAGE`, accept the one
            # entry of a folder-wide landmarks file that ends in its name.
            matches = [k for k in self.landmarks if k.rsplit("/", 1)[-1] == key]
            if len(matches) == 1:
                points = self.landmarks[matches[0]]
        if points is None:
            raise ImageError(f"{path}: no landmarks for {key!r} in the landmarks file.")
        try:
            with Image.open(path) as im:
                # Landmarks are in the displayed frame (EXIF orientation applied), as for `facecli align`.
                aligned = align_face(ImageOps.exif_transpose(im), points, size=self.preprocess.image_size)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ImageError(f"{path}: not a readable image ({e}).") from e
        buf = io.BytesIO()
        aligned.save(buf, format="PNG")
        # aligned faces are already the network's crop: no further centre crop
        return decode_image(buf.getvalue(), self.preprocess.image_size, 1.0, where=str(path))


@dataclass
class EmbedResult:
    paths: list[Path]
    embeddings: np.ndarray  # (N, D) float32, unit rows, only readable images
    problems: list[str] = field(default_factory=list)
    forward_passes: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # per-row extras: face, score, box, landmarks


def embed_files(
    model,
    paths: Sequence[Path],
    device,
    flip: bool = True,
    batch_size: int | None = None,
    workers: int = 0,
    landmarks_file: Path | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> EmbedResult:
    files, keys, problems = collect_images(paths)
    if not files:
        raise UserError("No images found in " + ", ".join(str(p) for p in paths) + ".", hint="Pass image files or folders holding .jpg/.png images.")
    landmarks = None
    if landmarks_file is not None:
        from facecli.align import read_landmarks

        landmarks = read_landmarks(landmarks_file)
    advance = progress("embedding", len(files)) if progress else None
    emb = model.embed_dataset(_Files(files, keys, model.preprocess, landmarks), device, flip, batch_size, workers, advance)
    problems = problems + emb.bad
    ok = emb.ok
    return EmbedResult([f for f, good in zip(files, ok) if good], emb.vectors[ok].astype(np.float32), problems, emb.forward_passes,
                       columns={"quality": emb.quality[ok]})


def _embeddings_bytes(result: EmbedResult, suffix: str) -> bytes:
    paths = np.array([str(p) for p in result.paths])
    buf = io.BytesIO()
    if suffix == ".npz":
        np.savez(buf, embeddings=result.embeddings, paths=paths, **result.columns)
    elif suffix == ".npy":
        np.save(buf, result.embeddings)
    else:
        extra = [np.asarray(v).reshape(len(paths), -1) for v in result.columns.values()]
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["path"] + column_names(result.columns) + [f"e{i}" for i in range(result.embeddings.shape[1])])
        for k, (p, row) in enumerate(zip(paths, result.embeddings)):
            w.writerow([p] + [f"{v:.8g}" for c in extra for v in c[k]] + [f"{v:.8g}" for v in row])
        buf.write(text.getvalue().encode())
    return buf.getvalue()


def write_embeddings(result: EmbedResult, out: Path) -> Path:
    """``.npz`` (embeddings + paths + columns), ``.npy`` (embeddings) or ``.csv`` (path, columns, values) by suffix.

    Written to a temporary name and renamed: an interrupted or failed write leaves no partial file.
    """
    from facecli.engine.checkpoint import atomic_write

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".npy", ".csv"):
        raise UserError(f"Unknown output format {out.suffix!r} for --out {out}.", hint="Use .npz, .npy or .csv.")
    data = _embeddings_bytes(result, suffix)
    atomic_write(out, lambda f: f.write(data))
    return out


def embed_detected(model, paths, device, flip, batch_size, workers, detector, largest, progress) -> EmbedResult:
    """One row per face found in raw photos; photos without a face are counted and named in a warning."""
    from facecli.faces import embed_photos, no_face_note
    from facecli.ui import warn

    files, _, problems = collect_images(paths)
    if not files:
        raise UserError("No images found in " + ", ".join(str(p) for p in paths) + ".", hint="Pass image files or folders holding .jpg/.png images.")
    found = embed_photos(model, files, detector, largest, device, flip, batch_size, workers, progress)
    if no_face_note(found):
        warn(no_face_note(found))
    if not found.records:
        raise UserError(f"No face found in any of the {found.photos} photo(s).", hint="Try --detector mmod (turned or small faces), or give face crops without --detect.")
    return EmbedResult([r.source for r in found.records], found.embeddings, problems + found.problems, columns={**found.columns(), "quality": found.quality})


def embed_checked(model, paths, device, flip, batch_size, workers, checker, progress) -> EmbedResult:
    """Photos used as given, each only if ``checker`` finds a face in it (``--compare``'s face check)."""
    from facecli.faces import embed_photos, no_face_note

    files, _, problems = collect_images(paths)
    found = embed_photos(model, files, None, False, device, flip, batch_size, workers, progress, face_check=checker)
    if found.no_face:
        raise UserError(no_face_note(found).capitalize() + "; same/different is not decided.",
                        hint="Give photos of faces (or --no-face-check to compare them anyway).")
    return EmbedResult([r.source for r in found.records], found.embeddings, problems + found.problems, columns={"quality": found.quality})


def check_output(out: Path, overwrite: bool) -> Path:
    """Refuse to replace a user's file unless asked to, before any work is done."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists.", hint="Pass --overwrite to replace it, or choose another --out.")
    if out.exists() and not out.is_file():
        raise UserError(f"{out} exists and is not a file.", hint="Choose another --out.")
    return out


def run_embed(checkpoint, paths, out, compare, landmarks, flip, batch_size, device, workers, progress, detector=None, largest=False,
              checker=None, overwrite: bool = False, min_quality: float | None = None) -> int:
    """The ``embed`` command's work; returns the exit status (1 if any image was unreadable).

    ``checkpoint`` may be a ``.pt`` checkpoint or a facecli ``.onnx`` export; with a
    ``detector`` every face of every photo is a row (the largest per photo with ``largest``
    or ``compare``); with a ``checker`` (``--compare`` without ``--detect``) a photo
    without a face is refused before its similarity is computed.
    """
    from facecli.models import load_model
    from facecli.ui import console, warn

    target = None if compare else check_output(Path(out or "embeddings.npz"), overwrite)
    model = load_model(checkpoint, device=device)
    if detector is not None:
        result = embed_detected(model, paths, device, flip, batch_size, workers, detector, largest or compare, progress)
    elif checker is not None:
        result = embed_checked(model, paths, device, flip, batch_size, workers, checker, progress)
    else:
        result = embed_files(model, paths, model.device_for(device), flip, batch_size, workers, landmarks, progress)
    for problem in result.problems:
        warn(f"skipped {problem}")
    if compare:
        compare_two(result, model, checkpoint, min_quality)
    else:
        write_embeddings(result, target)
        console.print(f"Wrote {len(result.paths)} embeddings ({result.embeddings.shape[1]}-d) to {target}", markup=False)
    return 1 if result.problems else 0


def compare_two(result: EmbedResult, model, checkpoint, min_quality: float | None = None) -> None:
    """Print the similarity of two faces, their quality, and same/different at the model's
    verification threshold ("low quality", no decision, when a face is below ``min_quality``)."""
    from facecli.evaluation.quality import quality_problem, verdict
    from facecli.ui import console

    if len(result.paths) != 2:
        raise UserError(f"--compare needs exactly two readable images, got {len(result.paths)}.")
    similarity = float(np.dot(result.embeddings[0].astype(np.float64), result.embeddings[1].astype(np.float64)))
    console.print(f"cosine similarity: {similarity:.4f}", markup=False)
    if model.threshold is None:
        raise UserError(
            f"{checkpoint} stores no verification threshold, so same/different cannot be decided.",
            hint=f"Run `facecli tune-threshold {checkpoint} --save` first.",
        )
    quality = result.columns.get("quality")
    if min_quality is not None and quality_problem(model.model):
        raise UserError(quality_problem(model.model), hint="Drop --min-quality for this model.")
    if quality is not None:
        console.print(f"quality: {float(quality[0]):.2f}, {float(quality[1]):.2f}", markup=False)
    decision = verdict(similarity, model.threshold, [] if quality is None else quality, min_quality)
    console.print(f"{decision} (threshold {model.threshold:.4f}" + ("" if min_quality is None else f", min quality {min_quality:g}") + ")", markup=False)
