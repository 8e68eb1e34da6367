"""Identity-folder datasets (the CASIA-WebFace layout: ``root/<identity>/<image>``).

The folder tree is indexed once, when the dataset is built: identities are the sorted
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

from facecli.data.images import Preprocess, decode_image, is_image_file
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


class IdentityFolderDataset(Dataset):
    """``root/<identity>/<image>`` as a labelled face dataset."""

    def __init__(
        self,
        root: str | os.PathLike,
        preprocess: Preprocess,
        classes: Sequence[str] | None = None,
        identities: Iterable[str] | None = None,
    ):
        """``classes`` fixes the label map (resume, fine-tuning); ``identities`` restricts the
        identities used (e.g. LFW's ``peopleDevTrain.txt``) and orders labels by that list."""
        self.root = Path(root)
        self.preprocess = preprocess
        if not self.root.exists():
            raise UserError(f"Training folder {str(self.root)!r} does not exist.", hint="Check --train-dir / DATASET_PATH.")
        if not self.root.is_dir():
            raise UserError(f"Training folder {str(self.root)!r} is not a directory.")
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise UserError(
                f"Training folder {str(self.root)!r} has no identity folders.",
                hint="Expected one sub-folder of images per identity (root/<identity>/<image>.jpg).",
            )
        if classes is not None:
            wanted = list(classes)
            missing = [c for c in wanted if c not in set(folders)]
            if missing:
                raise UserError(
                    f"{len(missing)} identities of the checkpoint's label map are missing from {str(self.root)!r} "
                    f"(first: {missing[:3]}).",
                    hint="Point --train-dir at the data the run was started with.",
                )
        elif identities is not None:
            wanted = list(dict.fromkeys(identities))
            present = set(folders)
            missing = [c for c in wanted if c not in present]
            if missing:
                raise UserError(
                    f"{len(missing)} of the {len(wanted)} listed identities have no folder in {str(self.root)!r} "
                    f"(first: {missing[:3]}).",
                    hint="Check the identity list against the training folder.",
                )
        else:
            wanted = folders
        self.classes: list[str] = wanted

        paths: list[str] = []
        labels: list[int] = []
        self.empty_files: list[str] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            files = sorted((e for e in os.scandir(folder) if e.is_file() and is_image_file(Path(e.name))), key=lambda e: e.name)
            good = 0
            for entry in files:
                if entry.stat().st_size == 0:
                    self.empty_files.append(entry.path)
                    continue
                paths.append(entry.path)
                labels.append(label)
                good += 1
            if good == 0:
                raise UserError(
                    f"Identity folder {str(folder)!r} holds no usable images.",
                    hint="Remove the folder or add its images (supported: .jpg .jpeg .png .bmp .pgm .ppm .webp .tif).",
                )
        if len(self.classes) < 2:
            raise UserError(
                f"Training folder {str(self.root)!r} has {len(self.classes)} identity; at least 2 are needed to learn to tell faces apart.",
                hint="Add more identity folders (root/<identity>/<image>.jpg) or point --train-dir at the full set.",
            )
        self.paths = np.array(paths, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        path = self.paths[index]
        label = int(self.labels[index])
        try:
            image = decode_image(path, self.preprocess.image_size, self.preprocess.crop_fraction)
        except ImageError as e:
            return None, label, str(e)
        return image, label, None

    def describe(self) -> str:
        return f"{len(self):,} images of {len(self.classes):,} identities in {self.root}"


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
    if images:
        stacked = torch.stack(images)
    else:
        size = 0
        stacked = torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked, torch.as_tensor(labels, dtype=torch.int64), bad
