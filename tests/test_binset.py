"""insightface .bin verification sets: layout, Python 2 pickles, refusal of code."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from facecli.data.binset import BinSet, read_bin, write_bin
from facecli.data.images import decode_image
from facecli.errors import UserError


def _jpeg(seed: int, size: int = 20) -> bytes:
    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


IMAGES = [_jpeg(i) for i in range(6)]
ISSAME = [True, False, True]


def _globals(data: bytes) -> list[str]:
    found = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
    return found


@pytest.mark.parametrize("protocol", [2, 4])
def test_roundtrip_insightface_layout(tmp_path, protocol):
    path = write_bin(tmp_path / "lfw.bin", IMAGES, ISSAME, protocol=protocol)
    raw = path.read_bytes()
    assert raw[:2] == bytes([0x80, protocol])
    # the stored object is exactly insightface's (list of bytes, list of bools)
    bins, issame = pickle.loads(raw, encoding="bytes")
    assert bins == IMAGES and issame == ISSAME
    if protocol == 2:
        assert set(_globals(raw)) == {"_codecs.encode"}  # how py3 pickles bytes at protocol 2
    s = read_bin(path)
    assert isinstance(s, BinSet)
    assert s.name == "lfw" and s.num_pairs == 3
    assert s.images == IMAGES
    assert s.issame.dtype == np.bool_ and s.issame.tolist() == ISSAME
    img = s.decode(3, image_size=16)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    assert torch.equal(img, decode_image(IMAGES[3], 16))
    assert not list(tmp_path.glob("*.partial"))


def _py2_protocol2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((bins, issame_list), f, 2) writes: str as (SHORT_)BINSTRING."""
    out = bytearray(b"\x80\x02")
    out += b"]q\x00("
    for b in images:
        if len(b) < 256:
            out += b"U" + bytes([len(b)]) + b
        else:
            out += b"T" + struct.pack("<i", len(b)) + b
    out += b"e]q\x01("
    out += b"".join(b"\x88" if v else b"\x89" for v in issame)
    out += b"e\x86q\x02."
    return bytes(out)


def _py2_protocol0_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Python 2 text protocol: S'...' string literals with escapes, I01/I00 bools."""
    def lit(b: bytes) -> bytes:
        return b"S'" + "".join(f"\\x{c:02x}" for c in b).encode("ascii") + b"'\n"

    out = b"((lp0\n" + b"".join(lit(b) + b"a" for b in images)
    out += b"(lp1\n" + b"".join((b"I01\n" if v else b"I00\n") + b"a" for v in issame)
    return out + b"tp2\n."


@pytest.mark.parametrize("maker", [_py2_protocol2_pickle, _py2_protocol0_pickle])
def test_python2_pickles_load_as_bytes(tmp_path, maker):
    data = maker(IMAGES, ISSAME)
    with pytest.raises(UnicodeDecodeError):  # why encoding="bytes" is needed
        pickle.loads(data)
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(data)
    s = read_bin(path)
    assert s.name == "agedb_30"
    assert s.images == IMAGES and s.issame.tolist() == ISSAME


def test_numpy_arrays_accepted(tmp_path):
    bins = [np.frombuffer(b, dtype=np.uint8) for b in IMAGES]
    for protocol in (2, 5):
        path = tmp_path / f"np{protocol}.bin"
        path.write_bytes(pickle.dumps((bins, np.array(ISSAME)), protocol=protocol))
        s = read_bin(path)
        assert s.images == IMAGES and s.issame.tolist() == ISSAME
    path = tmp_path / "scalars.bin"
    path.write_bytes(pickle.dumps((IMAGES, [np.bool_(v) for v in ISSAME]), protocol=2))
    assert read_bin(path).issame.tolist() == ISSAME
    path.write_bytes(pickle.dumps((IMAGES[:2] + [b""] + IMAGES[3:], ISSAME), protocol=2))  # b'' -> bytes()
    assert read_bin(path).images[2] == b""


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickles_are_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    cases = {
        "system.bin": ([_System(f"touch {marker}")], [True]),
        "eval.bin": (IMAGES[:2], [_Eval(f"open({str(marker)!r}, 'w').close()")]),
    }
    for name, obj in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(UserError) as err:
            read_bin(path)
        msg = str(err.value)
        assert str(path) in msg and "refusing" in msg
        forbidden = r"(posix|nt|os)\.system" if name == "system.bin" else r"(__builtin__|builtins)\.eval"
        assert re.search(forbidden, msg), msg
        assert not marker.exists()


def test_forbidden_globals_and_codecs_arguments(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x80\x02cnumpy\nload\nq\x00.")
    with pytest.raises(UserError, match=r"numpy\.load"):
        read_bin(path)
    # allowed callable, forbidden argument: _codecs.encode with another codec
    path.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R.")
    with pytest.raises(UserError, match="_codecs.encode with encoding 'rot_13'"):
        read_bin(path)
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.")  # bytes(10**9)
    with pytest.raises(UserError, match="builtins.bytes with arguments"):
        read_bin(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([IMAGES, ISSAME, ISSAME], "found a list of length 3"),
        ({"bins": IMAGES}, "found a dict"),
        ((IMAGES, ISSAME[:2]), "6 images for 2 pairs"),
        ((IMAGES, [1, 0, 1]), r"issame_list\[0\] is a int"),
        ((IMAGES[:5] + ["text"], ISSAME), "image 5 is a str"),
        ((IMAGES, np.array([1, 0, 1])), "array of int64"),
        (([], []), "holds no pairs"),
    ],
)
def test_wrong_structure_rejected(tmp_path, obj, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(UserError, match=message):
        read_bin(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_bin(tmp_path / "missing.bin")
    path = tmp_path / "trunc.bin"
    path.write_bytes(pickle.dumps((IMAGES, ISSAME), protocol=4)[:-40])
    with pytest.raises(UserError, match="not a readable .bin"):
        read_bin(path)
    with pytest.raises(UserError, match="2 per pair"):
        write_bin(tmp_path / "w.bin", IMAGES[:5], ISSAME)
    assert not (tmp_path / "w.bin").exists()
