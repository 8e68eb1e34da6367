"""insightface ``.bin`` verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds the encoded
images (JPEG/PNG bytes), two consecutive entries per pair, and ``issame_list`` one bool
per pair. Files made with Python 2 store the images as ``str``, so they are unpickled
with ``encoding="bytes"`` to get them back as bytes.

Unpickling can run arbitrary code, and these files are downloaded from mirrors, so
they are loaded with a restricted unpickler that resolves only the handful of globals
that pickles of bytes, bools and numpy arrays need; anything else (``os.system``,
``builtins.eval``, ...) is refused before it can be called.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facecli.data.images import decode_image
from facecli.errors import UserError

__all__ = ["BinSet", "read_bin", "write_bin", "DEFAULT_PROTOCOL"]

# Protocol 4 is readable by every Python 3 from 3.4 on (insightface's own tools use it
# through pickle.HIGHEST_PROTOCOL on their Python).
DEFAULT_PROTOCOL = 4

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class _Refused(Exception):
    """A forbidden global or argument met while unpickling (turned into a UserError)."""


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` limited to what Python 3 pickles of ``bytes`` use (latin-1)."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _empty_bytes(*args):
    """``bytes()`` as pickled for ``b''``; with arguments ``bytes(n)`` could allocate anything."""
    if args:
        raise _Refused("builtins.bytes with arguments")
    return b""


# Python 2/3 pickles of numpy arrays and scalars use numpy.core (numpy 1) or numpy._core
# (numpy 2) paths; both resolve to the installed numpy.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


@dataclass
class BinSet:
    """A loaded verification set: ``images[2k]`` and ``images[2k+1]`` form pair ``k``."""

    name: str
    images: list[bytes]
    issame: np.ndarray  # bool (num_pairs,)
    path: Path | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def decode(self, i: int, image_size: int = 112, crop_fraction: float | None = None) -> torch.Tensor:
        """Image ``i`` as the uint8 (3, S, S) tensor every facecli model consumes."""
        where = f"{self.path or self.name}[image {i}]"
        return decode_image(self.images[i], image_size, crop_fraction, where=where)

    def __repr__(self) -> str:
        return f"BinSet({self.name!r}, {self.num_pairs} pairs, {int(self.issame.sum())} same)"


def _validate(obj, where: str) -> tuple[list[bytes], np.ndarray]:
    """Check the ``(bins, issame_list)`` structure and normalise it to (list[bytes], bool array)."""
    hint = "A .bin verification set is a pickle of (list of encoded images, list of bools), two images per pair."
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        got = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise UserError(f"{where}: expected a pair (bins, issame_list), found a {got}.", hint=hint)
    bins, issame = obj
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise UserError(f"{where}: bins must be a list of encoded images, found {type(bins).__name__}.", hint=hint)
    images: list[bytes] = []
    for i, b in enumerate(bins):
        if isinstance(b, (bytes, bytearray, memoryview)):
            images.append(bytes(b))
        elif isinstance(b, np.ndarray) and b.dtype == np.uint8:
            images.append(b.tobytes())
        else:
            raise UserError(
                f"{where}: image {i} is a {type(b).__name__}"
                f"{' of ' + str(b.dtype) if isinstance(b, np.ndarray) else ''}, not encoded image bytes.",
                hint=hint,
            )
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise UserError(
                f"{where}: issame_list must be 1-D bools, found an array of {issame.dtype} with shape {issame.shape}.",
                hint=hint,
            )
        flags = issame.copy()
    elif isinstance(issame, (list, tuple)):
        bad = next((i for i, v in enumerate(issame) if not isinstance(v, (bool, np.bool_))), None)
        if bad is not None:
            raise UserError(
                f"{where}: issame_list[{bad}] is a {type(issame[bad]).__name__}, not a bool.", hint=hint
            )
        flags = np.asarray(issame, dtype=np.bool_).reshape(-1)
    else:
        raise UserError(f"{where}: issame_list must be a list of bools, found {type(issame).__name__}.", hint=hint)
    if flags.size == 0:
        raise UserError(f"{where}: the set holds no pairs.", hint=hint)
    if len(images) != 2 * flags.size:
        raise UserError(
            f"{where}: {len(images)} images for {flags.size} pairs; a verification set needs exactly 2 per pair.",
            hint=hint,
        )
    return images, flags


def read_bin(path: str | os.PathLike) -> BinSet:
    """Load a ``.bin`` verification set safely (no code in the file is ever run)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: verification set not found.", hint="Give the path to a .bin file such as lfw.bin.")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise UserError(
            f"{path}: refusing to unpickle: it references {e}, which a .bin verification set never needs "
            "(the file could run code).",
            hint="Use .bin files from a trusted source, or rebuild this one from the images.",
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}).") from e
    except Exception as e:  # any malformed pickle stream; nothing in it could run code
        raise UserError(
            f"{path}: not a readable .bin verification set ({type(e).__name__}: {e}).",
            hint="The file is damaged or is not an insightface-style pickle.",
        ) from e
    images, issame = _validate(obj, str(path))
    return BinSet(name=path.stem, images=images, issame=issame, path=path)


def write_bin(
    path: str | os.PathLike,
    images: Sequence[bytes],
    issame: Sequence[bool] | np.ndarray,
    protocol: int = DEFAULT_PROTOCOL,
) -> Path:
    """Write ``(bins, issame_list)`` in insightface's layout: list of bytes, list of Python bools.

    The file is replaced atomically so a reader never sees half a set.
    """
    path = Path(path)
    flags = np.asarray(issame).reshape(-1) if isinstance(issame, np.ndarray) else list(issame)
    bins, checked = _validate((list(images), flags), str(path))
    payload = (bins, [bool(v) for v in checked.tolist()])
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}.") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
