"""JPEG batches decoded on the training device (``--decode gpu``): nvJPEG through torchvision.

Why. One CPU core decodes about 2,000 of CASIA-WebFace's 250x250 JPEGs per second; a GPU
trains faster than a few cores can feed it. With ``decode="gpu"`` the DataLoader workers
only read file bytes (:class:`Encoded`), :func:`facecli.data.folders.collate_samples`
packs a batch of them into one buffer (:class:`EncodedBatch`: two tensors to ship between
processes, not one per file), and :func:`decode_batch` decodes the batch in one call of
``torchvision.io.decode_jpeg(list, device=...)``, then crops and resizes it on the device.
The result is the uint8 (N, 3, S, S) batch the CPU path gives, with the same crop policy.

Fallback. Files the device decoder should not take go through the CPU path
(:func:`facecli.data.images.decode_image`) in the main process, one by one: anything that
is not a baseline/progressive 8-bit JPEG with 1 or 3 components (PNG, CMYK/YCCK, Adobe
RGB-transform, lossless, arithmetic-coded), data not ending with the JPEG end marker
(truncated), and files the device decoder rejects. A file neither path can decode is
reported exactly as the CPU path reports it.

On CUDA the decode runs on a side stream (:func:`_on_side_stream`): torchvision's batched
decode still makes the host wait for the decode itself (progressive JPEGs one by one), but
no longer for the training work queued before it.

Differences from the CPU path, measured in ``tests/test_device_decode.py``: the resize runs
in float32 and is rounded (the CPU path uses torch's uint8 kernel), so pixels differ by at
most a few grey levels; JPEGs more than twice the input size are decoded at full size and
resized, where the CPU path lets PIL decode them at reduced scale (draft mode); nvJPEG's
IDCT and chroma upsampling may differ from libjpeg-turbo's by a grey level or two.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from facecli.data.images import Preprocess, centre_square, crop_side, decode_image, draft_scale
from facecli.errors import ImageError

# Frame types nvJPEG decodes: baseline, extended sequential and progressive Huffman.
DEVICE_FRAMES = (0xC0, 0xC1, 0xC2)
OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}


class Encoded(NamedTuple):
    """One encoded image as a DataLoader sample carries it: its bytes and where it came from."""

    data: bytes
    where: str


@dataclass
class EncodedBatch:
    """A batch of encoded images: one uint8 buffer, offsets, and the names for error reports."""

    data: torch.Tensor  # uint8 (total bytes,)
    offsets: torch.Tensor  # int64 (n + 1,)
    where: list[str]

    @classmethod
    def collate(cls, samples: list[Encoded]) -> "EncodedBatch":
        lengths = torch.tensor([len(s.data) for s in samples], dtype=torch.int64)
        offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        data = torch.frombuffer(bytearray(b"".join(s.data for s in samples)), dtype=torch.uint8)
        return cls(data, offsets, [s.where for s in samples])

    def __len__(self) -> int:
        return len(self.where)

    def item(self, i: int) -> torch.Tensor:
        """File i's bytes (a view of the buffer)."""
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def pin_memory(self) -> "EncodedBatch":
        """Left as it is: the decoder reads host memory itself (DataLoader calls this with pin_memory=True)."""
        return self


class JpegFrame(NamedTuple):
    components: int
    height: int
    width: int


