"""MXNet RecordIO reading/writing and the packed training dataset."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from facecli.data.images import decode_image
from facecli.data.recordio import (
    IR_SIZE,
    RecordIODataset,
    RecordIOReader,
    RecordIOWriter,
    frame_record,
    is_recordio_dir,
    pack_folders,
    pack_record,
    unpack_record,
)
from facecli.errors import UserError

MAGIC_LE = b"\x0a\x23\xd7\xce"  # 0xced7230a little endian


def _face(seed: int, size: int = 32) -> Image.Image:
    """A smooth gradient plus noise: distinct per seed, compresses like a photo."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 7 + seed * 20, y * 5 + seed * 13, (x + y) * 3 + seed * 7], axis=-1) % 256
    arr = np.clip(base + rng.randint(-12, 13, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture()
def folders(tmp_path):
    """3 identities x 3 JPEGs; 'bob' also has a PNG and a corrupt .jpg; 'empty' has only junk."""
    src = tmp_path / "src"
    for c, name in enumerate(["alice", "bob", "carol"]):
        (src / name).mkdir(parents=True)
        for j in range(3):
            _face(10 * c + j).save(src / name / f"{j:02d}.jpg", quality=90)
    _face(99).save(src / "bob" / "03_extra.png")
    (src / "bob" / "04_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (src / "bob" / "notes.txt").write_text("not an image, ignored")
    (src / "zz_empty").mkdir()
    (src / "zz_empty" / "broken.png").write_bytes(b"")
    return src


@pytest.fixture()
def packed(folders, tmp_path):
    out = tmp_path / "pack"
    calls = []
    summary = pack_folders(folders, out, progress=lambda done, total: calls.append((done, total)))
    return folders, out, summary, calls


# ---------------------------------------------------------------- byte layout


def test_record_framing_byte_by_byte():
    payload = pack_record(3.0, id=7, id2=0, payload=b"JPEGDATA!")  # 24 + 9 = 33 bytes
    framed = frame_record(payload)
    assert len(framed) == 8 + 36  # padded to a multiple of 4
    assert framed[0:4] == MAGIC_LE
    assert struct.unpack("<I", framed[4:8])[0] == 33  # continuation flag 0, length 33
    body = framed[8:]
    assert struct.unpack("<I", body[0:4])[0] == 0  # flag
    assert struct.unpack("<f", body[4:8])[0] == 3.0  # label
    assert body[4:8] == b"\x00\x00\x40\x40"  # 3.0f
    assert struct.unpack("<Q", body[8:16])[0] == 7  # id
    assert struct.unpack("<Q", body[16:24])[0] == 0  # id2
    assert body[24:33] == b"JPEGDATA!"
    assert body[33:] == b"\0\0\0"
    header, rest = unpack_record(payload)
    assert (header.flag, header.label, header.id, header.id2, rest) == (0, 3.0, 7, 0, b"JPEGDATA!")


def test_vector_label_header():
    rec = pack_record((5.0, 9.0), id=12)
    assert len(rec) == IR_SIZE + 8
    assert struct.unpack("<IfQQ", rec[:24]) == (2, 0.0, 12, 0)  # scalar label zeroed as MXNet does
    assert struct.unpack("<2f", rec[24:]) == (5.0, 9.0)
    header, rest = unpack_record(rec)
    assert header.flag == 2 and rest == b""
    np.testing.assert_array_equal(header.label, np.array([5.0, 9.0], np.float32))


def test_writer_splits_at_aligned_magic_like_dmlc():
    # magic at aligned offset 8 -> two parts; the unaligned one at offset 14 stays inside.
    payload = b"AAAABBBB" + MAGIC_LE + b"CC" + MAGIC_LE + b"D"  # 19 bytes
    framed = frame_record(payload)
    expected = (
        MAGIC_LE + struct.pack("<I", (1 << 29) | 8) + b"AAAABBBB"
        + MAGIC_LE + struct.pack("<I", (3 << 29) | 7) + b"CC" + MAGIC_LE + b"D" + b"\0"
    )
    assert framed == expected
    assert frame_record(b"") == MAGIC_LE + b"\0\0\0\0"


def _write_raw(tmp_path, chunks: list[bytes], keys_offsets: list[tuple[int, int]]):
    rec = tmp_path / "raw.rec"
    idx = tmp_path / "raw.idx"
    rec.write_bytes(b"".join(chunks))
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in keys_offsets))
    return rec, idx


def test_reads_hand_built_multipart_record(tmp_path):
    def part(cflag, data):
        return MAGIC_LE + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)

    whole = part(0, b"xyz")  # 12 bytes
    multi = part(1, b"12345678") + part(2, b"") + part(2, b"abcd") + part(3, b"tail!")
    rec, idx = _write_raw(tmp_path, [whole, multi], [(0, 0), (5, len(whole))])
    reader = RecordIOReader(rec, idx)
    assert reader.read(0) == b"xyz"
    # parts joined with the magic word the writer removed between them
    assert reader.read(5) == b"12345678" + MAGIC_LE + MAGIC_LE + b"abcd" + MAGIC_LE + b"tail!"
    assert len(reader) == 2 and 5 in reader and 3 not in reader


