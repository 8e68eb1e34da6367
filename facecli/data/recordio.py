"""MXNet RecordIO (``train.rec`` + ``train.idx`` + ``property``) without MXNet.

Most published face training sets (insightface's ``faces_webface_112x112``,
``faces_emore``, ...) ship in this format, so facecli reads it directly and can also
write it from identity folders.

Byte layout (dmlc-core ``recordio`` as used by ``mx.recordio``), little endian:

* every record part is ``uint32 magic 0xced7230a``, ``uint32 lrec``, payload, zero
  padding to a multiple of 4 bytes. ``lrec`` holds the part length in its lower 29
  bits and a continuation flag in its upper 3 bits: 0 whole record, 1 first part,
  2 middle part, 3 last part. The writer splits a record wherever the magic word
  appears at a 4-byte aligned position of the payload and drops that word; the reader
  puts it back between the parts. This keeps record boundaries findable by scanning.
* ``train.idx`` is text, one ``key<TAB>offset`` line per record.
* each record payload starts with ``IRHeader`` = ``struct 'IfQQ'`` (flag uint32,
  label float32, id uint64, id2 uint64; 24 bytes). When ``flag > 0``, ``flag`` float32
  labels follow and replace the scalar label (which is then stored as 0). The rest is
  the encoded image.

insightface layout: record 0 has the label ``(a, b)``: identity records are keys
``[a, b)``; the identity record of class ``c`` is key ``a + c`` and its label
``(start, end)`` is the key range of that class's images; image records (keys
``1 .. a-1``) carry their class id as label. Packs without such a header (record 0 with
flag 0) are read as "every key in the idx is an image", like arcface_torch does.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from facecli.data.device_decode import Encoded
from facecli.data.images import Preprocess, decode_image, is_image_file, read_image_bytes, to_rgb
from facecli.errors import UserError

__all__ = [
    "MAGIC",
    "IR_FORMAT",
    "IR_SIZE",
    "IRHeader",
    "pack_record",
    "unpack_record",
    "frame_record",
    "RecordIOReader",
    "RecordIOWriter",
    "RecordIODataset",
    "PackSummary",
    "pack_folders",
    "is_recordio_dir",
    "REC_NAME",
    "IDX_NAME",
    "PROPERTY_NAME",
    "CLASSES_NAME",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_MAX_RECORD = 1 << 29
IR_FORMAT = "<IfQQ"  # same bytes as MXNet's native 'IfQQ' on every little-endian host
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
CLASSES_NAME = "classes.txt"

_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: camera JPEGs with extra APP segments; still plain JPEG to decoders
_REENCODE_QUALITY = 95
_PIL_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte header at the start of every record payload."""

    flag: int
    label: float | np.ndarray  # float32 array of length ``flag`` when flag > 0
    id: int
    id2: int


def pack_record(label: float | Sequence[float] | np.ndarray, id: int = 0, id2: int = 0, payload: bytes = b"") -> bytes:
    """IRHeader + optional label vector + payload, as ``mx.recordio.pack`` builds it.

    A scalar label gives flag 0; a vector label gives ``flag = len(label)``, the scalar
    label field 0 and the float32 labels right after the header.
    """
    if np.ndim(label) == 0:
        head = struct.pack(IR_FORMAT, 0, float(label), int(id), int(id2))
        return head + bytes(payload)
    vec = np.asarray(label, dtype="<f4").reshape(-1)
    head = struct.pack(IR_FORMAT, int(vec.size), 0.0, int(id), int(id2))
    return head + vec.tobytes() + bytes(payload)


