"""Embedding images with a trained network: each distinct image exactly once.

Pairs files name the same image many times (View 2's 6,000 pairs touch 7,701 distinct
images). The evaluator embeds the distinct images once, with flip test-time augmentation
``normalise(f(x) + f(flip x))`` by default, and scores every pair from that table: the
number of network forward passes is the number of distinct images (x2 with flip), not a
multiple of the pair count, let alone of a threshold grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from facecli.data.folders import ImageFiles, collate_samples
from facecli.data.images import Preprocess, normalize_batch


@dataclass
class Embeddings:
    vectors: np.ndarray  # (N, D) float32, L2-normalised; rows of unreadable images are NaN
    forward_passes: int
    bad: list[str] = field(default_factory=list)
    ok: np.ndarray | None = None  # (N,) bool: the image was decoded
    # (N,) float32: each image's feature norm before L2 normalisation (the mean of f(x) and
    # f(flip x) with flip), MagFace's / AdaFace's quality score; NaN where unreadable.
    quality: np.ndarray | None = None


def _autocast_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The training rule: bf16 where the GPU has it natively, else fp16; fp32 on the CPU or with amp off."""
    from facecli.hardware import amp_dtype

    return amp_dtype(device, amp)


@dataclass
class Embedder:
    """A network ready to embed images: the one object every evaluation takes.

    Network, preprocessing, device, flip test-time augmentation, batch size (None: as large
    as the device takes), DataLoader workers and mixed precision travel together here
    instead of as positional arguments through every protocol function.
    """

    net: torch.nn.Module
    preprocess: Preprocess
    device: torch.device | str = "cpu"
    flip: bool = True
    batch_size: int | None = None
    workers: int = 0
    amp: bool = True
    normalize: bool = True  # False: raw f(x) (+ f(flip x)), as IJB's "N1" mode needs

    def dataset(self, dataset: Dataset, progress: Callable[[int], None] | None = None) -> "Embeddings":
        """Embed a dataset yielding ``(image, index, bad)``."""
        return embed_dataset(self.net, self.preprocess, dataset, self.device, self.flip, self.batch_size, self.workers, progress,
                             amp=self.amp, normalize=self.normalize)

    def paths(self, paths: Sequence, progress: Callable[[int], None] | None = None) -> "Embeddings":
        """Embed image files (each path once, in order)."""
        return self.dataset(ImageFiles(paths, self.preprocess), progress)


def default_batch_size(device: torch.device) -> int:
    """Evaluation has no gradients: a GPU takes far larger batches than training."""
    return 2048 if device.type == "cuda" else 128


@torch.inference_mode()
def embed_dataset(
    net: torch.nn.Module,
    preprocess: Preprocess,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    flip: bool = True,
    batch_size: int | None = None,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    amp: bool = True,
    normalize: bool = True,
) -> Embeddings:
    """Embed every sample of a dataset yielding ``(image, index, bad)`` (unit rows unless ``normalize=False``)."""
    device = torch.device(device)
    n = len(dataset)
    batch_size = batch_size or default_batch_size(device)
    was_training = net.training
    net.eval()
    dim = None
    out: np.ndarray | None = None
    quality = np.full(n, np.nan, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    bad: list[str] = []
    passes = 0
    loader_kwargs = dict(batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_samples, pin_memory=device.type == "cuda")
    if workers > 0:
        loader_kwargs.update(prefetch_factor=4, worker_init_fn=_one_thread)
    dtype = _autocast_dtype(device, amp)
    chunk = batch_size  # images per piece; halved on out-of-memory
    try:
        for images, index, reasons in DataLoader(dataset, **loader_kwargs):
            bad.extend(reasons)
            if images.shape[0]:
                raw, chunk = embed_batch(net, images, preprocess, device, dtype, flip, chunk, normalize=False)
                passes += images.shape[0] * (2 if flip else 1)
                z = (F.normalize(raw, dim=1) if normalize else raw).cpu().numpy()
                if out is None:
                    dim = z.shape[1]
                    out = np.full((n, dim), np.nan, dtype=np.float32)
                idx = index.numpy()
                out[idx] = z
                quality[idx] = (raw.norm(dim=1) / (2 if flip else 1)).cpu().numpy()
                ok[idx] = True
            if progress:
                progress(len(index) + len(reasons))
    finally:
        net.train(was_training)
    if out is None:
        out = np.full((n, 1), np.nan, dtype=np.float32)
    return Embeddings(vectors=out, forward_passes=passes, bad=bad, ok=ok, quality=quality)


def embed_paths(
    net: torch.nn.Module,
    preprocess: Preprocess,
    paths: Sequence,
    device: torch.device | str = "cpu",
    flip: bool = True,
    batch_size: int | None = None,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Embeddings:
    return Embedder(net, preprocess, device, flip, batch_size, workers).paths(paths, progress)


def pair_scores(vectors: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair from the table of unit embeddings."""
    a = vectors[np.asarray(index_a)].astype(np.float64)
    b = vectors[np.asarray(index_b)].astype(np.float64)
    return np.einsum("ij,ij->i", a, b)


def embed_batch(net, images: torch.Tensor, preprocess: Preprocess, device: torch.device, dtype, flip: bool, chunk: int,
                normalize: bool = True) -> tuple[torch.Tensor, int]:
    """A batch of uint8 images (on the host) as unit embeddings (raw ones with ``normalize=False``) on ``device``, in pieces of at most
    ``chunk`` images; ``chunk`` halves when the GPU runs out of memory, and comes back with the result.

    Evaluation starts with large batches (2048 images, twice that with flips) and settles on the
    largest that fits. The input preparation (float copies, mirror images, channels_last) is
    inside the halving: at that size it takes as much memory as the network's activations.
    """
    outputs = []
    start = 0
    while start < images.shape[0]:
        piece = images[start : start + chunk]
        try:
            outputs.append(_embed_piece(net, piece, preprocess, device, dtype, flip, normalize))
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += piece.shape[0]
    return torch.cat(outputs), chunk


def _embed_piece(net, images: torch.Tensor, preprocess: Preprocess, device: torch.device, dtype, flip: bool,
                 normalize: bool = True) -> torch.Tensor:
    x = normalize_batch(images.to(device, non_blocking=True), preprocess)
    if flip:
        x = torch.cat([x, x.flip(3)])
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        z = net(x).float()
    if flip:
        b = images.shape[0]
        z = z[:b] + z[b:]
    return F.normalize(z, dim=1) if normalize else z


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)