def test_writer_reader_roundtrip_with_magic_inside(tmp_path):
    payloads = [
        pack_record(1.0, id=0, payload=MAGIC_LE * 3 + b"end"),
        pack_record(2.0, id=1, payload=b"q" * 1001),
        pack_record((4.0, 6.0), id=2),
    ]
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
        offsets = [w.write(k, p) for k, p in enumerate(payloads)]
    assert (tmp_path / "t.idx").read_text() == "".join(f"{k}\t{o}\n" for k, o in enumerate(offsets))
    reader = RecordIOReader(tmp_path / "t.rec", tmp_path / "t.idx")
    assert [reader.read(k) for k in range(3)] == payloads
    header, rest = reader.read_header(0)  # multi-part record: header from the joined record
    assert header.label == 1.0 and rest == 3 * 4 + 3
    header, rest = reader.read_header(2)
    assert header.flag == 2 and rest == 0


def test_unsorted_idx_keys(tmp_path):
    with RecordIOWriter(tmp_path / "u.rec") as w:
        for key in (9, 2, 5):
            w.write(key, pack_record(float(key), id=key, payload=bytes([key]) * key))
    reader = RecordIOReader(tmp_path / "u.rec")
    assert reader.keys.tolist() == [9, 2, 5]  # file order kept
    assert reader.contains_all(np.array([2, 3, 5, 9, 10])).tolist() == [True, False, True, True, False]
    for key in (2, 5, 9):
        header, payload = unpack_record(reader.read(key))
        assert header.label == float(key) and payload == bytes([key]) * key
    with pytest.raises(UserError, match="no record with key 3"):
        reader.read(3)


def test_reader_is_picklable_and_reopens(tmp_path):
    with RecordIOWriter(tmp_path / "t.rec") as w:
        w.write(0, pack_record(0.0, payload=b"abc"))
    reader = RecordIOReader(tmp_path / "t.rec")
    assert reader.read(0).endswith(b"abc")
    assert reader._fd is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None
    assert clone.read(0) == reader.read(0)
    reader._pid = -1  # as if inherited through fork: must open its own descriptor
    old_fd = reader._fd
    assert reader.read(0).endswith(b"abc") and reader._pid != -1
    assert reader._fd is not None and old_fd is not None


# ---------------------------------------------------------------- errors


def test_bad_magic_reports_offset(tmp_path):
    good = frame_record(pack_record(0.0, payload=b"abcd"))
    bad = b"\x01\x02\x03\x04" + good[4:]
    rec, idx = _write_raw(tmp_path, [good, bad], [(0, 0), (1, len(good))])
    reader = RecordIOReader(rec, idx)
    with pytest.raises(UserError, match=rf"bad RecordIO magic 0x04030201 at offset {len(good)}"):
        reader.read(1)


