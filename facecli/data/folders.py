"""Identity-folder datasets (the CASIA-WebFace layout: ``root/<identity>/<image>``).

The folder tree is indexed once, when the dataset is built (:mod:`facecli.data.index`:
numpy arrays, cached between runs and shared between ranks): identities are the sorted
sub-folder names, labels are their positions. The label map (``classes``) travels with
every checkpoint, so a resumed run or an evaluation never re-derives it from a tree that
may have changed.

Samples are ``(image, label, bad)``: a uint8 tensor, its label, and ``None``; or
``(None, label, reason)`` when the file cannot be decoded. A corrupt JPEG deep in
CASIA-WebFace must never stop an epoch: :func:`collate_samples` drops such samples and the
trainer reports the count and the first paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from facecli.data.device_decode import Encoded, EncodedBatch
from facecli.data.images import Preprocess, decode_image, read_image_bytes
from facecli.data.index import FolderIndex, PackedStrings, load_index
from facecli.errors import ImageError, UserError


def read_identity_list(path: str | os.PathLike) -> list[str]:
    """Identity names from a file: one per line, or LFW's ``people*.txt`` (``name<TAB>count``,
    with an optional first line holding the number of people)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Identity list {str(p)!r} does not exist or is not a file.")
    names: list[str] = []
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if n == 1 and len(fields) == 1 and fields[0].isdigit():
            continue  # LFW's header: the number of people
        name = fields[0]
        if "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"{p}:{n}: {name!r} is not an identity folder name.")
        names.append(name)
    if not names:
        raise UserError(f"Identity list {str(p)!r} names no identities.")
    return list(dict.fromkeys(names))


DECODE_MODES = ("cpu", "gpu")


class PathList(Sequence[str]):
    """The dataset's file paths, built on access from the packed index (no list of strings)."""

    def __init__(self, root: str, files: PackedStrings):
        self._prefix = root + os.sep
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self._prefix + self._files[i]


