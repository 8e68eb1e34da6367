"""The checkpoint format, atomic checkpoint I/O and the model loader.

A facecli checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it: a checkpoint can never run code when it
is opened, and facecli opens nothing any other way. It is *self-describing*: the model
name, backbone, embedding size, preprocessing, label map, hyper-parameters, progress
counters, verification threshold and library versions are inside, so every later command
needs the file and nothing else.

Writes are atomic (:func:`facecli.io.atomic_write`): a process killed at any instant leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import pickle
import platform
import struct
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from facecli._version import __version__
from facecli.errors import CheckpointError
from facecli.io import WriteError, atomic_write  # noqa: F401 (atomic_write: gallery.py and export.py import it from here)

FORMAT = "facecli-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class CheckpointSaveError(WriteError):
    """Saving failed (disk full, permission denied): the run must stop, old files are intact."""


CHECKPOINT_KEPT = "The previous checkpoint is kept; free space or fix permissions, then resume."


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    return {
        "facecli": str(__version__),
        "torch": str(torch.__version__),  # a TorchVersion object would not load with weights_only
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


def new_checkpoint(**fields: Any) -> dict:
    """The envelope every checkpoint shares; callers add states and metadata."""
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    ckpt.update(fields)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    """Write ``ckpt`` atomically (:func:`facecli.io.atomic_write`): the old file stays until the new one is whole."""
    atomic_write(path, lambda f: torch.save(ckpt, f), kept=CHECKPOINT_KEPT, error=CheckpointSaveError)


def load_checkpoint(path: str | os.PathLike, expect_model: str | None = None) -> dict:
    """Load a facecli checkpoint safely, or raise :class:`CheckpointError` saying why not."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"Checkpoint {str(p)!r} does not exist.", hint="Check the path; a run keeps latest.pt, min_loss.pt and epoch_NNN.pt.")
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {str(p)!r} is not a file.", hint="Name a .pt file, e.g. <run dir>/latest.pt.")
    if p.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {str(p)!r} is empty (0 bytes).", hint="It was never written completely; use another checkpoint.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Every weights-only failure mentions "weights_only"; only a refused global/class means
        # the file holds Python objects. Anything else (e.g. "Unsupported operand 255" for a
        # JPEG or text file renamed .pt) is a damaged or foreign file.
        if "GLOBAL" in str(e) or "add_safe_globals" in str(e):
            raise CheckpointError(
                f"Refused to load {str(p)!r}: it contains Python objects other than tensors and plain data, "
                "which could run code when unpickled.",
                hint="facecli only loads weights; re-save it with facecli or from a trusted source.",
            ) from e
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(
            f"{str(p)!r} is damaged or not a PyTorch checkpoint (its contents are not PyTorch's saved data).",
            hint="Use another checkpoint of the run (min_loss.pt or an epoch_NNN.pt).",
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError, IndexError, struct.error) as e:
        first = f"no entry {e}" if isinstance(e, KeyError) else (str(e).splitlines()[0] if str(e) else "unreadable")
        raise CheckpointError(
            f"{str(p)!r} is damaged or not a PyTorch checkpoint ({first[:160]}).",
            hint="Use another checkpoint of the run (min_loss.pt or an epoch_NNN.pt).",
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(p)!r} is not a facecli checkpoint (it looks like a plain state_dict or another program's file).",
            hint="Use a .pt written by `facecli train`.",
        )
    version = ckpt.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{str(p)!r} has checkpoint format version {version!r}; this facecli {__version__} reads {list(SUPPORTED_VERSIONS)}.",
            hint="Use the facecli version that wrote it, or retrain.",
        )
    for key in ("model", "net", "net_state", "preprocess", "classes"):
        if key not in ckpt:
            raise CheckpointError(f"{str(p)!r} is an incomplete facecli checkpoint (no {key!r}).")
    if expect_model is not None and ckpt["model"] != expect_model:
        raise CheckpointError(
            f"{str(p)!r} is a {ckpt['model']} run, not {expect_model}.",
            hint=f"Use `facecli resume {ckpt['model']} ...` or pick a {expect_model} run.",
        )
    return ckpt


@dataclass
class FaceModel:
    """A trained embedding network with what it needs to be used: preprocessing and threshold."""

    net: torch.nn.Module
    preprocess: "Any"
    threshold: float | None
    model: str
    checkpoint: dict
    path: Path

    @property
    def embedding_dim(self) -> int:
        return int(self.checkpoint["net"]["embedding_dim"])


def build_net_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    from facecli.backbones import EmbeddingNet

    cfg = ckpt["net"]
    # Checkpoints written before the face backbones have no "image_size" (their ResNets do not depend on it).
    image_size = cfg.get("image_size", ckpt["preprocess"].get("image_size", 112))
    net = EmbeddingNet(backbone=cfg["backbone"], embedding_dim=cfg["embedding_dim"], normalize=cfg["normalize"], image_size=int(image_size))
    net.load_state_dict(ckpt["net_state"])
    return net


def load_torch_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> FaceModel:
    """Rebuild the embedding network of a checkpoint, in eval mode, on ``device``.

    The torch half of :func:`facecli.models.load_model`, the public loader (``.pt`` and ``.onnx``).
    """
    from facecli.data.images import Preprocess

    ckpt = load_checkpoint(path)
    try:
        net = build_net_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r}: the stored weights do not fit the stored network ({str(e).splitlines()[0][:160]}).") from e
    net.to(device).eval()
    return FaceModel(
        net=net,
        preprocess=Preprocess.from_dict(ckpt["preprocess"]),
        threshold=ckpt.get("threshold"),
        model=ckpt["model"],
        checkpoint=ckpt,
        path=Path(path),
    )


def set_threshold(path: str | os.PathLike, threshold: float, source: str, far: float | None = None,
                  far_ci: tuple[float, float] | None = None) -> None:
    """Store a threshold in an existing checkpoint (atomically); with ``far`` it is an operating point at that FAR.

    Without ``far`` any earlier ``threshold_far``/``threshold_far_ci`` is removed: they
    described the old threshold, not an accuracy-optimal one.
    """
    ckpt = load_checkpoint(path)
    ckpt["threshold"] = float(threshold)
    ckpt["threshold_source"] = source
    ckpt.pop("threshold_far", None), ckpt.pop("threshold_far_ci", None)
    if far is not None:
        ckpt["threshold_far"] = float(far)
        if far_ci is not None:
            ckpt["threshold_far_ci"] = [float(far_ci[0]), float(far_ci[1])]
    save_checkpoint(ckpt, path)
