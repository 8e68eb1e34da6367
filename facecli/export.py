"""``facecli export``: a checkpoint's embedding network as ONNX, checked against PyTorch.

The ONNX graph is the network alone (batch axis dynamic): input ``input``, float32 NCHW
RGB normalised as ``(pixel / 255 - mean) / std``; output ``embedding``, not normalised.
Everything else a runtime needs (input size, channel order, normalisation, crop fraction,
the flip convention, the tuned threshold, the weights' fingerprint) is in the model's
metadata: one ``facecli`` JSON entry that :func:`facecli.models.load_model` reads, and
plain-text entries for people reading it with other tools.

Right after writing, onnxruntime embeds face crops and the L2-normalised embeddings are
compared with PyTorch's; more than ``tolerance`` (1e-4) apart is an error.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facecli.data.images import Preprocess, decode_image, normalize_batch
from facecli.errors import UserError
from facecli.models import EXPORT_HINT, ONNX_FORMAT, ONNX_FORMAT_VERSION, ModelRunner, OnnxNet, initializers_fingerprint, onnx_session

TOLERANCE = 1e-4
FLIP_CONVENTION = "embedding = L2-normalise(f(x) + f(x mirrored left-right)) when flip is on (facecli's default); f(x) alone otherwise"


class ExportMismatch(UserError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""

    exit_code = 3


@dataclass
class ExportReport:
    path: Path
    max_difference: float
    images: int
    image_source: str
    opset: int


def onnx_metadata(runner: ModelRunner, source: str, weights: str) -> dict[str, str]:
    """The metadata entries of an export: one JSON for facecli, plain text for everyone."""
    pre = runner.preprocess
    meta = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "identity": runner.identity,
        "threshold": runner.threshold,
        "threshold_far": runner.threshold_far,
        "weights": weights,  # the ONNX initializers' hash: binds this metadata to these weights
        "source": source,
        "flip": FLIP_CONVENTION,
        **operating_point_of(runner),  # threshold_source, threshold_far, threshold_far_ci when the checkpoint has them
    }
    return {
        "facecli": json.dumps(meta, sort_keys=True),
        "input_size": f"{pre.image_size}x{pre.image_size}",
        "channel_order": "RGB",
        "layout": "NCHW float32",
        "normalisation": f"(pixel / 255 - mean) / std, mean={list(pre.mean)}, std={list(pre.std)}",
        "crop_fraction": "auto: 0.6 of the centre for 250x250 images, else 1" if pre.crop_fraction is None else f"{pre.crop_fraction:g} of the shorter side, centred, before resizing",
        "flip": FLIP_CONVENTION,
        "output": f"{runner.embedding_dim}-d embedding, not normalised",
        "threshold": "none" if runner.threshold is None else f"{runner.threshold:.6f} (cosine similarity, same person at or above)",
    }


def operating_point_of(runner: ModelRunner) -> dict:
    from facecli.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(runner.path) if runner.kind == "torch" else {}
    return {k: ckpt[k] for k in ("threshold_source", "threshold_far", "threshold_far_ci") if k in ckpt}


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript, which are not installed.", hint=EXPORT_HINT) from None
    return onnx


def to_onnx_proto(net: torch.nn.Module, image_size: int):
    """The network as an ONNX ModelProto with a dynamic batch axis (torch's dynamo exporter)."""
    net = net.to("cpu").eval()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (example,), input_names=["input"], output_names=["embedding"],
            dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
        )
    return program.model_proto


def write_onnx(proto, metadata: dict[str, str], out: Path) -> None:
    """Attach metadata and write the file atomically."""
    from facecli.engine.checkpoint import atomic_write

    onnx = _onnx()
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))


def synthetic_faces(count: int, image_size: int) -> torch.Tensor:
    """uint8 (count, 3, S, S) faces of the embedded synthetic set: parity input with no data at hand."""
    from facecli.data.synth import _static_shapes, face_image_bytes, identity_params

    images = []
    for person in range(count):
        ident = identity_params(0, 0, person)
        data = face_image_bytes(ident, _static_shapes(ident), 0, 0, person, 0, image_size)
        images.append(decode_image(data, image_size, 1.0, where=f"synthetic face {person}"))
    return torch.stack(images)


def unit_embeddings(net: torch.nn.Module, images: torch.Tensor, preprocess: Preprocess) -> np.ndarray:
    """L2-normalised embeddings of uint8 images and of their mirror images, float64."""
    x = normalize_batch(images, preprocess)
    x = torch.cat([x, x.flip(3)])
    with torch.inference_mode():
        return F.normalize(net(x).float(), dim=1).double().numpy()


def parity(runner: ModelRunner, onnx_path: Path, images: torch.Tensor) -> float:
    """Largest |difference| between PyTorch's and onnxruntime's unit embeddings of ``images``."""
    reference = unit_embeddings(runner.net.to("cpu").eval(), images, runner.preprocess)
    exported = unit_embeddings(OnnxNet(onnx_session(onnx_path)), images, runner.preprocess)
    return float(np.abs(reference - exported).max())


def _number(value) -> float | None:
    """A stored threshold as a float, or None when it is missing or not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def export_model(runner: ModelRunner, out: Path, images: torch.Tensor | None = None, image_source: str = "",
                 tolerance: float = TOLERANCE, overwrite: bool = False) -> ExportReport:
    """Export ``runner`` (a torch checkpoint) to ``out`` and check it; ``images`` uint8 (N, 3, S, S).

    The file is written under a temporary name, checked with onnxruntime, and only then
    renamed to ``out``: a failed check (or NaN weights) leaves an existing ``out`` as it was.
    """
    if runner.kind != "torch":
        raise UserError(f"{runner.path} is already an ONNX export.", hint="Export from the .pt checkpoint.")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"Output {out} should end in .onnx.", hint="e.g. facecli export run/latest.pt model.onnx")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists.", hint="Pass --overwrite to replace it, or choose another name.")
    _onnx()  # before torch's exporter, which would fail on a missing onnxscript with a traceback
    if runner.threshold is not None and _number(runner.threshold) is None:
        raise UserError(f"{runner.path}: its stored threshold {str(runner.threshold)[:40]!r} is not a number.",
                        hint=f"Store a new one with `facecli tune-threshold {runner.path} --save`.")
    proto = to_onnx_proto(runner.net, runner.preprocess.image_size)
    trial = out.with_name(f".{out.name}.{os.getpid()}.check.onnx")
    from onnx import numpy_helper

    write_onnx(proto, onnx_metadata(runner, str(runner.path), initializers_fingerprint(proto, numpy_helper)), trial)
    try:
        runner.net.eval()
        if images is None:
            images, image_source = synthetic_faces(8, runner.preprocess.image_size), "8 synthetic faces"
        diff = parity(runner, trial, images)
        if not diff <= tolerance:
            raise ExportMismatch(f"{out}: onnxruntime's embeddings differ from PyTorch's by {diff:.2e} (> {tolerance:g}); nothing was written.",
                                 hint="Check the checkpoint's weights (NaN?); otherwise report the facecli, torch and onnxruntime versions.")
        os.replace(trial, out)
    finally:
        trial.unlink(missing_ok=True)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(out, diff, int(images.shape[0]), image_source, int(opset))