def unpack_record(record: bytes, where: str = "<record>") -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the remaining bytes."""
    if len(record) < IR_SIZE:
        raise UserError(
            f"{where}: record is {len(record)} bytes, shorter than its {IR_SIZE}-byte header.",
            hint="The .rec file is damaged or is not an MXNet image RecordIO file.",
        )
    flag, label, rid, rid2 = struct.unpack_from(IR_FORMAT, record, 0)
    if flag == 0:
        return IRHeader(flag, float(label), rid, rid2), bytes(record[IR_SIZE:])
    end = IR_SIZE + 4 * flag
    if len(record) < end:
        raise UserError(
            f"{where}: record header announces {flag} labels but the record is only {len(record)} bytes.",
            hint="The .rec file is damaged or is not an MXNet image RecordIO file.",
        )
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, labels, rid, rid2), bytes(record[end:])


def frame_record(payload: bytes) -> bytes:
    """RecordIO framing of one record, byte for byte what dmlc's writer emits.

    The payload is split at every 4-byte aligned occurrence of the magic word (which is
    dropped and restored by the reader), then each part gets magic + lrec, and the last
    part is zero-padded to a multiple of 4 bytes.
    """
    data = bytes(payload)
    n = len(data)
    if n >= _MAX_RECORD:
        raise UserError(f"record of {n} bytes is too large for RecordIO (limit {_MAX_RECORD - 1} bytes).")
    aligned = n - n % 4
    words = np.frombuffer(data, dtype="<u4", count=aligned // 4) if aligned else np.zeros(0, "<u4")
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for cut in cuts:
        out += _MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (cut - start))
        out += data[start:cut]
        start = cut + 4
    out += _MAGIC_BYTES + struct.pack("<I", ((3 if cuts else 0) << 29) | (n - start))
    out += data[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


# --------------------------------------------------------------------------- reader


_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


def _read_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into int64 arrays, in file order.

    The fast path parses the whole text in C (millions of lines for MS1M-size sets);
    only a file that fails it is re-read line by line to name the offending line.
    """
    raw = idx_path.read_bytes()
    body = raw.strip()
    n_lines = body.count(b"\n") + 1 if body else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            flat = np.fromstring(body, dtype=np.int64, sep=" ")  # any whitespace separates
    except (ValueError, DeprecationWarning):
        flat = None
    blank_lines = _BLANK_LINE.search(body) is not None
    if flat is None or blank_lines or flat.size != 2 * n_lines:
        lines = [line for line in raw.splitlines() if line.strip()]
        bad = next((i for i, line in enumerate(lines, 1) if len(line.split()) != 2), None)
        if bad is None:
            try:
                flat = np.asarray([int(t) for line in lines for t in line.split()], dtype=np.int64)
            except (ValueError, OverflowError):
                bad = next(
                    i for i, line in enumerate(lines, 1) if not all(t.lstrip(b"-").isdigit() for t in line.split())
                )
        if bad is not None:
            raise UserError(
                f"{idx_path}: line {bad} is not 'key<TAB>offset' with integers: {lines[bad - 1][:80]!r}.",
                hint="Regenerate the .idx file (one integer key and byte offset per line).",
            )
    if flat.size == 0:
        raise UserError(f"{idx_path}: the index file is empty.", hint="Regenerate the .idx for this .rec.")
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class RecordIOReader:
    """Random access to an MXNet ``.rec`` file by key, through its ``.idx`` file.

    The file is opened lazily, once per process: a reader created in the main process
    and handed to forked or spawned DataLoader workers opens its own descriptor in each
    worker (a descriptor inherited across ``fork`` shares its file position with the
    parent). Reads are positional (``os.pread``), so threads can share a reader too.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        for path, what in ((self.rec_path, "RecordIO data file"), (self.idx_path, "RecordIO index file")):
            if not path.is_file():
                raise UserError(
                    f"{path}: {what} not found.",
                    hint="A packed set needs both train.rec and train.idx side by side.",
                )
        self.size = self.rec_path.stat().st_size
        self.keys, self.offsets = _read_idx(self.idx_path)
        if np.all(self.keys[1:] > self.keys[:-1]):  # the usual case: share, do not copy millions of entries
            self._sorted_keys, self._sorted_offsets = self.keys, self.offsets
        else:
            order = np.argsort(self.keys, kind="stable")
            self._sorted_keys = self.keys[order]
            self._sorted_offsets = self.offsets[order]
        dup = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if dup.size:
            raise UserError(
                f"{self.idx_path}: key {int(self._sorted_keys[dup[0]])} is listed more than once.",
                hint="Regenerate the .idx file.",
            )
        bad = np.flatnonzero((self.offsets < 0) | (self.offsets + 8 > self.size))
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"{self.idx_path}: key {int(self.keys[i])} points to offset {int(self.offsets[i])}, "
                f"past the end of {self.rec_path.name} ({self.size} bytes); {bad.size} entries are out of range.",
                hint="The .rec file is truncated (incomplete download?) or the .idx belongs to another .rec.",
            )
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # -- pickling: never ship an open descriptor to another process
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.keys.size)

    def __contains__(self, key: object) -> bool:
        try:
            k = int(key)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        i = int(np.searchsorted(self._sorted_keys, k))
        return i < self._sorted_keys.size and int(self._sorted_keys[i]) == k

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def close(self) -> None:
        fd, pid = self._fd, self._pid
        self._fd = self._pid = None
        if fd is not None and pid == os.getpid():
            os.close(fd)

    def contains_all(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``keys`` the idx lists (vectorised membership)."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_keys, keys), 0, max(self._sorted_keys.size - 1, 0))
        return self._sorted_keys[pos] == keys if self._sorted_keys.size else np.zeros(keys.shape, bool)

    def offset(self, key: int) -> int:
        k = int(key)
        i = int(np.searchsorted(self._sorted_keys, k))
        if i >= self._sorted_keys.size or int(self._sorted_keys[i]) != k:
            raise UserError(f"{self.idx_path}: no record with key {k}.", hint="The .idx does not list this key.")
        return int(self._sorted_offsets[i])

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:
                # Inherited through fork: close our copy, never the parent's file position.
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        fd = self._descriptor()
        if hasattr(os, "pread"):
            chunks = []
            while n > 0:
                chunk = os.pread(fd, n, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                n -= len(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        with self._lock:  # no pread (Windows): serialise seek + read
            os.lseek(fd, offset, os.SEEK_SET)
            chunks = []
            while n > 0:
                chunk = os.read(fd, n)
                if not chunk:
                    break
                chunks.append(chunk)
                n -= len(chunk)
            return b"".join(chunks)

    def _part_header(self, pos: int, where: str) -> tuple[int, int]:
        head = self._pread(8, pos)
        if len(head) < 8:
            raise UserError(
                f"{where}: truncated record header at offset {pos} ({self.rec_path.name} is {self.size} bytes).",
                hint="The .rec file is truncated (incomplete download?).",
            )
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise UserError(
                f"{where}: bad RecordIO magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}).",
                hint="The file is not an MXNet RecordIO file, is damaged, or its .idx belongs to another .rec.",
            )
        return lrec >> 29, lrec & _LEN_MASK

    def read_at(self, offset: int, where: str | None = None) -> bytes:
        """The full record starting at ``offset``, multi-part records joined as MXNet does."""
        where = where or f"{self.rec_path}"
        parts: list[bytes] = []
        pos = int(offset)
        while True:
            cflag, length = self._part_header(pos, where)
            if not parts and cflag not in (0, 1):
                raise UserError(
                    f"{where}: offset {pos} is the continuation (flag {cflag}) of a multi-part record, not its start.",
                    hint="The .idx does not match this .rec; regenerate it.",
                )
            if parts and cflag not in (2, 3):
                raise UserError(
                    f"{where}: multi-part record interrupted at offset {pos} (part flag {cflag}).",
                    hint="The .rec file is damaged.",
                )
            data = self._pread(length, pos + 8)
            if len(data) < length:
                raise UserError(
                    f"{where}: truncated record at offset {pos}: {length} bytes announced, "
                    f"{len(data)} left in {self.rec_path.name}.",
                    hint="The .rec file is truncated (incomplete download?).",
                )
            parts.append(data)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> bytes:
        """The full record payload stored under ``key``."""
        return self.read_at(self.offset(key), where=f"{self.rec_path}[key {int(key)}]")

    def read_header(self, key: int) -> tuple[IRHeader, int]:
        """The IRHeader of ``key`` and the length of what follows it, reading only the header bytes.

        Building sample lists over millions of records must not read every image.
        """
        where = f"{self.rec_path}[key {int(key)}]"
        pos = self.offset(key)
        cflag, length = self._part_header(pos, where)
        if cflag != 0:  # multi-part: rare, read it whole
            record = self.read_at(pos, where)
            header, rest = unpack_record(record, where)
            return header, len(rest)
        if pos + 8 + length > self.size:
            raise UserError(
                f"{where}: truncated record at offset {pos}: {length} bytes announced, "
                f"{max(self.size - pos - 8, 0)} left in {self.rec_path.name}.",
                hint="The .rec file is truncated (incomplete download?).",
            )
        head = self._pread(min(length, IR_SIZE), pos + 8)
        if len(head) < min(length, IR_SIZE):
            raise UserError(
                f"{where}: truncated record at offset {pos}.", hint="The .rec file is truncated (incomplete download?)."
            )
        if length < IR_SIZE:
            unpack_record(head, where)  # raises with the right message
        flag = struct.unpack_from("<I", head, 0)[0]
        need = IR_SIZE + 4 * flag
        if flag:
            if need > length:
                raise UserError(
                    f"{where}: record header announces {flag} labels but the record is only {length} bytes.",
                    hint="The .rec file is damaged or is not an MXNet image RecordIO file.",
                )
            head = self._pread(need, pos + 8)
            if len(head) < need:
                raise UserError(
                    f"{where}: truncated record at offset {pos}.",
                    hint="The .rec file is truncated (incomplete download?).",
                )
        header, _ = unpack_record(head, where)
        return header, length - need


# --------------------------------------------------------------------------- writer


class RecordIOWriter:
    """Writes records in MXNet's byte layout plus the ``key<TAB>offset`` ``.idx``."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        try:
            self._rec = open(self.rec_path, "wb")
            self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        except OSError as e:
            raise UserError(f"cannot create {e.filename}: {e.strerror}.") from e
        self._pos = 0
        self._keys: set[int] = set()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tell(self) -> int:
        return self._pos

    def write(self, key: int, record: bytes) -> int:
        """Append one record under ``key``; returns its byte offset."""
        key = int(key)
        if key in self._keys:
            raise ValueError(f"key {key} written twice to {self.rec_path}")
        framed = frame_record(record)
        offset = self._pos
        self._rec.write(framed)
        self._idx.write(f"{key}\t{offset}\n")
        self._pos += len(framed)
        self._keys.add(key)
        return offset

    def close(self) -> None:
        for f in (getattr(self, "_rec", None), getattr(self, "_idx", None)):
            if f is not None and not f.closed:
                f.close()


