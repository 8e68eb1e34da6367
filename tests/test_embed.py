"""`facecli embed`: output formats, recursive folders, unreadable files, flip TTA, --compare errors."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image

from facecli.engine.checkpoint import load_checkpoint


def _faces(synth_lfw_dir: Path, count: int) -> list[Path]:
    root = synth_lfw_dir / "lfw_funneled"
    return sorted(root.rglob("*.jpg"))[:count]


def _embed(checkpoint: Path, *args) -> "click.testing.Result":  # noqa: F821
    return cli("embed", checkpoint, *args, "--device", "cpu")


@pytest.fixture
def nested(synth_lfw_dir, tmp_path) -> tuple[Path, list[Path]]:
    """in/a.jpg, in/sub/b.jpg, in/sub/deeper/c.png plus a non-image file; returns (folder, images in walk order)."""
    src = _faces(synth_lfw_dir, 3)
    top = tmp_path / "in"
    (top / "sub" / "deeper").mkdir(parents=True)
    a, b, c = top / "a.jpg", top / "sub" / "b.jpg", top / "sub" / "deeper" / "c.png"
    shutil.copy(src[0], a)
    shutil.copy(src[1], b)
    with Image.open(src[2]) as im:
        im.convert("RGB").save(c)
    (top / "sub" / "notes.txt").write_text("not an image")
    return top, [a, b, c]


def test_npz_npy_csv_hold_the_same_unit_float32_rows(trained_checkpoint, nested, tmp_path):
    folder, images = nested
    dim = load_checkpoint(trained_checkpoint)["net"]["embedding_dim"]

    r = _embed(trained_checkpoint, folder, "--out", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    data = np.load(tmp_path / "e.npz")
    emb = data["embeddings"]
    assert emb.dtype == np.float32 and emb.shape == (3, dim)
    assert np.allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1.0, atol=1e-5)
    assert [Path(str(p)) for p in data["paths"]] == images  # recursive, images only, in walk order
    assert not np.allclose(emb[0], emb[1])
    assert "Wrote 3 embeddings" in r.stdout

    r = _embed(trained_checkpoint, folder, "--out", tmp_path / "e.npy")
    assert r.exit_code == 0, r.output
    npy = np.load(tmp_path / "e.npy")
    assert npy.dtype == np.float32 and np.array_equal(npy, emb)

    r = _embed(trained_checkpoint, folder, "--out", tmp_path / "e.csv")
    assert r.exit_code == 0, r.output
    with (tmp_path / "e.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "quality"] + [f"e{i}" for i in range(dim)]  # quality: the feature norm (issue 23)
    assert [Path(row[0]) for row in rows[1:]] == images
    assert np.allclose([float(row[1]) for row in rows[1:]], data["quality"], rtol=1e-6)
    assert np.allclose(np.array([[float(v) for v in row[2:]] for row in rows[1:]]), emb, rtol=0, atol=1e-7)

    r = _embed(trained_checkpoint, folder, "--out", tmp_path / "e.txt")
    assert r.exit_code == 2
    assert "Unknown output format" in r.stderr and "Traceback" not in r.output


def test_default_output_and_files_named_directly(trained_checkpoint, nested, tmp_path):
    folder, images = nested
    r = _embed(trained_checkpoint, images[2], images[0])  # working directory is tmp_path
    assert r.exit_code == 0, r.output
    data = np.load(tmp_path / "embeddings.npz")
    assert [Path(str(p)) for p in data["paths"]] == [images[2], images[0]]

    whole = np.load(_write_npz(trained_checkpoint, folder, tmp_path / "whole.npz"))
    assert np.allclose(data["embeddings"], whole["embeddings"][[2, 0]], atol=1e-6)


def _write_npz(checkpoint: Path, folder: Path, out: Path) -> Path:
    r = _embed(checkpoint, folder, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_unreadable_files_are_listed_skipped_and_exit_non_zero(trained_checkpoint, nested, tmp_path):
    folder, images = nested
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    os.symlink(tmp_path / "gone.jpg", folder / "sub" / "link.jpg")  # a broken link (links that resolve are read)
    ghost = tmp_path / "no-such-image.jpg"

    out = tmp_path / "partial.npz"
    r = _embed(trained_checkpoint, folder, ghost, "--out", out)
    assert r.exit_code == 1, r.output
    for name in ("broken.jpg", "empty.png", "link.jpg", "no-such-image.jpg"):
        assert name in r.stderr, name
    assert "Traceback" not in r.output

    data = np.load(out)
    assert [Path(str(p)) for p in data["paths"]] == images
    clean = np.load(_write_npz(trained_checkpoint, images[0], tmp_path / "a.npz"))  # rows stay aligned with paths
    assert np.allclose(data["embeddings"][0], clean["embeddings"][0], atol=1e-6)
    assert np.isfinite(data["embeddings"]).all()


def test_flip_tta_averages_the_image_and_its_mirror(trained_checkpoint, synth_lfw_dir, tmp_path):
    src = _faces(synth_lfw_dir, 1)[0]
    img, mirror = tmp_path / "face.png", tmp_path / "mirror.png"
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.save(img)
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)

    plain = np.load(_write_npz_flag(trained_checkpoint, [img, mirror], tmp_path / "plain.npz", "--no-flip"))["embeddings"]
    tta = np.load(_write_npz_flag(trained_checkpoint, [img, mirror], tmp_path / "tta.npz", "--flip"))["embeddings"]

    assert not np.allclose(plain[0], plain[1], atol=1e-4)  # the network itself is not mirror-symmetric
    assert np.allclose(tta[0], tta[1], atol=1e-5)  # f(x) + f(flip x) is
    # ... and it lies between the two single-pass directions: a positive combination of them.
    basis = plain.T.astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, tta[0].astype(np.float64), rcond=None)
    assert np.linalg.norm(basis @ coef - tta[0]) < 1e-4
    assert (coef > 0).all()


def _write_npz_flag(checkpoint: Path, files: list[Path], out: Path, flag: str) -> Path:
    r = _embed(checkpoint, *files, "--out", out, flag)
    assert r.exit_code == 0, r.output
    return out


def test_compare_needs_exactly_two_readable_images(trained_checkpoint, nested, tmp_path):
    folder, images = nested
    r = _embed(trained_checkpoint, *images, "--compare", "--no-face-check")  # synthetic faces are not faces to dlib
    assert r.exit_code == 2
    assert "exactly two" in r.stderr and "got 3" in r.stderr

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = _embed(trained_checkpoint, images[0], bad, "--compare", "--no-face-check")
    assert r.exit_code == 2
    assert "bad.jpg" in r.stderr and "got 1" in r.stderr


def test_no_images_is_a_clear_error(trained_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no faces here")
    r = _embed(trained_checkpoint, empty)
    assert r.exit_code == 2
    assert "No images found" in r.stderr and "Traceback" not in r.output


def test_embedding_halves_its_batch_when_memory_runs_out():
    """On out-of-memory the evaluator retries with half the images per pass, same result."""
    import torch

    from facecli.data.images import Preprocess
    from facecli.evaluation.embedding import embed_dataset

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8), i, None

    class SmallMemoryNet(torch.nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.sizes = limit, []
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(3 * 16 * 16, 8)

        def forward(self, x):
            if x.shape[0] > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            self.sizes.append(x.shape[0])
            return self.fc(x.flatten(1))

    roomy, tight = SmallMemoryNet(limit=10**6), SmallMemoryNet(limit=5)
    a = embed_dataset(roomy, Preprocess(16), Images(), batch_size=8, flip=True)
    b = embed_dataset(tight, Preprocess(16), Images(), batch_size=8, flip=True)
    assert max(tight.sizes) <= 5 and max(roomy.sizes) == 16
    assert a.forward_passes == b.forward_passes == 20
    assert np.allclose(a.vectors, b.vectors, atol=1e-6)
