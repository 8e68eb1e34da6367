"""IJB-B / IJB-C in insightface's ``IJB_release`` layout: the meta files and the aligned crops.

The layout (what insightface's ``eval_ijbc.py`` reads)::

    DIR/loose_crop/<image>                          the photos / video frames
    DIR/meta/<t>_name_5pts_score.txt                image x1 y1 ... x5 y5 detector_score   (one face a line)
    DIR/meta/<t>_face_tid_mid.txt                   image template_id media_id            (same rows, same order)
    DIR/meta/<t>_template_pair_label.txt            template1 template2 label (1 same, 0 different)

with ``<t>`` = ``ijbc`` or ``ijbb``. The two face files are row-aligned, as in the release:
row i of one describes the same face as row i of the other (a row whose image names disagree
is an error). An image listed on several rows must repeat the same landmarks and score: it is
one image, embedded once. Every malformed line is a one-line :class:`UserError` naming the
file and line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facecli.errors import ImageError, UserError

TARGETS = ("IJBC", "IJBB")


def meta_path(ijb_dir: Path, target: str, kind: str) -> Path:
    """``DIR/meta/ijbc_<kind>.txt``: the release spells the target in lower case."""
    return Path(ijb_dir) / "meta" / f"{target.lower()}_{kind}.txt"


def resolve_ijb_dir(ijb_dir: Path, target: str) -> Path:
    """``IJB_release/IJBC`` as given, or ``IJB_release`` itself (its ``IJBC/`` sub-folder is taken)."""
    sub = Path(ijb_dir) / target.upper()
    return sub if not (Path(ijb_dir) / "meta").is_dir() and (sub / "meta").is_dir() else Path(ijb_dir)


@dataclass
class IjbMeta:
    """One target's protocol: per-face rows, the distinct images, and the template pairs."""

    target: str
    image_names: list[str]  # distinct images, first-seen order
    landmarks: np.ndarray  # (I, 5, 2) float64, per distinct image
    detector_scores: np.ndarray  # (I,) float64, per distinct image
    image_lines: np.ndarray  # (I,) line of the 5pts file that first lists each image
    face_image: np.ndarray  # (F,) int64: row -> distinct image
    face_template: np.ndarray  # (F,) int64 template id
    face_media: np.ndarray  # (F,) int64 media id
    pair_t1: np.ndarray  # (P,) int64
    pair_t2: np.ndarray  # (P,) int64
    pair_label: np.ndarray  # (P,) bool


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: missing (an IJB_release folder has meta/{path.name}).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e}).") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise UserError(f"{path}: empty.")
    return rows


def _number(text: str, path: Path, line: int, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{path}:{line}: {what} {text!r} is not a{'n integer' if kind is int else ' number'}.") from None
    if kind is float and not np.isfinite(value):
        raise UserError(f"{path}:{line}: {what} {text!r} is not finite.")
    return value


def _fields(fields: list[str], count: int, path: Path, line: int, layout: str) -> None:
    if len(fields) != count:
        raise UserError(f"{path}:{line}: expected {count} fields ({layout}), got {len(fields)}.")


def _read_faces(path: Path):
    """Names, landmarks and scores per row of ``<t>_name_5pts_score.txt``."""
    names, points, scores, line_numbers = [], [], [], []
    for line, f in _lines(path):
        _fields(f, 12, path, line, "image x1 y1 ... x5 y5 score")
        names.append(f[0])
        line_numbers.append(line)
        points.append([_number(v, path, line, float, "landmark coordinate") for v in f[1:11]])
        scores.append(_number(f[11], path, line, float, "detector score"))
    return names, np.asarray(points, dtype=np.float64).reshape(-1, 5, 2), np.asarray(scores, dtype=np.float64), line_numbers


def _distinct(names, points, scores, line_numbers, path: Path):
    """One entry per distinct image; a repeated image must repeat its landmarks and score."""
    where: dict[str, int] = {}
    first_line: list[int] = []
    face_image = np.empty(len(names), dtype=np.int64)
    for row, name in enumerate(names):
        k = where.get(name)
        if k is None:
            k = where[name] = len(first_line)
            first_line.append(row)
        else:
            j = first_line[k]
            if not (np.array_equal(points[row], points[j]) and scores[row] == scores[j]):
                raise UserError(
                    f"{path}:{line_numbers[row]}: {name} is listed again with other landmarks or score than on line {line_numbers[j]}."
                )
        face_image[row] = k
    rows = np.asarray(first_line, dtype=np.int64)
    return list(where), points[rows], scores[rows], np.asarray(line_numbers, dtype=np.int64)[rows], face_image


def _read_templates(path: Path, names: list[str], faces_path: Path):
    rows = _lines(path)
    if len(rows) != len(names):
        raise UserError(f"{path}: {len(rows)} rows but {faces_path.name} has {len(names)}: the two files must list the same faces in the same order.")
    templates, medias = [], []
    for (line, f), name in zip(rows, names):
        _fields(f, 3, path, line, "image template_id media_id")
        if f[0] != name:
            raise UserError(f"{path}:{line}: image {f[0]!r} but the same row of {faces_path.name} is {name!r}.")
        templates.append(_number(f[1], path, line, int, "template id"))
        medias.append(_number(f[2], path, line, int, "media id"))
    return np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def _read_pairs(path: Path, known: set[int]):
    t1, t2, label = [], [], []
    for line, f in _lines(path):
        _fields(f, 3, path, line, "template1 template2 label")
        a, b = (_number(v, path, line, int, "template id") for v in f[:2])
        y = _number(f[2], path, line, int, "label")
        if y not in (0, 1):
            raise UserError(f"{path}:{line}: label {f[2]!r} must be 1 (same person) or 0.")
        for t in (a, b):
            if t not in known:
                raise UserError(f"{path}:{line}: template {t} has no face in the face_tid_mid file.")
        t1.append(a), t2.append(b), label.append(bool(y))
    return np.asarray(t1, dtype=np.int64), np.asarray(t2, dtype=np.int64), np.asarray(label, dtype=bool)


def read_ijb_meta(ijb_dir: Path, target: str = "IJBC") -> IjbMeta:
    """Read and cross-check the three meta files of ``target`` under ``ijb_dir``."""
    target = target.upper()
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}.")
    faces_path = meta_path(ijb_dir, target, "name_5pts_score")
    names, points, scores, line_numbers = _read_faces(faces_path)
    image_names, landmarks, detector_scores, image_lines, face_image = _distinct(names, points, scores, line_numbers, faces_path)
    templates, medias = _read_templates(meta_path(ijb_dir, target, "face_tid_mid"), names, faces_path)
    t1, t2, label = _read_pairs(meta_path(ijb_dir, target, "template_pair_label"), set(templates.tolist()))
    return IjbMeta(target, image_names, landmarks, detector_scores, image_lines, face_image, templates, medias, t1, t2, label)


