"""Warp raw photos to the 112x112 ArcFace template from 5-point landmarks.

Models trained on aligned sets (MS1M, CASIA aligned, the ``.bin`` benchmarks) expect
faces placed exactly like the ArcFace template; a raw photo must be warped the same way
before ``embed`` or training, or accuracy drops sharply. This module does that warp.

Landmarks are five points in image pixels, in this order: left eye, right eye, nose
tip, left mouth corner, right mouth corner ("left/right" as seen in the image). Pixel
coordinates follow the OpenCV/insightface convention (the centre of pixel column ``i``
is at ``x = i``), so landmarks from RetinaFace, SCRFD or MTCNN give the same crops as
insightface's ``norm_crop``. Photos are read with their EXIF orientation applied (as
displayed, and as ``cv2.imread`` decodes them), which is the frame detectors see.

Landmarks files (see :func:`read_landmarks`)::

    path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5          # CSV, header optional
    alice/001.jpg,38.3,51.7,73.5,51.5,...

    {"alice/001.jpg": [[38.3, 51.7], ...], ...}  # JSON, also [x1, y1, ..., y5]
    [{"path": "alice/001.jpg", "landmarks": [...]}, ...]
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facecli.data.images import is_image_file, to_rgb
from facecli.errors import ImageError, UserError

__all__ = [
    "ARCFACE_TEMPLATE",
    "AlignSummary",
    "align_face",
    "align_folder",
    "estimate_similarity",
    "read_landmarks",
]

PathLike = Union[str, os.PathLike]

# Reference positions of the five landmarks in a 112x112 aligned face (insightface).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)

N_POINTS = 5
_N_VALUES = 2 * N_POINTS
_LANDMARK_NAMES = "left eye, right eye, nose tip, left mouth corner, right mouth corner"

# Output format per suffix; anything else is written as PNG under the same stem.
_SAVE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
}
_SAVE_OPTIONS = {
    "JPEG": {"quality": 95},
    "WEBP": {"lossless": True},
}


# --------------------------------------------------------------------------- geometry


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates.")
    return arr


def _spread(centred: np.ndarray, points: np.ndarray) -> float:
    """Largest distance from the centroid, or 0 when that is below rounding noise."""
    radius = float(np.sqrt((centred**2).sum(axis=1).max()))
    magnitude = 1.0 + float(np.abs(points).max())
    return radius if radius > 1e-9 * magnitude else 0.0


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``M`` (2x3) with ``dst ~= M @ [x, y, 1]`` (Umeyama 1991).

    Rotation, uniform scale and translation only: a mirrored point set gets the best
    proper rotation, never a reflection, so an aligned face is never flipped.
    Raises ``ValueError`` for NaN/inf, mismatched shapes, or fewer than two distinct
    points on either side (no scale or rotation is defined then).
    """
    src = _check_points(src, "src")
    dst = _check_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}.")
    if len(src) < 2:
        raise ValueError(f"need at least 2 point pairs, got {len(src)}.")
    mu_src = src.mean(axis=0)
    mu_dst = dst.mean(axis=0)
    xs = src - mu_src
    xd = dst - mu_dst
    if _spread(xs, src) == 0.0:
        raise ValueError("src points all coincide: need at least 2 distinct points.")
    if _spread(xd, dst) == 0.0:
        raise ValueError("dst points all coincide: need at least 2 distinct points.")

    n = len(src)
    cov = xd.T @ xs / n
    u, s, vt = np.linalg.svd(cov)
    # Umeyama's sign fix: flip the weakest axis when U V^T would be a reflection. Using
    # det(U) det(V) rather than det(cov) also covers rank-deficient (collinear) input.
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = (u * d) @ vt
    var_src = (xs**2).sum() / n
    scale = float((s * d).sum() / var_src)
    translation = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> Image.Image:
    """Warp ``image`` so its 5 landmarks land on the ArcFace template scaled to ``size``.

    Bilinear sampling with black outside the photo, as insightface's ``cv2.warpAffine``
    does. Any PIL mode in, RGB ``size`` x ``size`` out.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    size = int(size)
    points = np.asarray(landmarks, dtype=np.float64)
    if points.size != _N_VALUES:
        raise ValueError(f"landmarks must hold {N_POINTS} (x, y) points, got shape {points.shape}.")
    points = points.reshape(N_POINTS, 2)
    matrix = estimate_similarity(points, ARCFACE_TEMPLATE * (size / 112.0))
    linear_inv = np.linalg.inv(matrix[:, :2])
    inverse = np.hstack([linear_inv, (-linear_inv @ matrix[:, 2])[:, None]])
    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    return Image.fromarray(_warp_bilinear(pixels, inverse, size))


def _warp_bilinear(pixels: np.ndarray, inverse: np.ndarray, size: int) -> np.ndarray:
    """Sample ``pixels`` (H, W, 3) at ``inverse @ [x, y, 1]`` for every output pixel.

    Done in numpy rather than with ``Image.transform`` because PIL's affine bilinear
    truncates instead of rounding: every pixel comes out up to one grey level dark and
    an exact integer shift is not an exact copy. Neighbours outside the photo count as
    black, so the face's border fades to black as with ``cv2.BORDER_CONSTANT``.
    """
    height, width = pixels.shape[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    # Clipping keeps far-away coordinates (tiny faces, wild landmarks) inside int64 range;
    # anything clipped samples only outside neighbours, so it is black either way.
    sx = np.clip(inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2], -2.0, width + 1.0)
    sy = np.clip(inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2], -2.0, height + 1.0)
    x0 = np.floor(sx)
    y0 = np.floor(sy)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    out = np.zeros((size, size, pixels.shape[2]), dtype=np.float64)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        taps = pixels[np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
        out += weight * np.where(inside[..., None], taps, 0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------- landmarks files


def _normalise_key(raw: str, where: str) -> str:
    """A landmarks path as a clean relative POSIX path, refusing any that leave the folder."""
    text = raw.strip()
    if not text:
        raise UserError(f"{where}: empty image path.", hint="Give the image path relative to the source folder.")
    text = text.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise UserError(
            f"{where}: absolute path {raw!r} is not allowed.",
            hint="Give image paths relative to the source folder.",
        )
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        raise UserError(
            f"{where}: path {raw!r} leaves the source folder.",
            hint="Give image paths relative to the source folder, without '..'.",
        )
    if norm == ".":
        raise UserError(f"{where}: path {raw!r} names the folder itself, not an image.")
    return norm


def _parse_number(value: object, where: str, position: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: coordinate {position} is {value!r}, not a number.")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise UserError(f"{where}: coordinate {position} is {value!r}, not a number.") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: coordinate {position} is {value!r}, not a finite number.")
    return number


def _parse_points(values: list, where: str) -> np.ndarray:
    """Ten numbers, flat or as five (x, y) pairs, as a (5, 2) array."""
    if values and all(isinstance(v, (list, tuple)) for v in values):
        if len(values) != N_POINTS:
            raise UserError(f"{where}: expected {N_POINTS} [x, y] pairs ({_LANDMARK_NAMES}), got {len(values)}.")
        bad = next((i for i, v in enumerate(values) if len(v) != 2), None)
        if bad is not None:
            raise UserError(f"{where}: pair {bad + 1} has {len(values[bad])} values, expected [x, y].")
        values = [c for pair in values for c in pair]
    if len(values) != _N_VALUES:
        raise UserError(
            f"{where}: expected {_N_VALUES} coordinates x1,y1,...,x5,y5 ({_LANDMARK_NAMES}), got {len(values)}."
        )
    points = np.array([_parse_number(v, where, i + 1) for i, v in enumerate(values)], dtype=np.float64)
    points = points.reshape(N_POINTS, 2)
    if _spread(points - points.mean(axis=0), points) == 0.0:
        raise UserError(f"{where}: all 5 landmarks are the same point.", hint="Check the detector output.")
    return points


def _add(out: dict, seen: dict, key: str, points: np.ndarray, where: str) -> None:
    if key in out:
        raise UserError(f"{where}: {key!r} already has landmarks ({seen[key]}).", hint="Keep one entry per image.")
    out[key] = points
    seen[key] = where


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


LANDMARK_COLUMNS = [f"lm{i}_{a}" for i in range(1, N_POINTS + 1) for a in "xy"]
KEY_COLUMNS = ("source", "path", "image")  # the photo a row's landmarks belong to


def _read_named_csv(rows: list[tuple[int, list[str]]], header: list[str], name: str) -> dict[str, np.ndarray]:
    """A CSV with named columns (``align --detect``'s detections.csv, ``embed --detect --out x.csv``).

    The photo is the ``source`` (else ``path``/``image``) column, the points are lm1_x..lm5_y;
    with a ``face`` column only face 0 of each photo, the detector's best, is used.
    """
    col = {h.strip(): i for i, h in enumerate(header)}
    key_col = next((col[k] for k in KEY_COLUMNS if k in col), None)
    if key_col is None:
        raise UserError(f"{name}, line 1: no column named {', '.join(KEY_COLUMNS)} for the photo.")
    out: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    for line, row in rows:
        where = f"{name}, line {line}"
        if "face" in col and len(row) > col["face"] and row[col["face"]].strip() not in ("0", ""):
            continue
        if len(row) < len(header):
            raise UserError(f"{where}: {len(row)} values for {len(header)} columns.")
        _add(out, seen, _normalise_key(row[key_col], where), _parse_points([row[col[c]] for c in LANDMARK_COLUMNS], where), where)
    return out


def _read_csv(text: str, name: str) -> dict[str, np.ndarray]:
    try:
        rows = [(line, row) for line, row in _csv_rows(text)]
    except csv.Error as e:
        raise UserError(f"{name}: malformed CSV ({e}).") from e
    if rows and all(c in [h.strip() for h in rows[0][1]] for c in LANDMARK_COLUMNS):
        return _read_named_csv(rows[1:], rows[0][1], name)
    return _read_plain_csv(text, name)


def _csv_rows(text: str):
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        while row and not row[-1].strip():
            row.pop()
        if row:
            yield reader.line_num, row


def _read_plain_csv(text: str, name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text))
    first = True
    try:
        for row in reader:
            line = reader.line_num
            while row and not row[-1].strip():  # trailing commas from some exporters
                row.pop()
            if not row:
                continue
            if first:
                first = False
                # A header has the full width and no numbers after the path column; a data
                # line with a typo still has numbers, so it is reported, not skipped.
                if len(row) == 1 + _N_VALUES and not any(_is_number(cell.strip()) for cell in row[1:]):
                    continue
            where = f"{name}, line {line}"
            key = _normalise_key(row[0], where)
            _add(out, seen, key, _parse_points(row[1:], where), where)
    except csv.Error as e:
        raise UserError(f"{name}, line {reader.line_num}: malformed CSV ({e}).") from e
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _read_json(text: str, name: str) -> dict[str, np.ndarray]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}, line {e.lineno}: invalid JSON ({e.msg}).") from e
    except ValueError as e:  # duplicate key
        raise UserError(f"{name}: {e}.", hint="Keep one entry per image.") from e

    out: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    if isinstance(data, dict):
        for raw, values in data.items():
            where = f"{name}, entry {raw!r}"
            key = _normalise_key(raw, where)
            if not isinstance(values, list):
                raise UserError(f"{where}: landmarks must be a list of numbers, got {type(values).__name__}.")
            _add(out, seen, key, _parse_points(values, where), where)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            where = f"{name}, entry {i}"
            if not isinstance(item, dict) or "path" not in item or "landmarks" not in item:
                raise UserError(f"{where}: expected an object with \"path\" and \"landmarks\".")
            if not isinstance(item["path"], str):
                raise UserError(f"{where}: \"path\" must be a string, got {item['path']!r}.")
            where = f"{name}, entry {i} ({item['path']!r})"
            key = _normalise_key(item["path"], where)
            values = item["landmarks"]
            if not isinstance(values, list):
                raise UserError(f"{where}: landmarks must be a list of numbers, got {type(values).__name__}.")
            _add(out, seen, key, _parse_points(values, where), where)
    else:
        raise UserError(
            f"{name}: expected a JSON object {{path: landmarks}} or a list of {{\"path\", \"landmarks\"}} objects."
        )
    return out


def read_landmarks(path: PathLike) -> dict[str, np.ndarray]:
    """Read a CSV or JSON landmarks file into ``{relative/posix/path: (5, 2) array}``.

    JSON is recognised by a ``.json`` suffix or a leading ``{``/``[``; anything else is
    CSV. Every problem is a :class:`UserError` naming the file and the line or entry.
    """
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{name}: landmarks file not found.") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, expected a landmarks CSV or JSON file.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not a UTF-8 text file ({e.reason}).", hint="Give a CSV or JSON file.") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read landmarks file ({e.strerror or e}).") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped[:1] in ("{", "["):
        out = _read_json(text, name)
    else:
        out = _read_csv(text, name)
    if not out:
        raise UserError(f"{name}: no landmarks entries found.", hint="Expected lines `path,x1,y1,...,x5,y5`.")
    return out


# ------------------------------------------------------------------------ folders


@dataclass
class AlignSummary:
    """What :func:`align_folder` did; paths in ``skipped``/``missing``/``unreadable`` are relative to the source."""

    written: list[Path] = field(default_factory=list)  # output files
    skipped: list[str] = field(default_factory=list)  # images in the source with no landmarks entry
    missing: list[str] = field(default_factory=list)  # landmarks entries with no such file
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def describe(self) -> str:
        """One line for the CLI."""
        parts = [f"aligned {len(self.written)} image(s)"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} without landmarks skipped")
        if self.missing:
            parts.append(f"{len(self.missing)} listed but not found")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        return ", ".join(parts) + "."


def load_photo(path: Path, where: str) -> Image.Image:
    """Open, apply EXIF orientation, decode fully; ImageError for anything unreadable."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{where}: file is empty (0 bytes).")
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)  # always a new image, safe after close
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{where}: file not found.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e


def _output_name(rel: str) -> tuple[str, str]:
    """Relative output path and PIL format: same path and format where possible, else PNG."""
    Image.init()  # registers TIFF/WEBP writers; a no-op after the first call
    fmt = _SAVE_FORMATS.get(PurePosixPath(rel).suffix.lower())
    if fmt in Image.SAVE:
        return rel, fmt
    return str(PurePosixPath(rel).with_suffix(".png")), "PNG"


def _save(img: Image.Image, out: Path, fmt: str) -> None:
    """Write via a temporary file so an interrupted run never leaves a truncated image."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain open (not mkstemp) so the file gets the user's umask, not mode 0600.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            img.save(fh, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ImageError):
            raise UserError(f"Could not write {out}: {e.strerror or e}.", hint="Choose a folder you can write to.") from e
        raise


def refuse_existing(outputs: list[Path], overwrite: bool) -> None:
    """A user's file is never replaced without --overwrite: refuse before anything is written."""
    existing = [p for p in outputs if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}; nothing was written.", hint="Pass --overwrite to replace, or choose an empty folder.")


def _pick_single(landmarks: dict[str, np.ndarray], image: Path, landmarks_file: Path) -> np.ndarray:
    """The entry for a single image: keyed by its name, or by a unique path ending in it."""
    name = image.name
    if name in landmarks:
        return landmarks[name]
    matches = [k for k in landmarks if posixpath.basename(k) == name]
    if len(matches) == 1:
        return landmarks[matches[0]]
    if matches:
        raise UserError(
            f"{landmarks_file}: several entries end in {name!r} ({', '.join(sorted(matches)[:3])}).",
            hint="Align the folder instead, or key the entry by the image's name.",
        )
    raise UserError(f"{landmarks_file}: no entry for {name!r}.", hint="Key the entry by the image's file name.")


def _checked_size(size) -> int:
    """The output side in pixels; bools and fractions are refused, not rounded."""
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise UserError(f"--size must be a positive integer, got {size!r}.")
    return int(size)


def _check_output_folder(dst: Path, src_root: Path, dst_root: Path) -> None:
    """Refuse an output that is a file, or the source folder or inside it."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder.", hint="Give a new or existing output folder.")
    if dst_root == src_root or src_root in dst_root.parents:
        raise UserError(
            f"{dst}: output folder is the source folder or inside it.",
            hint="Write aligned images to a separate folder.",
        )


def _plan_outputs(
    landmarks: dict[str, np.ndarray], src: Path, src_root: Path, dst_root: Path, landmarks_path: Path
) -> list[tuple[str, Path, Path, str]]:
    """[(entry, source, output, format)] in entry order, refusing collisions and writes into the source.

    Planned up front so a bad entry is refused before any image is written.
    """
    plan: list[tuple[str, Path, Path, str]] = []
    targets: dict[Path, str] = {}
    for rel in sorted(landmarks):
        out_rel, fmt = _output_name(rel)
        out = dst_root / out_rel
        if src_root == out or src_root in out.parents:
            raise UserError(f"{landmarks_path}: output for {rel!r} would overwrite the source folder ({out}).")
        if out in targets:
            raise UserError(
                f"{landmarks_path}: {targets[out]!r} and {rel!r} would both be written to {out}.",
                hint="Rename one of the images.",
            )
        targets[out] = rel
        plan.append((rel, src / rel, out, fmt))
    return plan


def _unlisted_images(src: Path, listed: set[str]) -> list[str]:
    """Images under ``src`` with no landmarks entry, sorted: reported as skipped."""
    return sorted(
        rel
        for rel in (p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and is_image_file(p))
        if rel not in listed
    )


def _align_planned(
    plan: list[tuple[str, Path, Path, str]],
    landmarks: dict[str, np.ndarray],
    size: int,
    summary: AlignSummary,
    progress: Callable[[int], None] | None,
) -> None:
    """Align and write each planned image; missing and unreadable ones go to ``summary``, not raised."""
    for rel, source, out, fmt in plan:
        if not source.is_file():
            summary.missing.append(rel)
        else:
            try:
                photo = load_photo(source, str(source))
            except ImageError as e:
                summary.unreadable.append((rel, str(e)))
            else:
                _save(align_face(photo, landmarks[rel], size), out, fmt)
                summary.written.append(out)
        if progress is not None:
            progress(1)


def align_folder(
    src_dir: PathLike,
    dst_dir: PathLike,
    landmarks_file: PathLike,
    size: int = 112,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> AlignSummary:
    """Align every image listed in ``landmarks_file`` from ``src_dir`` into ``dst_dir``.

    Outputs keep the relative path (``.jpg`` as JPEG quality 95, other formats as
    themselves, unknown ones as ``.png``). Missing and unreadable images are reported in
    the summary, not raised, so one bad photo does not stop a large job; entries that
    would leave the source folder, or outputs that would overwrite sources, are refused
    before anything is written. ``progress(1)`` is called once per landmarks entry.

    ``src_dir`` may also be a single image: its entry is keyed by its file name, and
    ``dst_dir`` is the output file (if it has an image suffix and is not a folder) or
    the folder to write it into. An unreadable single image raises :class:`ImageError`.
    """
    size = _checked_size(size)
    src = Path(src_dir)
    dst = Path(dst_dir)
    landmarks_path = Path(landmarks_file)
    if not src.exists():
        raise UserError(f"{src}: source not found.", hint="Give an image folder or a single image.")
    landmarks = read_landmarks(landmarks_path)
    if src.is_file():
        return _align_single(src, dst, landmarks_path, landmarks, size, progress, overwrite)

    src_root = src.resolve()
    dst_root = dst.resolve()
    _check_output_folder(dst, src_root, dst_root)
    plan = _plan_outputs(landmarks, src, src_root, dst_root, landmarks_path)
    refuse_existing([out for _, _, out, _ in plan], overwrite)
    summary = AlignSummary()
    summary.skipped = _unlisted_images(src, set(landmarks))
    _align_planned(plan, landmarks, size, summary, progress)
    return summary


def _align_single(
    image: Path,
    dst: Path,
    landmarks_path: Path,
    landmarks: dict[str, np.ndarray],
    size: int,
    progress: Callable[[int], None] | None,
    overwrite: bool = False,
) -> AlignSummary:
    points = _pick_single(landmarks, image, landmarks_path)
    if dst.is_dir() or not dst.suffix:
        out_name, fmt = _output_name(image.name)
        out = dst / out_name
    else:
        out_name, fmt = _output_name(dst.name)
        out = dst.with_name(out_name)
    if out.exists() and out.resolve() == image.resolve():
        raise UserError(f"{out}: output would overwrite the source image.", hint="Give another output path.")
    refuse_existing([out], overwrite)
    photo = load_photo(image, str(image))
    _save(align_face(photo, points, size), out, fmt)
    if progress is not None:
        progress(1)
    return AlignSummary(written=[out])
