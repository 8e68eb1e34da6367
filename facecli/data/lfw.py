"""LFW protocol files: locating the images and reading pairs files into a :class:`PairSet`.

Formats (LFW README, sections 3c and 3d). Fields are tab-separated in the official
files; any whitespace is accepted here.

* ``pairs.txt`` (View 2): header ``<folds> <n>``, then for each fold ``n`` matched
  lines ``name i j`` followed by ``n`` mismatched lines ``name1 i name2 j``.
* ``pairsDevTrain.txt`` / ``pairsDevTest.txt`` (View 1): header ``<n>``, then ``n``
  matched and ``n`` mismatched lines (one fold).

Image ``i`` of ``name`` is ``<root>/<name>/<name>_<i:04d>.jpg``. Names come from a
file the user may have downloaded from anywhere, so a name that could leave the image
root (``..``, path separators, absolute paths) is refused, and every resolved image
path, symlinks followed, must lie inside the image root.

Missing images. By default any missing image is an error listing the first few pair
lines. With ``allow_missing=True`` those pairs are dropped and counted in
``PairSet.missing``; the remaining pairs keep their original fold in
``PairSet.fold_of_pair`` (folds are *not* re-cut into equal blocks, which would move
pairs between folds and tune thresholds on pairs that are also tested). Evaluate with
``verify(scores, ps.issame, folds=ps.folds, fold_of_pair=ps.fold_of_pair)``, which is
also correct when nothing is missing. A fold that loses every pair is an error.

Blank lines are ignored; line numbers in messages are the file's physical lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facecli.errors import UserError

IMAGE_ROOT_NAMES = ("lfw_funneled", "lfw", "lfw-deepfunneled")
_SHOW_MISSING = 5


@dataclass(frozen=True, eq=False)
class PairSet:
    """Verification pairs in file order, with the distinct images indexed for embedding once."""

    pairs: list  # [(path_a, path_b)] as Paths under image_root, file order
    issame: np.ndarray  # bool, one per pair
    folds: int  # as announced by the header: 10 for pairs.txt, 1 for a dev file
    per_fold: int  # pairs per fold announced by the header (matched + mismatched)
    unique_images: list  # sorted distinct Paths of the kept pairs
    index_a: np.ndarray  # int64 index into unique_images of each pair's first image
    index_b: np.ndarray  # int64 index into unique_images of each pair's second image
    missing: int  # pairs dropped because an image is missing (only with allow_missing)
    source: Path  # the pairs file
    fold_of_pair: np.ndarray = field(default=None)  # int64 original fold of each kept pair
    lines: np.ndarray = field(default=None)  # int64 1-based line of each kept pair in source
    image_root: Path | None = None

    def __len__(self) -> int:
        return len(self.pairs)


def find_image_root(lfw_dir) -> Path:
    """The folder holding ``<name>/<name>_NNNN.jpg``: a known sub-folder of ``lfw_dir``, or itself."""
    d = Path(lfw_dir).expanduser()
    if not d.is_dir():
        raise UserError(
            f"{d}: LFW folder not found (not a directory).",
            hint="Pass the folder that holds the LFW images (or lfw/, lfw_funneled/, lfw-deepfunneled/).",
        )
    for name in IMAGE_ROOT_NAMES:
        if (d / name).is_dir():
            return d / name
    if _has_person_folder(d):
        return d
    looked = ", ".join(f"{n}/" for n in IMAGE_ROOT_NAMES)
    raise UserError(
        f"{d}: no LFW images found; looked for the sub-folders {looked} and for person folders "
        f"(<name>/<name>_0001.jpg) directly inside it.",
        hint="Extract the LFW image archive there or point at the folder it created.",
    )


def _has_person_folder(d: Path) -> bool:
    """True at the first sub-folder ``X`` holding ``X_0001.jpg`` (every LFW person has one)."""
    with os.scandir(d) as it:
        for entry in it:
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, f"{entry.name}_0001.jpg")):
                return True
    return False


def image_path(image_root: Path, name: str, number: int) -> Path:
    """Where LFW keeps image ``number`` of ``name``."""
    return Path(image_root) / name / f"{name}_{number:04d}.jpg"


# --------------------------------------------------------------------------- parsing


def _read_rows(src: Path) -> list[tuple[int, list[str]]]:
    if not src.is_file():
        raise UserError(
            f"{src}: pairs file not found.",
            hint="Pass the path of pairs.txt, pairsDevTrain.txt or pairsDevTest.txt.",
        )
    try:
        text = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = src.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"{src}, line {line}: not a text pairs file (bytes that are not UTF-8).",
            hint="Use the plain-text pairs files from the LFW website.",
        ) from e
    lines = text.replace("\r\n", "\n").split("\n")
    return [(no, line.split()) for no, line in enumerate(lines, start=1) if line.strip()]


def _parse_header(src: Path, rows) -> tuple[int, int, int]:
    """(line number, folds, matched pairs per fold) from the first non-blank line."""
    if not rows:
        raise UserError(
            f"{src}, line 1: the file is empty.",
            hint="A pairs file starts with '<folds> <n>' (pairs.txt) or '<n>' (pairsDev*.txt).",
        )
    no, toks = rows[0]
    if len(toks) in (1, 2) and all(t.isascii() and t.isdigit() and int(t) >= 1 for t in toks):
        nums = [int(t) for t in toks]
        folds, n = (1, nums[0]) if len(nums) == 1 else (nums[0], nums[1])
        return no, folds, n
    raise UserError(
        f"{src}, line {no}: malformed header {' '.join(toks)!r}; expected '<folds> <n>' "
        f"(pairs.txt, e.g. '10 300') or '<n>' (pairsDevTrain/pairsDevTest.txt) with positive integers.",
        hint="Copies of the dev files without their header line need it restored: the number of matched pairs.",
    )


def _index(src: Path, no: int, tok: str) -> int:
    if tok.isascii() and tok.isdigit() and int(tok) >= 1:
        return int(tok)
    raise UserError(
        f"{src}, line {no}: image number {tok!r} is not a positive integer (images are numbered from 1).",
        hint="Fix or re-download the pairs file.",
    )


def _check_name(src: Path, no: int, name: str) -> str:
    bad = (
        ".." in name
        or name in (".",)
        or "/" in name
        or "\\" in name
        or (os.sep in name)
        or (os.altsep is not None and os.altsep in name)
        or "\x00" in name
        or os.path.isabs(name)
        or bool(Path(name).drive)
    )
    if bad:
        raise UserError(
            f"{src}, line {no}: refusing person name {name!r}: it would point outside the image root "
            f"(names must be plain folder names, without '..', path separators or a drive).",
            hint="Use a pairs file from a trusted source.",
        )
    return name


def _parse_pairs(src: Path, rows, hno: int, folds: int, n: int):
    """Per pair line: (line number, fold, issame, name_a, i, name_b, j), checked for layout."""
    per_fold = 2 * n
    expected = folds * per_fold
    body = rows[1:]
    layout = f"the header on line {hno} announces {folds} fold(s) x ({n} matched + {n} mismatched) = {expected} pair lines"
    if len(body) < expected:
        last = body[-1][0] if body else hno
        raise UserError(
            f"{src}, line {last + 1}: the file ends after {len(body)} pair lines, but {layout}.",
            hint="The file is truncated or its header is wrong; re-download it.",
        )
    if len(body) > expected:
        raise UserError(
            f"{src}, line {body[expected][0]}: extra line; {layout}.",
            hint="Remove the extra lines or fix the header.",
        )
    out = []
    for k, (no, toks) in enumerate(body):
        fold, pos = divmod(k, per_fold)
        same = pos < n
        where = f"{src}, line {no}"
        what = (
            f"pair {pos + 1} of fold {fold + 1}; each fold has {n} matched pairs 'name i j' "
            f"then {n} mismatched pairs 'name1 i name2 j'"
        )
        if same and len(toks) == 4:
            raise UserError(f"{where}: expected a matched pair 'name i j' but found a mismatched pair ({what}).",
                            hint="The lines are out of order or the header is wrong.")
        if not same and len(toks) == 3:
            raise UserError(f"{where}: expected a mismatched pair 'name1 i name2 j' but found a matched pair ({what}).",
                            hint="The lines are out of order or the header is wrong.")
        if len(toks) not in (3, 4):
            form = "3 fields 'name i j'" if same else "4 fields 'name1 i name2 j'"
            raise UserError(f"{where}: wrong number of fields: expected {form}, found {len(toks)}.",
                            hint="Fields are separated by tabs or spaces; names contain no spaces.")
        if same:
            name_a = name_b = _check_name(src, no, toks[0])
            i, j = _index(src, no, toks[1]), _index(src, no, toks[2])
        else:
            name_a, name_b = _check_name(src, no, toks[0]), _check_name(src, no, toks[2])
            i, j = _index(src, no, toks[1]), _index(src, no, toks[3])
            if name_a == name_b:
                raise UserError(
                    f"{where}: a mismatched pair must name two different people, found {name_a!r} twice ({what}).",
                    hint="Fix or re-download the pairs file.",
                )
        out.append((no, fold, same, name_a, i, name_b, j))
    return out


# --------------------------------------------------------------------------- images


def _inside(path: str, root_real: str) -> bool:
    return Path(path).is_relative_to(root_real)


def _check_images(src: Path, root: Path, parsed) -> dict[Path, str | None]:
    """For each distinct image: None if present, else why it is missing; refuses escapes."""
    root_real = os.path.realpath(root)
    dir_state: dict[str, bool] = {}
    status: dict[Path, str | None] = {}
    for no, _, _, name_a, i, name_b, j in parsed:
        for name, num in ((name_a, i), (name_b, j)):
            p = image_path(root, name, num)
            if p in status:
                continue
            if name not in dir_state:
                d = os.path.join(root, name)
                exists = os.path.isdir(d)
                if exists and not _inside(os.path.realpath(d), root_real):
                    raise UserError(
                        f"{src}, line {no}: folder {d} resolves to {os.path.realpath(d)}, outside the image root "
                        f"{root_real}; refusing to read it.",
                        hint="Replace the symlink with the images themselves.",
                    )
                dir_state[name] = exists
            if not dir_state[name]:
                status[p] = f"no folder {name!r}"
                continue
            fp = os.fspath(p)
            if os.path.islink(fp) and not _inside(os.path.realpath(fp), root_real):
                raise UserError(
                    f"{src}, line {no}: image {fp} resolves to {os.path.realpath(fp)}, outside the image root "
                    f"{root_real}; refusing to read it.",
                    hint="Replace the symlink with the image itself.",
                )
            status[p] = None if os.path.isfile(fp) else "no such image"
    return status


# --------------------------------------------------------------------------- API


def _split_found(root: Path, parsed, status: dict[Path, str | None]) -> tuple[list, list[str]]:
    """Pairs with both images present, as (line, fold, issame, path_a, path_b), and 'line N (why)' for the rest."""
    kept, dropped = [], []
    for rec in parsed:
        no, _, _, name_a, i, name_b, j = rec
        pa, pb = image_path(root, name_a, i), image_path(root, name_b, j)
        why = [f"{p.relative_to(root)}: {status[p]}" for p in (pa, pb) if status[p] is not None]
        if why:
            dropped.append(f"line {no} ({'; '.join(why)})")
        else:
            kept.append((no, rec[1], rec[2], pa, pb))
    return kept, dropped


def _refuse_missing(src: Path, root: Path, n_pairs: int, kept: list, dropped: list[str], allow_missing: bool) -> None:
    """Missing images are an error unless allowed (naming the first few lines); no pair left always is."""
    if dropped and not allow_missing:
        shown = ", ".join(dropped[:_SHOW_MISSING])
        more = f" and {len(dropped) - _SHOW_MISSING} more" if len(dropped) > _SHOW_MISSING else ""
        raise UserError(
            f"{src}: {len(dropped)} of {n_pairs} pairs refer to images missing under {root}: {shown}{more}.",
            hint="Check that the image root belongs to this pairs file, or pass --allow-missing to "
            "evaluate without those pairs (reported as missing).",
        )
    if not kept:
        raise UserError(f"{src}: none of its {n_pairs} pairs has both images under {root}.",
                        hint="Point at the folder holding the LFW images.")


def _refuse_empty_fold(src: Path, rows, fold_of_pair: np.ndarray, folds: int, n: int) -> None:
    """A fold that lost every pair cannot be tested, so the k-fold protocol is refused, not skewed."""
    empty = np.flatnonzero(np.bincount(fold_of_pair, minlength=folds) == 0)
    if len(empty):
        f = int(empty[0])
        start = rows[1 + f * 2 * n][0]
        end = rows[(f + 1) * 2 * n][0]
        raise UserError(
            f"{src}, line {start}: every pair of fold {f + 1} (lines {start}-{end}) has a missing image, so the "
            f"{folds}-fold protocol cannot be run.",
            hint="Restore the missing images.",
        )


def _pair_set(kept: list, folds: int, n: int, missing: int, src: Path, root: Path, fold_of_pair) -> PairSet:
    """The kept pairs, with their distinct images indexed so each is embedded once."""
    pairs = [(k[3], k[4]) for k in kept]
    unique = sorted({p for pair in pairs for p in pair})
    position = {p: idx for idx, p in enumerate(unique)}
    return PairSet(
        pairs=pairs,
        issame=np.array([k[2] for k in kept], dtype=np.bool_),
        folds=folds,
        per_fold=2 * n,
        unique_images=unique,
        index_a=np.array([position[a] for a, _ in pairs], dtype=np.int64),
        index_b=np.array([position[b] for _, b in pairs], dtype=np.int64),
        missing=missing,
        source=src,
        fold_of_pair=fold_of_pair,
        lines=np.array([k[0] for k in kept], dtype=np.int64),
        image_root=root,
    )


def read_pairs(pairs_file, image_root, allow_missing: bool = False) -> PairSet:
    """Read an LFW pairs file (``pairs.txt`` or a dev file) against the images under ``image_root``."""
    src = Path(pairs_file).expanduser()
    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: image root not found (not a directory).",
                        hint="Pass the folder holding <name>/<name>_NNNN.jpg (see find_image_root).")
    rows = _read_rows(src)
    hno, folds, n = _parse_header(src, rows)
    parsed = _parse_pairs(src, rows, hno, folds, n)
    kept, dropped = _split_found(root, parsed, _check_images(src, root, parsed))
    _refuse_missing(src, root, len(parsed), kept, dropped, allow_missing)
    fold_of_pair = np.array([k[1] for k in kept], dtype=np.int64)
    _refuse_empty_fold(src, rows, fold_of_pair, folds, n)
    return _pair_set(kept, folds, n, len(dropped), src, root, fold_of_pair)