def check_images(ijb_dir: Path, meta: IjbMeta) -> Path:
    """``DIR/loose_crop``, after checking that every listed image is there (a missing one: one line)."""
    root = Path(ijb_dir) / "loose_crop"
    if not root.is_dir():
        raise UserError(f"{root}: missing (an IJB_release folder holds the images in loose_crop/).")
    faces_path = meta_path(ijb_dir, meta.target, "name_5pts_score")
    for name, line in zip(meta.image_names, meta.image_lines):
        if not (root / name).is_file():
            raise UserError(f"{root / name}: missing (listed on {faces_path}:{int(line)}).")
    return root


class AlignedCrops(Dataset):
    """``loose_crop`` images warped to the ArcFace template at the network's input size.

    Samples are ``(uint8 (3, S, S) image, index, problem)`` like :class:`ImageFiles`; an
    unreadable image is reported through ``problem`` (the embedder collects them).
    """

    def __init__(self, root: Path, names: list[str], landmarks: np.ndarray, image_size: int):
        self.root, self.names, self.landmarks, self.image_size = Path(root), list(names), landmarks, int(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        from facecli.align import align_face
        from facecli.data.images import _open, read_image_bytes

        where = str(self.root / self.names[index])
        try:
            img = _open(read_image_bytes(self.root / self.names[index], where), where)
            face = align_face(img, self.landmarks[index], size=self.image_size)
        except ImageError as e:
            return None, index, str(e)
        except (OSError, ValueError) as e:
            return None, index, f"{where}: {type(e).__name__}: {e}"
        return torch.from_numpy(np.asarray(face, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous(), index, None


# --------------------------------------------------------------------------- an IJB-format set from identity folders


@dataclass
class IjbBuildSummary:
    out_dir: Path
    identities: int
    images: int
    face_rows: int
    templates: int
    media: int
    genuine_pairs: int
    impostor_pairs: int


def identity_folders(src: Path, max_identities: int | None) -> list[tuple[str, list[Path]]]:
    from facecli.data.images import is_image_file

    from facecli.data.lfw import IMAGE_ROOT_NAMES

    if not Path(src).is_dir():
        raise UserError(f"{src}: not a folder of identity folders.")
    src = next((Path(src) / n for n in IMAGE_ROOT_NAMES if (Path(src) / n).is_dir()), Path(src))  # an LFW folder: its images
    people = []
    for folder in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.is_file() and is_image_file(f))
        if len(files) >= 2:
            people.append((folder.name, files))
    if len(people) < 2:
        raise UserError(f"{src}: needs at least 2 identity folders with 2 or more images each, found {len(people)}.")
    return people[:max_identities] if max_identities else people


def _source_landmarks(width: int, height: int) -> np.ndarray:
    """The template in the image's centre crop: where an aligned (or LFW-centred) face has its points."""
    from facecli.align import ARCFACE_TEMPLATE
    from facecli.data.images import resolve_crop

    side = min(width, height) * resolve_crop((width, height), None)
    return ARCFACE_TEMPLATE * (side / 112.0) + np.array([(width - side) / 2, (height - side) / 2])


def _jitter(image, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The photo turned, scaled and shifted at random (so alignment matters), and its landmarks moved with it."""
    from facecli.align import _warp_bilinear
    from facecli.data.images import to_rgb

    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    h, w = pixels.shape[:2]
    size = max(w, h)
    angle, scale = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.8, 1.0)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([w / 2, h / 2])
    shift = np.array([size / 2, size / 2]) + rng.uniform(-0.05, 0.05, 2) * size
    forward = np.hstack([rot, (shift - rot @ centre)[:, None]])
    inv = np.linalg.inv(rot)
    inverse = np.hstack([inv, (-inv @ forward[:, 2])[:, None]])
    points = _source_landmarks(w, h) @ rot.T + forward[:, 2]
    return _warp_bilinear(pixels, inverse, size), np.round(points, 3)


def _templates_of(files: list[Path], rng: np.random.Generator, templates: int) -> list[list[list[int]]]:
    """Split one person's images into ``templates`` templates of media (1-3 images each).

    The last image of each template is also put in the next one: IJB lists a crop on several
    rows, and the evaluation must embed it once.
    """
    order = rng.permutation(len(files)).tolist()
    parts = [order[i::templates] for i in range(templates)]
    parts = [p for p in parts if p]
    for i in range(1, len(parts)):
        parts[i] = parts[i] + [parts[i - 1][-1]]
    out = []
    for part in parts:
        media, i = [], 0
        while i < len(part):
            k = int(rng.integers(1, 4))
            media.append(part[i : i + k])
            i += k
        out.append(media)
    return out


def _write_text(path: Path, lines: list[str]) -> None:
    from facecli.engine.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def build_ijb_from_folders(src: Path, out_dir: Path, target: str = "IJBC", seed: int = 0, templates_per_identity: int = 2,
                           max_identities: int | None = None, max_impostors: int = 100_000,
                           progress=None) -> IjbBuildSummary:
    """Write ``out_dir`` in the IJB_release layout from identity folders (synthetic set or LFW people).

    Landmarks: the ArcFace template in each photo's centre crop (exact for aligned crops,
    approximate for LFW), moved by a random turn/scale/shift applied to the photo. Detector
    scores: seeded uniform in [0.5, 1] (no detector ran; they exercise the D1 weighting).
    """
    from PIL import Image

    target = target.upper()
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}.")
    out_dir = Path(out_dir)
    if (out_dir / "meta").exists() or (out_dir / "loose_crop").exists():
        raise UserError(f"{out_dir} already holds an IJB layout; choose another folder.")
    people = identity_folders(src, max_identities)
    rng = np.random.default_rng(seed)
    crops = out_dir / "loose_crop"
    crops.mkdir(parents=True)
    faces, tid_mid, owner = [], [], []
    media_id = template_id = 0
    for person, (name, files) in enumerate(people):
        written = {}
        for media_list in _templates_of(files, rng, templates_per_identity):
            template_id += 1
            owner.append(person)
            for media in media_list:
                media_id += 1
                for k in media:
                    if k not in written:
                        with Image.open(files[k]) as img:
                            pixels, points = _jitter(img, rng)
                        crop = f"{person + 1}_{k + 1}.jpg"
                        Image.fromarray(pixels).save(crops / crop, quality=95)
                        written[k] = (crop, " ".join(f"{v:.3f}" for v in points.reshape(-1)), f"{rng.uniform(0.5, 1.0):.6f}")
                        if progress:
                            progress(1)
                    crop, points_text, score = written[k]
                    faces.append(f"{crop} {points_text} {score}")
                    tid_mid.append(f"{crop} {template_id} {media_id}")
    genuine, impostor = _template_pairs(np.asarray(owner), rng, max_impostors)
    (out_dir / "meta").mkdir()
    _write_text(meta_path(out_dir, target, "name_5pts_score"), faces)
    _write_text(meta_path(out_dir, target, "face_tid_mid"), tid_mid)
    _write_text(meta_path(out_dir, target, "template_pair_label"), [f"{a + 1} {b + 1} 1" for a, b in genuine] + [f"{a + 1} {b + 1} 0" for a, b in impostor])
    images = len({line.split()[0] for line in faces})
    return IjbBuildSummary(out_dir, len(people), images, len(faces), template_id, media_id, len(genuine), len(impostor))


def _template_pairs(owner: np.ndarray, rng: np.random.Generator, max_impostors: int):
    """All same-person template pairs; all different-person ones, or a seeded sample of ``max_impostors``."""
    a, b = np.triu_indices(len(owner), k=1)
    same = owner[a] == owner[b]
    genuine = list(zip(a[same].tolist(), b[same].tolist()))
    ia, ib = a[~same], b[~same]
    if len(ia) > max_impostors:
        pick = np.sort(rng.choice(len(ia), max_impostors, replace=False))
        ia, ib = ia[pick], ib[pick]
    return genuine, list(zip(ia.tolist(), ib.tolist()))