def jpeg_frame(data: bytes | memoryview) -> JpegFrame | None:
    """The frame header of a JPEG the device decoder can take, or None (then the CPU path decodes).

    Walks the marker segments up to the frame header; reads no image data.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[n - 2] != 0xFF or data[n - 1] != 0xD9:
        return None  # not a JPEG, or truncated (no end marker)
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in STANDALONE:
            i += 2
            continue
        if marker == 0xEE and bytes(data[i + 4 : i + 9]) == b"Adobe" and i + 15 < n and data[i + 15] == 0:
            return None  # Adobe "no transform": RGB-coded (or CMYK); PIL knows how to convert it
        if marker in DEVICE_FRAMES and i + 9 < n:
            precision, components = data[i + 4], data[i + 9]
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            ok = precision == 8 and components in (1, 3) and height > 0 and width > 0
            return JpegFrame(components, height, width) if ok else None
        if marker in OTHER_FRAMES or marker == 0xDA:
            return None  # lossless/arithmetic, or a scan before any frame header
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _device_decode(items: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 on ``device`` per item; None where the device decoder fails.

    One batched call first; if it raises (one bad file fails the whole call), item by item.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision >= 0.29 announces the move of its decoders to TorchCodec on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(items, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for x in items:
            try:
                out.append(decode_jpeg(x, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def resize_batch(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 3, s, s) to uint8 (N, 3, S, S): bilinear, antialiased, on x's device (float math, rounded)."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x.contiguous()
    y = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def reduce_like_draft(x: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) averaged over ``scale`` x ``scale`` blocks to ceil(H/scale) x ceil(W/scale):
    the geometry (and nearly the pixels) of the CPU path's reduced-scale JPEG decoding."""
    y = F.avg_pool2d(x.float(), scale, stride=scale, ceil_mode=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _crop_resize_groups(decoded: dict[int, torch.Tensor], preprocess: Preprocess) -> dict[int, torch.Tensor]:
    """Crop and resize decoded images, batched per source size (a CASIA batch is one group)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in decoded.items():
        groups.setdefault((x.shape[1], x.shape[2]), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for (h, w), idx in groups.items():
        side = crop_side(w, h, preprocess.crop_fraction)
        stack = torch.stack([decoded[i] for i in idx])
        scale = draft_scale(w, h, side, preprocess.image_size)
        if scale > 1:
            stack = reduce_like_draft(stack, scale)
            side = max(1, int(round(side * stack.shape[-1] / w)))
        stack = centre_square(stack, side)
        for i, y in zip(idx, resize_batch(stack, preprocess.image_size)):
            out[i] = y
    return out


def _cpu_decode(batch: EncodedBatch, idx: list[int], preprocess: Preprocess) -> tuple[dict[int, torch.Tensor], list[str]]:
    """The CPU path for the files the device does not take; reasons for the unreadable ones."""
    done: dict[int, torch.Tensor] = {}
    bad: list[str] = []
    for i in idx:
        try:
            done[i] = decode_image(batch.item(i).numpy().tobytes(), preprocess.image_size, preprocess.crop_fraction, where=batch.where[i])
        except ImageError as e:
            bad.append(str(e))
    return done, bad


def decode_batch(batch: EncodedBatch, preprocess: Preprocess, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode, crop and resize a batch on ``device``.

    Returns (images, keep, bad): uint8 (K, 3, S, S) on ``device``; int64 positions (on the
    CPU) of the K decoded files in the batch, in order, to select their labels; the reasons
    of the files that could not be decoded.
    """
    device = torch.device(device)
    frames = [jpeg_frame(memoryview(batch.item(i).numpy())) for i in range(len(batch))]
    on_device = [i for i, f in enumerate(frames) if f is not None]
    decoded: dict[int, torch.Tensor] = {}
    for i, x in zip(on_device, _device_decode([batch.item(i) for i in on_device], device) if on_device else []):
        if x is not None and (x.shape[1], x.shape[2]) == (frames[i].height, frames[i].width):
            decoded[i] = x
    ready = _crop_resize_groups(decoded, preprocess)
    fallback, bad = _cpu_decode(batch, [i for i in range(len(batch)) if i not in decoded], preprocess)
    ready.update({i: x.to(device, non_blocking=True) for i, x in fallback.items()})
    keep = sorted(ready)
    size = preprocess.image_size
    images = torch.stack([ready[i] for i in keep]) if keep else torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    return images, torch.tensor(keep, dtype=torch.int64), bad


def to_device_batch(images, labels: torch.Tensor, bad: list[str], preprocess: Preprocess, device: torch.device | str):
    """What the training loop calls on each loader batch: decodes an :class:`EncodedBatch` on
    ``device`` (dropping the labels of undecodable files), passes a uint8 tensor through.

    The labels come back as the loader's (pinned) tensor unless a file was dropped, so the
    step's ``non_blocking`` copy stays asynchronous; an indexed copy would be pageable memory.
    """
    if not isinstance(images, EncodedBatch):
        return images, labels, bad
    device = torch.device(device)
    if device.type == "cuda":
        decoded, keep, more_bad = _on_side_stream(images, preprocess, device)
    else:
        decoded, keep, more_bad = decode_batch(images, preprocess, device)
    return decoded, labels if len(keep) == len(labels) else labels[keep], list(bad) + more_bad


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _on_side_stream(batch: EncodedBatch, preprocess: Preprocess, device: torch.device):
    """:func:`decode_batch` on a stream of its own. torchvision's nvJPEG decode ends by
    synchronising the current stream; on the training stream that wait would include the
    previous step's queued backward and update. On a side stream the host waits for the
    decode alone while the training stream keeps working; the training stream then waits
    (on the device, not the host) for the decoded batch."""
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        images, keep, bad = decode_batch(batch, preprocess, device)
    main.wait_stream(side)
    images.record_stream(main)  # made on the side stream, used and freed on the training stream
    return images, keep, bad
