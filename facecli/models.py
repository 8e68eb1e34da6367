"""One interface over a trained face model: a facecli checkpoint (torch) or its ONNX export.

``open_model(path)`` returns a :class:`ModelRunner` whatever the file is: ``.net`` maps a
normalised float batch (B, 3, S, S) to embeddings, ``.preprocess`` says how pixels become
that batch, ``.threshold`` is the tuned verification threshold, and ``.identity`` names
the weights (a fingerprint of the embedding network's tensors) so that a gallery built
with one model is refused by another. A checkpoint and its ONNX export share the identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from facecli.data.images import Preprocess
from facecli.errors import UserError

ONNX_FORMAT = "facecli-onnx"
ONNX_FORMAT_VERSION = 1
EXPORT_HINT = "Install the export extra: pip install 'facecli[export]' (onnx, onnxruntime, onnxscript)."


def weights_fingerprint(state: dict) -> str:
    """A short hash of a state dict (names, dtypes, shapes, bytes): equal weights, equal print."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ModelRunner:
    """What embedding needs from a model, the same for a checkpoint and an ONNX session."""

    net: torch.nn.Module
    preprocess: Preprocess
    threshold: float | None
    identity: dict
    path: Path
    kind: str  # "torch" or "onnx"
    threshold_far: float | None = None  # the FAR ``threshold`` was chosen for; None: a verification threshold


    @property
    def embedding_dim(self) -> int:
        return int(self.identity["embedding_dim"])

    def device_for(self, device) -> torch.device:
        """ONNX runs on onnxruntime's CPU provider whatever device was asked for."""
        return torch.device("cpu") if self.kind == "onnx" else torch.device(device)

    def embed(self, dataset, device="cpu", flip: bool = True, batch_size: int | None = None, workers: int = 0,
              progress: Callable[[int], None] | None = None):
        """Embed a dataset of ``(uint8 image, index, problem)`` items: unit rows, NaN where unreadable.

        A non-finite embedding of a readable image means broken weights (a NaN tensor): it
        is refused here, once for every command, instead of becoming a NaN score later.
        """
        from facecli.evaluation.embedding import embed_dataset

        emb = embed_dataset(self.net, self.preprocess, dataset, self.device_for(device), flip, batch_size, workers, progress)
        broken = emb.ok & ~np.isfinite(emb.vectors).all(axis=1)
        if broken.any():
            raise UserError(f"{self.path} gave non-finite embeddings (NaN or inf) for {int(broken.sum())} of {int(emb.ok.sum())} image(s): "
                            "its weights are broken; nothing was written.", hint="Use another checkpoint (an earlier epoch, or min_loss.pt).")
        return emb


def identity_of_checkpoint(ckpt: dict) -> dict:
    """The facts a gallery and an ONNX export record about a checkpoint's network."""
    return {
        "model": ckpt["model"],
        "backbone": ckpt["net"]["backbone"],
        "embedding_dim": int(ckpt["net"]["embedding_dim"]),
        "fingerprint": weights_fingerprint(ckpt["net_state"]),
        "preprocess": dict(ckpt["preprocess"]),
    }


def open_model(path: str | Path, device="cpu") -> ModelRunner:
    """A checkpoint (``.pt``, anything not ``.onnx``) or a facecli ONNX export (``.onnx``)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _open_onnx(path)
    from facecli.engine.checkpoint import load_model

    model = load_model(path, device=device)
    far = model.checkpoint.get("threshold_far")
    return ModelRunner(model.net, model.preprocess, model.threshold, identity_of_checkpoint(model.checkpoint), path, "torch",
                       None if far is None else float(far))


class OnnxNet(torch.nn.Module):
    """An onnxruntime session behaving like the embedding network: tensor in, tensor out."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out)


def onnx_session(path: Path):
    """An onnxruntime CPU session, or one line saying why the file cannot be one."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"Running {path} needs onnxruntime, which is not installed.", hint=EXPORT_HINT) from None
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file.", hint="Export one with `facecli export CKPT model.onnx`.")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a foreign file is reported by us, once
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a loadable ONNX model ({first[:160]}).", hint="Give a file written by `facecli export`.") from e


def read_onnx_metadata(session, path: Path) -> dict:
    """facecli's metadata of an export; a foreign ONNX model is refused."""
    raw = session.get_modelmeta().custom_metadata_map.get("facecli")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise UserError(f"{path} is an ONNX model but not a facecli export (no facecli metadata).", hint="Export with `facecli export CKPT model.onnx`.")
    if meta.get("format_version") != ONNX_FORMAT_VERSION:
        raise UserError(f"{path} has facecli ONNX format version {meta.get('format_version')!r}; this facecli reads {ONNX_FORMAT_VERSION}.")
    return meta


def _open_onnx(path: Path) -> ModelRunner:
    session = onnx_session(path)
    meta = read_onnx_metadata(session, path)
    return ModelRunner(OnnxNet(session), Preprocess.from_dict(meta["identity"]["preprocess"]), meta.get("threshold"), meta["identity"], path, "onnx")
