"""The one model loader: a facecli checkpoint (torch) or its ONNX export, for every command and for library users.

``load_model(path)`` (also ``facecli.load_model``) returns a :class:`ModelRunner` whatever
the file is: ``.embed(images_or_paths)`` gives unit embeddings with the model's own
preprocessing and flip; ``.net`` maps a normalised float batch (B, 3, S, S) to
embeddings, ``.preprocess`` says how pixels become that batch, ``.threshold`` is the
stored threshold (``.threshold_far`` the FAR it was calibrated for, None for a View 1
verification threshold), and ``.identity`` names the weights (a fingerprint of the
embedding network's tensors) so that a gallery built with one model is refused by
another. A checkpoint and its ONNX export share the identity.
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
    checkpoint: dict | None = None  # the whole checkpoint (torch only)
    source: str | None = None  # the checkpoint an ONNX export was made from

    @property
    def embedding_dim(self) -> int:
        return int(self.identity["embedding_dim"])

    @property
    def model(self) -> str:
        """The loss it was trained with (arcface, cosface, ...)."""
        return str(self.identity["model"])

    def embed(self, images_or_paths, device=None, flip: bool = True, batch_size: int | None = None) -> np.ndarray:
        """(N, D) float32 unit embeddings of image files, PIL images or (H, W, 3) uint8 arrays.

        Each image goes through the model's own preprocessing (centre crop, resize,
        normalisation) and, with ``flip``, is averaged with its mirror image, exactly as
        in evaluation; an unreadable image raises :class:`facecli.errors.ImageError`.
        """
        from facecli.errors import ImageError

        items = list(images_or_paths)
        if not items:
            return np.zeros((0, self.embedding_dim), np.float32)
        dev = device if device is not None else next((p.device for p in self.net.parameters()), "cpu")
        emb = self.embed_dataset(_Images(items, self.preprocess), dev, flip, batch_size)
        if emb.bad:
            raise ImageError(emb.bad[0])
        return emb.vectors.astype(np.float32)

    def device_for(self, device) -> torch.device:
        """ONNX runs on onnxruntime's CPU provider whatever device was asked for."""
        return torch.device("cpu") if self.kind == "onnx" else torch.device(device)

    def embed_dataset(self, dataset, device="cpu", flip: bool = True, batch_size: int | None = None, workers: int = 0,
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


class _Images(torch.utils.data.Dataset):
    """Paths, PIL images or uint8 arrays as ``(image, index, problem)`` samples in the model's input format."""

    def __init__(self, items: list, preprocess: Preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import io

        from PIL import Image

        from facecli.data.images import decode_image
        from facecli.errors import ImageError

        item = self.items[i]
        if isinstance(item, np.ndarray):
            item = Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8))
        if isinstance(item, Image.Image):
            buf = io.BytesIO()
            item.save(buf, format="PNG")
            item = buf.getvalue()
        try:
            where = f"image {i}" if isinstance(item, bytes) else str(item)
            return decode_image(item, self.preprocess.image_size, self.preprocess.crop_fraction, where=where), i, None
        except ImageError as e:
            return None, i, str(e)


def load_model(path: str | Path, device="cpu") -> ModelRunner:
    """A checkpoint (``.pt``, anything not ``.onnx``) or a facecli ONNX export (``.onnx``), ready to embed."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return _open_onnx(path)
    from facecli.engine.checkpoint import load_torch_model

    model = load_torch_model(path, device=device)
    far = model.checkpoint.get("threshold_far")
    return ModelRunner(model.net, model.preprocess, model.threshold, identity_of_checkpoint(model.checkpoint), path, "torch",
                       None if far is None else float(far), model.checkpoint)


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


def onnx_weights_fingerprint(path: Path) -> str:
    """A hash of an ONNX file's weights (its initializers, by name): what its metadata is bound to.

    The export stores it beside the checkpoint's fingerprint; a file whose weights do not
    hash to it carries metadata copied from another model, and is refused.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError(f"Checking {path} needs the onnx package, which is not installed.", hint=EXPORT_HINT) from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}).") from e
    return initializers_fingerprint(proto, numpy_helper)


def initializers_fingerprint(proto, numpy_helper) -> str:
    digest = hashlib.sha256()
    for init in sorted(proto.graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(init)
        digest.update(f"{init.name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _metadata_problem(meta: dict) -> str | None:
    """What makes an export's metadata unusable, or None (checked before any of it is used)."""
    ident = meta.get("identity")
    if not isinstance(ident, dict):
        return "no identity"
    for key, kind in (("model", str), ("backbone", str), ("fingerprint", str), ("embedding_dim", int), ("preprocess", dict)):
        if not isinstance(ident.get(key), kind) or isinstance(ident.get(key), bool):
            return f"identity.{key} is missing or not a {kind.__name__}"
    if not 0 < ident["embedding_dim"] <= 1 << 16:
        return f"identity.embedding_dim {ident['embedding_dim']} is out of range"
    pre = ident["preprocess"]
    size = pre.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        return f"image_size {str(size)[:20]!r} is not a size from 8 to 4096"
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)):
            return f"{key} is not three numbers"
    if any(v == 0 for v in pre["std"]):
        return "std has a zero"
    crop = pre.get("crop_fraction")
    if crop is not None and not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        return "crop_fraction is not in (0, 1]"
    for key, low, high in (("threshold", -1.0, 1.0), ("threshold_far", 0.0, 1.0)):
        value = meta.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
            return f"{key} {str(value)[:20]!r} is not a number from {low:g} to {high:g}"
    return None


def _open_onnx(path: Path) -> ModelRunner:
    session = onnx_session(path)
    meta = read_onnx_metadata(session, path)
    problem = _metadata_problem(meta)
    if problem:
        raise UserError(f"{path}: damaged facecli metadata ({problem}).", hint="Export the model again with `facecli export`.")
    if meta.get("weights") != onnx_weights_fingerprint(path):
        raise UserError(f"{path}: its facecli metadata does not belong to its weights (fingerprint mismatch).",
                        hint="Export the model again with `facecli export`; metadata cannot be copied between models.")
    try:
        preprocess = Preprocess.from_dict(meta["identity"]["preprocess"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: damaged facecli metadata (preprocess: {type(e).__name__}).", hint="Export the model again.") from e
    far = meta.get("threshold_far")
    return ModelRunner(OnnxNet(session), preprocess, meta.get("threshold"), meta["identity"], path, "onnx",
                       None if far is None else float(far), None, str(meta.get("source")))
