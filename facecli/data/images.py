"""Decoding one face image into the network's input: a uint8 (3, S, S) tensor.

Everything that reads pixels (identity folders, packed RecordIO, ``.bin`` sets, LFW
pairs, ``embed``) goes through :func:`decode_image`, so training and evaluation see
exactly the same preprocessing:

1. decode (JPEG decoding is downscaled while decoding with PIL's draft mode when the
   source is much larger than the input: fewer pixels decoded, same result quality;
   other RGB/grayscale JPEGs are decoded by torchvision's libjpeg-turbo decoder straight
   into a tensor, everything else by PIL);
2. convert any mode to RGB (grayscale, CMYK, 16-bit, palette with alpha);
3. centre-crop a square whose side is ``crop_fraction`` of the shorter side;
4. resize to ``image_size`` x ``image_size`` (bilinear, antialiased), always with torch's
   uint8 resampler (one resampler for every format; several times faster than PIL's).

Crop policy (``crop_fraction=None`` means *auto*): unaligned 250x250 images, the raw
CASIA-WebFace and LFW layout, keep their central 150x150 region (fraction 0.6), where
the face is; every other size keeps the whole centred square (aligned 112x112 sets,
the synthetic set, AT&T). The resolved fraction is stored in every checkpoint.

Pixels stay uint8 until they reach the training device: shipping bytes instead of
float tensors between DataLoader workers is four times less memory traffic.
"""

from __future__ import annotations

import io
import struct
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from facecli.errors import ImageError

# A truncated JPEG must fail loudly, not decode as grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Face sets never hold gigapixel images; keep PIL's bomb check but as an error.
warnings.simplefilter("error", Image.DecompressionBombWarning)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")
UNALIGNED_SIZE = (250, 250)
UNALIGNED_CROP = 0.6

Source = Union[str, os.PathLike, bytes]


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become network input; saved with every model."""

    image_size: int = 112
    crop_fraction: float | None = None  # None: auto (see module docstring)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return {
            "image_size": int(self.image_size),
            "crop_fraction": None if self.crop_fraction is None else float(self.crop_fraction),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            image_size=int(d["image_size"]),
            crop_fraction=d.get("crop_fraction"),
            mean=tuple(d.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(d.get("std", (0.5, 0.5, 0.5))),
        )


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def resolve_crop(size: tuple[int, int], crop_fraction: float | None) -> float:
    if crop_fraction is not None:
        return float(crop_fraction)
    return UNALIGNED_CROP if tuple(size) == UNALIGNED_SIZE else 1.0


def crop_side(width: int, height: int, crop_fraction: float | None) -> int:
    """Side of the centred square kept from a ``width`` x ``height`` image (see the crop policy)."""
    return max(1, int(round(min(width, height) * resolve_crop((width, height), crop_fraction))))


def draft_scale(width: int, height: int, side: int, image_size: int) -> int:
    """The reduction (1, 2, 4 or 8) that JPEG draft mode decodes at for this crop and input size.

    Draft mode applies when the crop is more than twice the input; PIL then picks the largest
    of 8, 4, 2, 1 that keeps at least ``image_size`` pixels in the crop (PIL's ``draft`` rule,
    repeated here so that the device decoder can reproduce the same geometry).
    """
    if side <= 2 * image_size:
        return 1
    want_w, want_h = max(1, int(width * image_size / side)), max(1, int(height * image_size / side))
    scale = min(width // want_w, height // want_h)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def centre_square(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """The centred ``side`` x ``side`` region of (..., H, W) pixels (a view)."""
    h, w = pixels.shape[-2], pixels.shape[-1]
    if side == min(w, h) and w == h:
        return pixels
    left = (w - side) // 2
    top = (h - side) // 2
    return pixels[..., top : top + side, left : left + side]


def read_image_bytes(source: Source, where: str) -> bytes:
    """The encoded bytes of ``source`` (a path or bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{where}: empty image data.")
        return bytes(source)
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"{where}: file not found.") from e
    except OSError as e:
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e
    if not data:
        raise ImageError(f"{where}: file is empty (0 bytes).")
    return data


def _open(data: bytes, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:  # its text would name the BytesIO object (an address)
        raise ImageError(f"{where}: not a readable image (UnidentifiedImageError: cannot identify image file).") from e
    except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError, struct.error, IndexError, EOFError) as e:
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e