def test_missing_files_and_bad_idx(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(0.0, payload=b"abcd"))
    (tmp_path / "train.idx").unlink()
    with pytest.raises(UserError, match="train.idx not found"):
        RecordIODataset(tmp_path)
    with pytest.raises(UserError, match="index file not found"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    size = (tmp_path / "train.rec").stat().st_size
    (tmp_path / "train.idx").write_text(f"0\t0\n1\t{size}\n")
    with pytest.raises(UserError, match=rf"key 1 points to offset {size}, past the end"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    (tmp_path / "train.idx").write_text("0\t0\nfoo bar baz\n")
    with pytest.raises(UserError, match="line 2 is not"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    (tmp_path / "train.idx").write_text("0\t0\n0\t0\n")
    with pytest.raises(UserError, match="more than once"):
        RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")


def test_truncated_record(tmp_path):
    framed = frame_record(pack_record(0.0, payload=b"x" * 100))
    rec, idx = _write_raw(tmp_path, [framed[:60]], [(0, 0)])
    reader = RecordIOReader(rec, idx)
    with pytest.raises(UserError, match="truncated record at offset 0: 124 bytes announced, 52 left"):
        reader.read(0)
    with pytest.raises(UserError, match="truncated record"):
        reader.read_header(0)


# ---------------------------------------------------------------- packing + dataset


def test_pack_layout_matches_insightface(packed):
    src, out, summary, calls = packed
    assert is_recordio_dir(out) and not is_recordio_dir(src)
    assert (summary.num_images, summary.num_classes, summary.skipped, summary.reencoded) == (10, 3, 2, 1)
    assert summary.empty_identities == ["zz_empty"]
    assert any("04_corrupt.jpg" in s for s in summary.skipped_files)
    assert calls[-1] == (12, 12) and len(calls) == 12
    assert (out / "property").read_text().strip() == "3,32,32"
    assert (out / "classes.txt").read_text() == "alice\nbob\ncarol\n"
    assert not list(out.glob("*.partial"))

    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    assert reader.keys.tolist() == list(range(14))  # header, 10 images, 3 identities
    assert reader.offsets[0] == 0
    header0, rest = unpack_record(reader.read(0))
    assert header0.flag == 2 and rest == b"" and (header0.id, header0.id2) == (0, 0)
    assert header0.label.tolist() == [11.0, 14.0]
    ranges = [unpack_record(reader.read(k))[0] for k in (11, 12, 13)]
    assert [r.label.tolist() for r in ranges] == [[1.0, 4.0], [4.0, 8.0], [8.0, 11.0]]
    assert [r.flag for r in ranges] == [2, 2, 2]
    for key in range(1, 11):
        h, payload = unpack_record(reader.read(key))
        assert (h.flag, h.id, h.id2) == (0, key, 0)
        assert payload[:2] == b"\xff\xd8"  # every stored image is a JPEG
    # original JPEG bytes are stored unchanged
    assert unpack_record(reader.read(1))[1] == (src / "alice" / "00.jpg").read_bytes()
    assert unpack_record(reader.read(7))[1] != (src / "bob" / "03_extra.png").read_bytes()


def test_dataset_reads_back_pack(packed):
    src, out, _, _ = packed
    ds = RecordIODataset(out, image_size=24)
    assert len(ds) == 10
    assert ds.classes == ["alice", "bob", "carol"]
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert ds.preprocess.image_size == 24 and ds.preprocess.crop_fraction is None
    assert "10 images, 3 identities" in ds.describe() and "identity ranges" in ds.describe()
    sources = [src / n / f"{j:02d}.jpg" for n in ("alice", "bob", "carol") for j in range(3)]
    sources.insert(6, src / "bob" / "03_extra.png")
    for i, path in enumerate(sources):
        image, label, bad = ds[i]
        assert bad is None and label == ds.labels[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        expected = decode_image(path, 24)
        if path.suffix == ".jpg":
            assert torch.equal(image, expected)
        else:  # re-encoded at quality 95: close to the PNG, not identical
            diff = (image.float() - expected.float()).abs().mean().item()
            assert 0 < diff < 4


def test_classes_fall_back_to_indices(packed):
    _, out, _, _ = packed
    (out / "classes.txt").unlink()
    assert RecordIODataset(out).classes == ["0", "1", "2"]
    (out / "classes.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="lists 2 names but .* holds 3 identities"):
        RecordIODataset(out)


def test_identities_restriction(packed):
    _, out, _, _ = packed
    ds = RecordIODataset(out, identities=["carol", "alice"])
    assert ds.classes == ["carol", "alice"]
    assert len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]  # labels in the given order, samples in label order (like folders)
    assert ds.record_keys.tolist() == [8, 9, 10, 1, 2, 3]
    assert ds[0][1] == 0 and ds[5][1] == 1
    with pytest.raises(UserError, match="not in this pack: dave"):
        RecordIODataset(out, identities=["alice", "dave"])
    with pytest.raises(UserError, match="more than once"):
        RecordIODataset(out, identities=["alice", "alice"])


def test_undecodable_record_is_reported_not_raised(tmp_path):
    good = io.BytesIO()
    _face(1).save(good, format="JPEG")
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(0.0, id=0, payload=good.getvalue()))
        w.write(1, pack_record(1.0, id=1, payload=b"\xff\xd8garbage"))
        w.write(2, pack_record(1.0, id=2, payload=good.getvalue()))
        w.write(3, pack_record((1.0, 2.0), id=3))  # a meta record without image: not a sample
    ds = RecordIODataset(tmp_path)  # record 0 has flag 0: every key is an image
    assert "plain" in ds.describe()
    assert ds.record_keys.tolist() == [0, 1, 2] and ds.labels.tolist() == [0, 1, 1]
    assert ds.classes == ["0", "1"]
    image, label, bad = ds[1]
    assert image is None and label == 1
    assert bad.startswith(f"{tmp_path / 'train.rec'}[key 1]: ")
    assert ds[2][2] is None


def test_labels_read_from_records_when_identity_order_disagrees(tmp_path):
    jpeg = io.BytesIO()
    _face(3).save(jpeg, format="JPEG")
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record((4.0, 6.0)))
        w.write(1, pack_record(1.0, id=1, payload=jpeg.getvalue()))
        w.write(2, pack_record(1.0, id=2, payload=jpeg.getvalue()))
        w.write(3, pack_record(0.0, id=3, payload=jpeg.getvalue()))
        w.write(4, pack_record((1.0, 3.0), id=4))  # identity 0 claims keys 1..2, but they carry label 1
        w.write(5, pack_record((3.0, 4.0), id=5))
    ds = RecordIODataset(tmp_path)
    assert "labels read from image records" in ds.describe()
    assert ds.record_keys.tolist() == [1, 2, 3] and ds.labels.tolist() == [1, 1, 0]


def _worker_init(_):
    torch.set_num_threads(1)


def _keep_all(batch):
    return batch


def test_dataloader_with_two_workers(packed):
    _, out, _, _ = packed
    ds = RecordIODataset(out, image_size=16)
    ds[0]  # open the descriptor in the parent first: workers must not share it
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=2, collate_fn=_keep_all, worker_init_fn=_worker_init
    )
    seen = [(int(image.sum()), label) for batch in loader for image, label, bad in batch if bad is None]
    expected = [(int(ds[i][0].sum()), int(ds.labels[i])) for i in range(len(ds))]
    assert seen == expected
