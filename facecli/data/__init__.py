"""Data: identity folders, packed RecordIO, LFW pairs, ``.bin`` sets, the synthetic set, samplers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from facecli.data.images import Preprocess
from facecli.errors import UserError

TRAIN_SUBDIRS = ("CASIA-webface", "CASIA-WebFace", "faces_webface_112x112")
LFW_SUBDIRS = ("Labeled Faces in the Wild (LFW)", "lfw")


def resolve_train_dir(train_dir: str | os.PathLike | None, dataset_path: str | os.PathLike | None) -> Path:
    """``--train-dir``, else the training set found under ``DATASET_PATH``."""
    if train_dir is not None:
        p = Path(train_dir).expanduser()
        if not p.is_dir():
            raise UserError(
                f"Training folder {str(p)!r} (--train-dir) does not exist or is not a directory.",
                hint="Pass the folder that holds one sub-folder of images per identity.",
            )
        return p
    if dataset_path is None:
        raise UserError("No training data given: set DATASET_PATH in the environment or .env, or pass --dataset-path or --train-dir.")
    root = Path(dataset_path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"Dataset path {str(root)!r} (DATASET_PATH / --dataset-path) does not exist or is not a directory.",
            hint="Point it at the folder holding CASIA-webface/ (or train.rec), or pass --train-dir.",
        )
    from facecli.data.recordio import is_recordio_dir

    if is_recordio_dir(root):
        return root
    for name in TRAIN_SUBDIRS:
        if (root / name).is_dir():
            return root / name
    raise UserError(
        f"No training set under {str(root)!r} (DATASET_PATH): expected one of {', '.join(TRAIN_SUBDIRS)} or train.rec/train.idx.",
        hint="Pass --train-dir to name the folder of identity folders.",
    )


def resolve_lfw_dir(lfw_dir: str | os.PathLike | None, dataset_path: str | os.PathLike | None) -> Path | None:
    """``--lfw-dir``, else LFW found under ``DATASET_PATH``, else None."""
    if lfw_dir is not None:
        p = Path(lfw_dir).expanduser()
        if not p.is_dir():
            raise UserError(f"LFW folder {str(p)!r} (--lfw-dir) does not exist or is not a directory.")
        return p
    if dataset_path is None:
        return None
    root = Path(dataset_path).expanduser()
    for name in LFW_SUBDIRS:
        if (root / name).is_dir():
            return root / name
    return None


def lfw_for_evaluation(given: str | os.PathLike | None, saved: str | None, dataset_path: str | os.PathLike | None) -> Path:
    """``--lfw-dir``, else the run's own LFW folder (its checkpoint's ``lfw_dir``) while it exists,
    else LFW under ``DATASET_PATH``; else one error saying what is wrong with each."""
    if given is not None:
        return resolve_lfw_dir(given, None)
    if saved and Path(saved).expanduser().is_dir():
        return Path(saved).expanduser()
    found = resolve_lfw_dir(None, dataset_path)
    if found is not None:
        return found
    why = f" (the checkpoint's lfw_dir {str(saved)!r} no longer exists)" if saved else ""
    expected = " or ".join(repr(n) for n in LFW_SUBDIRS)
    if dataset_path is None:
        raise UserError(f"No LFW folder{why}: pass --lfw-dir, or set DATASET_PATH to a folder holding {expected}.")
    root = Path(dataset_path).expanduser()
    if not root.is_dir():
        raise UserError(f"No LFW folder{why}: DATASET_PATH {str(root)!r} does not exist or is not a directory; fix it or pass --lfw-dir.")
    raise UserError(f"No LFW folder{why}: DATASET_PATH {str(root)!r} exists but holds no {expected} folder; pass --lfw-dir or fix DATASET_PATH.")


def build_train_dataset(
    train_dir: Path,
    preprocess: Preprocess,
    classes: Sequence[str] | None = None,
    identities: Sequence[str] | None = None,
    decode: str = "cpu",
    index_cache: str | os.PathLike | None | bool = None,
):
    """Identity folders or a packed ``train.rec``, whichever ``train_dir`` holds.

    ``decode="gpu"``: samples carry encoded JPEGs, decoded on the training device
    (:mod:`facecli.data.device_decode`). ``index_cache``: where the folder index is cached
    (None: the default, False: nowhere). In a distributed run each machine's local rank 0
    indexes the folders first and the others read its cache.
    """
    from facecli.data.recordio import RecordIODataset, is_recordio_dir

    if is_recordio_dir(train_dir):
        wanted = list(classes) if classes is not None else (list(identities) if identities is not None else None)
        return RecordIODataset(
            train_dir, image_size=preprocess.image_size, crop_fraction=preprocess.crop_fraction, identities=wanted, decode=decode
        )
    from facecli.data.folders import IdentityFolderDataset

    return IdentityFolderDataset(
        train_dir, preprocess, classes=classes, identities=identities, decode=decode, index_cache=index_cache, coordinate=True
    )