_decode_jpeg = None  # torchvision.io.decode_jpeg once imported; False if unavailable


def _fast_jpeg(data: bytes) -> torch.Tensor | None:
    """(3, H, W) uint8 from torchvision's libjpeg-turbo decoder, or None (then PIL decodes).

    Used for RGB and grayscale JPEGs only (PIL converts CMYK its own way). A file it refuses
    (truncated, corrupt) goes to PIL, which raises for it or decodes what it can read strictly.
    """
    global _decode_jpeg
    if _decode_jpeg is None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            _decode_jpeg = lambda buf: decode_jpeg(buf, mode=ImageReadMode.RGB)  # noqa: E731
        except Exception:  # torchvision built without its image library, or a release without it
            _decode_jpeg = False
    if _decode_jpeg is False:
        return None
    try:
        with warnings.catch_warnings():
            # torchvision >= 0.29 announces the move of its decoders to TorchCodec on every call.
            warnings.simplefilter("ignore", DeprecationWarning)
            return _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError:
        return None


def _pil_pixels(img: Image.Image) -> torch.Tensor:
    """Decode a PIL image to a (3, H, W) uint8 tensor (a channels-last view of an HWC array)."""
    img.load()
    rgb = to_rgb(img)
    try:
        arr = np.array(rgb, dtype=np.uint8)
    finally:
        if rgb is not img:
            rgb.close()
    return torch.from_numpy(arr).permute(2, 0, 1)


def _crop_resize(pixels: torch.Tensor, side: int, image_size: int) -> torch.Tensor:
    """Centre square of ``side`` pixels, resized to ``image_size`` (bilinear, antialiased), contiguous."""
    pixels = centre_square(pixels, side)
    if side != image_size:
        # channels-last uint8 input takes torch's vectorised antialiased path
        x = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        pixels = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]
    return pixels.contiguous()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, without the surprises of a bare ``convert('RGB')``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(arr * 255 // max(top, 1), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        arr8 = np.clip((arr - lo) * 255.0 / max(hi - lo, 1e-12), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    source: Source,
    image_size: int = 112,
    crop_fraction: float | None = None,
    where: str | None = None,
) -> torch.Tensor:
    """Decode, convert, crop and resize one image to a uint8 tensor (3, S, S).

    Raises :class:`ImageError` for empty, truncated or non-image input.
    """
    where = where or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else "<bytes>")
    data = read_image_bytes(source, where)
    img = _open(data, where)
    try:
        w, h = img.size
        side = crop_side(w, h, crop_fraction)
        pixels = None
        if img.format == "JPEG" and draft_scale(w, h, side, image_size) > 1:
            # Decode at 1/2, 1/4 or 1/8 scale while keeping at least image_size pixels in the crop.
            scale_to = (max(1, int(w * image_size / side)), max(1, int(h * image_size / side)))
            img.draft("RGB", scale_to)
            w2, h2 = img.size
            side = max(1, int(round(side * w2 / w)))
        elif img.format == "JPEG" and img.mode in ("RGB", "L"):
            pixels = _fast_jpeg(data)
            if pixels is not None and tuple(pixels.shape[1:]) != (h, w):
                pixels = None  # not what the header announced: let PIL decide
        if pixels is None:
            pixels = _pil_pixels(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e
    except (IndexError, KeyError, TypeError, struct.error, EOFError, ZeroDivisionError, MemoryError) as e:
        # What PIL's format plugins raise on some malformed files: still the file's fault.
        raise ImageError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e
    finally:
        img.close()
    return _crop_resize(pixels, side, image_size)


_AFFINE: dict = {}


def _affine(preprocess: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift of the normalisation, made once per device: building them
    every step would copy from the host and make it wait for the device each time."""
    key = (tuple(preprocess.mean), tuple(preprocess.std), str(device))
    if key not in _AFFINE:
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
        _AFFINE[key] = (mean.to(device), std.to(device))
    return _AFFINE[key]


def normalize_batch(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (B, 3, S, S) on any device to normalised float32."""
    mean, std = _affine(preprocess, images.device)
    return (images.float().div_(255.0) - mean) / std