class IdentityFolderDataset(Dataset):
    """``root/<identity>/<image>`` as a labelled face dataset."""

    def __init__(
        self,
        root: str | os.PathLike,
        preprocess: Preprocess,
        classes: Sequence[str] | None = None,
        identities: Iterable[str] | None = None,
        decode: str = "cpu",
        index_cache: str | os.PathLike | None | bool = None,
        coordinate: bool = False,
    ):
        """``classes`` fixes the label map (resume, fine-tuning); ``identities`` restricts the
        identities used (e.g. LFW's ``peopleDevTrain.txt``) and orders labels by that list.
        ``decode="gpu"``: samples carry the encoded file (:class:`Encoded`) for
        :func:`facecli.data.device_decode.decode_batch`. ``index_cache`` and ``coordinate``:
        see :func:`facecli.data.index.load_index`."""
        if decode not in DECODE_MODES:
            raise UserError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}.")
        self.root = Path(root)
        self.preprocess = preprocess
        self.decode = decode
        if not self.root.exists():
            raise UserError(f"Training folder {str(self.root)!r} does not exist.", hint="Check --train-dir / DATASET_PATH.")
        if not self.root.is_dir():
            raise UserError(f"Training folder {str(self.root)!r} is not a directory.")
        index = load_index(self.root, index_cache, coordinate=coordinate)
        folders = index.folders.tolist()
        self.classes: list[str] = self._wanted(folders, classes, identities)
        position = {name: i for i, name in enumerate(folders)}
        wanted = np.array([position[c] for c in self.classes], dtype=np.int64)
        rows, self.labels = _rows_of_folders(index.folder_ranges(), wanted)
        self._check_usable(np.bincount(self.labels, minlength=len(self.classes)))
        identity = len(rows) == len(index.files) and np.array_equal(wanted, np.arange(len(folders)))
        self.files = index.files if identity else index.files.take(rows)
        self.paths = PathList(str(self.root), self.files)
        self.empty_files = self._empty_paths(index, wanted)

    def _wanted(self, folders: list[str], classes, identities) -> list[str]:
        """The identities to train on, in label order, after checking they have folders."""
        if not folders:
            raise UserError(
                f"Training folder {str(self.root)!r} has no identity folders.",
                hint="Expected one sub-folder of images per identity (root/<identity>/<image>.jpg).",
            )
        present = set(folders)
        if classes is not None:
            wanted = list(classes)
            missing = [c for c in wanted if c not in present]
            if missing:
                raise UserError(
                    f"{len(missing)} identities of the checkpoint's label map are missing from {str(self.root)!r} "
                    f"(first: {missing[:3]}).",
                    hint="Point --train-dir at the data the run was started with.",
                )
            return wanted
        if identities is not None:
            wanted = list(dict.fromkeys(identities))
            missing = [c for c in wanted if c not in present]
            if missing:
                raise UserError(
                    f"{len(missing)} of the {len(wanted)} listed identities have no folder in {str(self.root)!r} "
                    f"(first: {missing[:3]}).",
                    hint="Check the identity list against the training folder.",
                )
            return wanted
        return folders

    def _check_usable(self, counts: np.ndarray) -> None:
        """Every identity needs an image, and a classifier needs two identities."""
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise UserError(
                f"Identity folder {str(self.root / self.classes[int(empty[0])])!r} holds no usable images.",
                hint="Remove the folder or add its images (supported: .jpg .jpeg .png .bmp .pgm .ppm .webp .tif).",
            )
        if len(self.classes) < 2:
            raise UserError(
                f"Training folder {str(self.root)!r} has {len(self.classes)} identity; at least 2 are needed to learn to tell faces apart.",
                hint="Add more identity folders (root/<identity>/<image>.jpg) or point --train-dir at the full set.",
            )

    def _empty_paths(self, index: FolderIndex, wanted: np.ndarray) -> list[str]:
        """Full paths of the empty image files of the wanted identities, in label order."""
        rank = np.full(len(index.folders), -1, dtype=np.int64)
        rank[wanted] = np.arange(len(wanted))
        new_label = rank[index.empty_labels]
        rows = np.flatnonzero(new_label >= 0)
        rows = rows[np.argsort(new_label[rows], kind="stable")]
        return [str(self.root) + os.sep + index.empty[int(r)] for r in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        path = self.paths[index]
        label = int(self.labels[index])
        try:
            if self.decode == "gpu":
                return Encoded(read_image_bytes(path, path), path), label, None
            image = decode_image(path, self.preprocess.image_size, self.preprocess.crop_fraction)
        except ImageError as e:
            return None, label, str(e)
        return image, label, None

    def describe(self) -> str:
        return f"{len(self):,} images of {len(self.classes):,} identities in {self.root}"


def _rows_of_folders(ranges: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index rows of the wanted folders' files, folder after folder, and their new labels (int32)."""
    starts, counts = ranges[wanted], ranges[wanted + 1] - ranges[wanted]
    before = np.zeros(len(wanted), dtype=np.int64)
    np.cumsum(counts[:-1], out=before[1:])
    rows = np.repeat(starts - before, counts) + np.arange(int(counts.sum()), dtype=np.int64)
    return rows, np.repeat(np.arange(len(wanted), dtype=np.int32), counts)


class ImageFiles(Dataset):
    """A flat list of image files (evaluation, ``embed``); samples are ``(image, index, bad)``."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocess, flip: bool = False):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = decode_image(self.paths[index], self.preprocess.image_size, self.preprocess.crop_fraction)
        except ImageError as e:
            return None, index, str(e)
        return image, index, None


def collate_samples(batch):
    """Stack the decodable samples; keep the reasons of the others for the report."""
    images = [b[0] for b in batch if b[0] is not None]
    labels = [b[1] for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    if images and isinstance(images[0], Encoded):
        stacked = EncodedBatch.collate(images)  # decoded on the training device (decode_batch)
    elif images:
        stacked = torch.stack(images)
    else:
        size = 0
        stacked = torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked, torch.as_tensor(labels, dtype=torch.int64), bad