# --------------------------------------------------------------------------- dataset


def is_recordio_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``train.rec`` and ``train.idx``."""
    p = Path(path)
    return p.is_dir() and (p / REC_NAME).is_file() and (p / IDX_NAME).is_file()


def _read_property(path: Path) -> tuple[int, int, int] | None:
    try:
        fields = [int(v) for v in path.read_text(encoding="ascii").strip().split(",")]
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (fields[0], fields[1], fields[2]) if len(fields) == 3 else None


def _scalar_label(header: IRHeader) -> float:
    """Class label of an image record (first entry of a vector label, as arcface_torch does)."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


def _ranges_to_keys(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(s, e)`` for every range without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets


class RecordIODataset(Dataset):
    """Training samples from a packed insightface/MXNet RecordIO folder.

    Follows facecli's dataset contract: ``labels`` (int64, one per sample, known
    without decoding), ``classes`` (name per label), ``preprocess``, and
    ``__getitem__ -> (uint8 image (3,S,S), label, None)`` or ``(None, label, reason)``
    for a record that cannot be read or decoded.
    """

    def __init__(
        self,
        rec_dir: str | os.PathLike,
        image_size: int = 112,
        crop_fraction: float | None = None,
        identities: Sequence[str] | None = None,
        decode: str = "cpu",
    ):
        """``decode="gpu"``: samples carry the encoded image (:class:`~facecli.data.device_decode.Encoded`)."""
        if decode not in ("cpu", "gpu"):
            raise UserError(f"--decode must be cpu or gpu, got {decode!r}.")
        self.decode = decode
        self.rec_dir = Path(rec_dir)
        if not self.rec_dir.is_dir():
            raise UserError(f"{self.rec_dir}: not a folder.", hint="Pass the folder holding train.rec and train.idx.")
        for name in (REC_NAME, IDX_NAME):
            if not (self.rec_dir / name).is_file():
                raise UserError(
                    f"{self.rec_dir}: {name} not found.",
                    hint="A packed set is a folder with train.rec and train.idx (and optionally property).",
                )
        self.reader = RecordIOReader(self.rec_dir / REC_NAME, self.rec_dir / IDX_NAME)
        self.preprocess = Preprocess(image_size=int(image_size), crop_fraction=crop_fraction)
        self.property = _read_property(self.rec_dir / PROPERTY_NAME)

        keys, labels, num_classes, self.layout = self._index()
        classes = self._class_names(num_classes)
        if identities is not None:
            keys, labels, classes = self._restrict(keys, labels, classes, identities)
        self.record_keys = keys
        self.labels = labels
        self.classes = classes

    # -- building the sample list

    def _index(self) -> tuple[np.ndarray, np.ndarray, int, str]:
        reader = self.reader
        if 0 in reader:
            header0, _ = reader.read_header(0)
        else:
            header0 = None
        if header0 is not None and header0.flag >= 2:
            a, b = int(header0.label[0]), int(header0.label[1])
            found = self._identity_ranges(a, b)
            if found is not None:
                keys, labels = found
                return keys, labels, b - a, "insightface header (identity ranges)"
            keys, labels = self._labels_from_records(skip={0}, exclude_range=(a, b))
            num = max(b - a, int(labels.max()) + 1 if labels.size else 0)
            return keys, labels, num, "insightface header (labels read from image records)"
        keys, labels = self._labels_from_records(skip=set())
        num = int(labels.max()) + 1 if labels.size else 0
        return keys, labels, num, "plain (every key is an image)"

    def _identity_ranges(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Image keys and labels from the identity records, or None when they do not hold up.

        Identity ranges are float32 in the file, so they are exact only below 2**24 keys;
        ranges that overlap, leave the image key span, miss from the idx, or disagree
        with the labels stored in the image records make the caller read every label.
        """
        reader = self.reader
        if not (1 <= a <= b):
            raise UserError(
                f"{reader.rec_path}: header record 0 gives identity range [{a}, {b}), which is empty or inverted.",
                hint="The file is damaged or not an insightface training pack.",
            )
        id_keys = np.arange(a, b, dtype=np.int64)
        if not reader.contains_all(id_keys).all():
            return None
        starts = np.empty(b - a, np.int64)
        ends = np.empty(b - a, np.int64)
        for i, k in enumerate(id_keys.tolist()):
            header, _ = reader.read_header(k)
            if header.flag < 2:
                return None
            starts[i], ends[i] = int(header.label[0]), int(header.label[1])
        lengths = ends - starts
        if (lengths < 0).any() or (starts < 1).any() or (ends > a).any():
            return None
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        if (s[1:] < e[:-1]).any():  # overlapping ranges
            return None
        keys = _ranges_to_keys(starts, ends)
        if not reader.contains_all(keys).all():
            return None
        labels = np.repeat(np.arange(b - a, dtype=np.int64), lengths)
        # The identity ordinal must be the label the image records carry (what arcface_torch
        # trains with); check the first image of every identity.
        for c in np.flatnonzero(lengths > 0).tolist():
            header, _ = reader.read_header(int(starts[c]))
            if _scalar_label(header) != float(c):
                return None
        return keys, labels

    def _labels_from_records(
        self, skip: set[int], exclude_range: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read every record header: keys in idx order, records without image bytes skipped."""
        reader = self.reader
        keys_out: list[int] = []
        labels_out: list[float] = []
        for k in reader.keys.tolist():
            if k in skip or (exclude_range is not None and exclude_range[0] <= k < exclude_range[1]):
                continue
            header, rest = reader.read_header(k)
            if rest == 0:  # identity / meta records carry no image
                continue
            keys_out.append(k)
            labels_out.append(_scalar_label(header))
        labels_f = np.asarray(labels_out, dtype=np.float64)
        bad = np.flatnonzero((labels_f < 0) | (labels_f != np.round(labels_f)))
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"{reader.rec_path}[key {keys_out[i]}]: label {labels_f[i]} is not a class id "
                f"(a non-negative integer); {bad.size} records are affected.",
                hint="This .rec does not look like a face-identity training set.",
            )
        return np.asarray(keys_out, dtype=np.int64), labels_f.astype(np.int64)

    def _class_names(self, num_classes: int) -> list[str]:
        path = self.rec_dir / CLASSES_NAME
        if not path.is_file():
            return [str(i) for i in range(num_classes)]
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read class names ({e}).", hint="Fix or delete the file.") from e
        if names and names[-1] == "":
            names.pop()
        if len(names) != num_classes:
            raise UserError(
                f"{path}: lists {len(names)} names but {self.rec_dir / REC_NAME} holds {num_classes} identities.",
                hint=f"Delete {CLASSES_NAME} (identities are then named by index) or regenerate the pack.",
            )
        return names

    @staticmethod
    def _restrict(
        keys: np.ndarray, labels: np.ndarray, classes: list[str], identities: Iterable[str]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        wanted = [str(x) for x in identities]
        dups = sorted({n for n, c in Counter(wanted).items() if c > 1})
        if dups:
            raise UserError(f"identity list names {', '.join(dups[:5])} more than once.")
        index = {name: i for i, name in enumerate(classes)}
        unknown = [n for n in wanted if n not in index]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UserError(
                f"identities not in this pack: {', '.join(unknown[:5])}{more}.",
                hint="Identity names come from classes.txt, or are label numbers when it is absent.",
            )
        old = np.asarray([index[n] for n in wanted], dtype=np.int64)
        remap = np.full(len(classes), -1, dtype=np.int64)
        remap[old] = np.arange(old.size, dtype=np.int64)
        new = remap[labels]
        keep = np.flatnonzero(new >= 0)
        # Samples in label order (key order within a label), as IdentityFolderDataset lists
        # them: a pack and its folders then give the same batches for the same seed.
        keep = keep[np.argsort(new[keep], kind="stable")]
        return keys[keep], new[keep], wanted

    # -- contract

    def __len__(self) -> int:
        return int(self.labels.size)

    def __getitem__(self, i: int):
        key = int(self.record_keys[i])
        label = int(self.labels[i])
        where = f"{self.reader.rec_path}[key {key}]"
        try:
            _, payload = unpack_record(self.reader.read(key), where)
            if self.decode == "gpu":
                return Encoded(read_image_bytes(payload, where), where), label, None
            image = decode_image(payload, self.preprocess.image_size, self.preprocess.crop_fraction, where=where)
        except UserError as e:
            return None, label, str(e)
        return image, label, None

    def describe(self) -> str:
        crop = "auto" if self.preprocess.crop_fraction is None else f"{self.preprocess.crop_fraction:g}"
        prop = "" if self.property is None else f", property {self.property[0]},{self.property[1]},{self.property[2]}"
        return (
            f"RecordIO {self.rec_dir}: {len(self)} images, {len(self.classes)} identities, "
            f"layout {self.layout}{prop}, input {self.preprocess.image_size}px crop {crop}"
        )

    def __repr__(self) -> str:
        return f"RecordIODataset({self.describe()})"


# --------------------------------------------------------------------------- packing


@dataclass
class PackSummary:
    """What :func:`pack_folders` wrote and what it had to leave out."""

    out_dir: Path
    num_images: int
    num_classes: int
    reencoded: int  # non-JPEG files stored as JPEG (quality 95)
    skipped: int  # unreadable image files left out
    skipped_files: list[str] = field(default_factory=list)  # "<path>: <reason>" per skipped file
    empty_identities: list[str] = field(default_factory=list)  # folders without one readable image
    image_size: tuple[int, int] = (0, 0)  # (height, width) written to ``property``: the most common size


def _load_for_pack(path: Path) -> tuple[bytes, tuple[int, int], bool]:
    """The bytes to store for one file (original JPEG, else JPEG q95), its (h, w), re-encoded?

    Every file is fully decoded once, so a truncated or corrupt image is caught here
    and never reaches training.
    """
    data = path.read_bytes()
    if not data:
        raise ValueError("file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        size = (img.height, img.width)
        if img.format in _JPEG_FORMATS:
            return data, size, False
        buf = io.BytesIO()
        to_rgb(img).save(buf, format="JPEG", quality=_REENCODE_QUALITY)
        return buf.getvalue(), size, True


def _check_pack_paths(src: Path, out: Path, targets: dict[str, Path], overwrite: bool) -> None:
    """Refuse a missing source, and an existing pack unless overwriting was asked for."""
    if not src.is_dir():
        raise UserError(f"{src}: not a folder.", hint="Pass a folder with one sub-folder of images per identity.")
    if not overwrite and any(targets[n].exists() for n in (REC_NAME, IDX_NAME)):
        raise UserError(
            f"{out}: already holds a packed set ({REC_NAME}/{IDX_NAME}).",
            hint="Choose another output folder or pass --overwrite.",
        )


def _identity_listing(src: Path) -> tuple[list[tuple[str, list[Path]]], int]:
    """[(identity, image files)] sorted by name, and the file count; refused before anything is written.

    A line break in a folder name would corrupt ``classes.txt`` (one name a line).
    """
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad_names = [p.name for p in folders if "\n" in p.name or "\r" in p.name]
    if bad_names:
        raise UserError(f"{src}: identity folder name {bad_names[0]!r} contains a line break.", hint="Rename it.")
    listing = [
        (p.name, sorted((f for f in p.iterdir() if f.is_file() and is_image_file(f)), key=lambda f: f.name))
        for p in folders
    ]
    total = sum(len(files) for _, files in listing)
    if total == 0:
        raise UserError(
            f"{src}: no images found in identity sub-folders.",
            hint=f"Expected {src}/<identity>/<image>.jpg (suffixes: jpg, png, bmp, ...).",
        )
    return listing, total


def _load_identity(files: list[Path], summary: PackSummary, sizes: Counter, on_file: Callable[[], None]) -> list[bytes]:
    """The payloads of one identity's readable files; unreadable ones are noted in ``summary``, not raised."""
    payloads: list[bytes] = []
    for f in files:
        try:
            payload, size, reencoded = _load_for_pack(f)
        except _PIL_ERRORS as e:
            summary.skipped += 1
            summary.skipped_files.append(f"{f}: {type(e).__name__}: {e}")
        else:
            payloads.append(payload)
            sizes[size] += 1
            summary.reencoded += int(reencoded)
        on_file()
    return payloads


def _write_image_records(
    writer: RecordIOWriter,
    listing: list[tuple[str, list[Path]]],
    total: int,
    summary: PackSummary,
    sizes: Counter,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[str], list[tuple[int, int]], int]:
    """Write image records from key 1, labels 0..C-1 in folder order, skipping identities with no image.

    Returns the kept identity names, their [start, end) key ranges, and the next free key.
    """
    done = 0

    def on_file() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    names: list[str] = []
    ranges: list[tuple[int, int]] = []
    key = 1
    for name, files in listing:
        payloads = _load_identity(files, summary, sizes, on_file)
        if not payloads:
            summary.empty_identities.append(name)
            continue
        label = len(names)
        start = key
        for payload in payloads:
            writer.write(key, pack_record(float(label), id=key, id2=0, payload=payload))
            key += 1
        names.append(name)
        ranges.append((start, key))
    return names, ranges, key


def _write_identity_records(writer: RecordIOWriter, ranges: list[tuple[int, int]], first_identity: int) -> bytes:
    """Write one (start, end) record per identity after the images; returns the framed header record 0.

    The header can only be known now, so the caller patches it over the placeholder.
    """
    for label, (start, end) in enumerate(ranges):
        key_c = first_identity + label
        writer.write(key_c, pack_record((float(start), float(end)), id=key_c, id2=0))
    return frame_record(pack_record((float(first_identity), float(first_identity + len(ranges))), id=0, id2=0))


def _patch_header(rec_path: Path, header: bytes) -> None:
    """Overwrite the placeholder record 0 in place; it must have the same framed size."""
    with open(rec_path, "r+b") as f:
        old = f.read(len(header))
        if len(old) != len(header) or old[:4] != _MAGIC_BYTES:
            raise RuntimeError("header placeholder has a different size than the final header")
        f.seek(0)
        f.write(header)


def _write_pack(
    partial: dict[str, Path],
    src: Path,
    listing: list[tuple[str, list[Path]]],
    total: int,
    summary: PackSummary,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int, tuple[int, int]]:
    """Write all four files under their ``.partial`` names: (images, identities, most common (h, w))."""
    sizes: Counter = Counter()
    with RecordIOWriter(partial[REC_NAME], partial[IDX_NAME]) as writer:
        # Placeholder header; same 40 framed bytes as the final one, patched at the end.
        writer.write(0, pack_record((0.0, 0.0), id=0, id2=0))
        names, ranges, key = _write_image_records(writer, listing, total, summary, sizes, progress)
        if not names:
            raise UserError(
                f"{src}: none of the {total} image files could be read.",
                hint=f"First problem: {summary.skipped_files[0]}" if summary.skipped_files else None,
            )
        header = _write_identity_records(writer, ranges, key)
    _patch_header(partial[REC_NAME], header)
    height, width = sizes.most_common(1)[0][0]
    partial[PROPERTY_NAME].write_text(f"{len(names)},{height},{width}\n", encoding="ascii")
    partial[CLASSES_NAME].write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return key - 1, len(names), (height, width)


def pack_folders(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    *,
    overwrite: bool = False,
) -> PackSummary:
    """Pack identity folders ``src/<identity>/<image>`` into an insightface RecordIO set.

    Writes ``train.rec``, ``train.idx``, ``property`` and ``classes.txt`` into
    ``out_dir``. Identities sorted by name get labels 0..C-1 (folders with no readable
    image are left out); files are sorted by name. JPEG bytes are stored unchanged.
    ``progress(done, total)`` is called after each image file. Files appear atomically:
    a failed pack leaves no partial ``train.rec`` behind. (Identity ranges are float32 in
    this format, exact up to 2**24 images; larger packs are still read correctly, from
    the labels of the image records.)
    """
    src = Path(src_dir)
    out = Path(out_dir)
    targets = {name: out / name for name in (REC_NAME, IDX_NAME, PROPERTY_NAME, CLASSES_NAME)}
    _check_pack_paths(src, out, targets, overwrite)
    listing, total = _identity_listing(src)

    out.mkdir(parents=True, exist_ok=True)
    partial = {name: path.with_name(path.name + ".partial") for name, path in targets.items()}
    summary = PackSummary(out_dir=out, num_images=0, num_classes=0, reencoded=0, skipped=0)
    try:
        num_images, num_classes, image_size = _write_pack(partial, src, listing, total, summary, progress)
        for name in (CLASSES_NAME, PROPERTY_NAME, IDX_NAME, REC_NAME):
            os.replace(partial[name], targets[name])
    except OSError as e:
        raise UserError(f"cannot write the pack to {out}: {e.strerror or e} ({e.filename or ''}).") from e
    finally:
        for path in partial.values():
            if path.exists():
                path.unlink()
    summary.num_images = num_images
    summary.num_classes = num_classes
    summary.image_size = image_size
    return summary
