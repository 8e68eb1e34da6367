"""``facecli align`` and ``facecli embed --landmarks`` end to end on generated photos.

The geometry of the warp is tested in test_align.py; here the commands are: what they
write, what they report, their exit codes, and that embedding raw photos with a landmarks
file gives the same vectors as embedding the faces ``facecli align`` wrote.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from conftest import cli
from facecli.align import ARCFACE_TEMPLATE, align_face


def _similarity(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]], [scale * math.sin(a), scale * math.cos(a), shift[1]]])


def _photo(seed: int, angle: float, scale: float, shift, size=(220, 200)) -> tuple[Image.Image, np.ndarray]:
    """A textured 'photo' with a bright dot on each of its five landmarks."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([80 + 60 * np.sin(xx / (9 + 3 * c) + seed) * np.cos(yy / (13 - 2 * c)) for c in range(3)], axis=2)
    base += rng.normal(0, 12, base.shape)
    m = _similarity(angle, scale, shift)
    points = ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
    for px, py in points:
        base += 150 * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 18.0)[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), points


def _landmarks_csv(path, entries: dict) -> None:
    lines = ["path," + ",".join(f"{c}{i}" for i in range(1, 6) for c in "xy")]
    lines += [f"{k}," + ",".join(f"{v:.6f}" for v in np.asarray(p).reshape(-1)) for k, p in entries.items()]
    path.write_text("\n".join(lines) + "\n")


def _raw_set(root):
    """Two photos: alice/1.png upright; bob/2.png stored sideways with an EXIF orientation
    (its landmarks are in the displayed frame, as a detector reports them)."""
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    one, lm_one = _photo(1, 12.0, 1.3, (30.0, 10.0))
    one.save(root / "alice" / "1.png")
    two, lm_two = _photo(2, -18.0, 1.1, (60.0, 40.0))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    two.transpose(Image.Transpose.ROTATE_90).save(root / "bob" / "2.png", exif=exif)
    return {"alice/1.png": (one, lm_one), "bob/2.png": (two, lm_two)}


def test_align_command_writes_template_faces_and_reports(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    photos = _raw_set(src)
    lm = tmp_path / "lm.csv"
    _landmarks_csv(lm, {k: p for k, (_, p) in photos.items()})

    result = cli("align", src, dst, "--landmarks", lm)
    assert result.exit_code == 0, result.output
    assert f"Aligned 2 image(s) into {dst}" in result.output
    for rel, (displayed, points) in photos.items():
        with Image.open(dst / rel) as out:
            assert out.size == (112, 112) and out.mode == "RGB"
            got = np.asarray(out)
        # exactly the library's warp of the photo as displayed (EXIF applied)
        assert np.array_equal(got, np.asarray(align_face(displayed, points, 112))), rel
        # and the landmark dots sit on the template: brightest pixel near each template point
        bright = got.astype(np.float64).sum(axis=2)
        for tx, ty in ARCFACE_TEMPLATE:
            y0, x0 = int(round(ty)), int(round(tx))
            window = bright[y0 - 4 : y0 + 5, x0 - 4 : x0 + 5]
            dy, dx = np.unravel_index(np.argmax(window), window.shape)
            assert abs(dy - 4) <= 1 and abs(dx - 4) <= 1, (rel, tx, ty)

    # --size scales the template.
    result = cli("align", src, tmp_path / "small", "--landmarks", lm, "--size", "48")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "small" / "alice" / "1.png") as out:
        assert out.size == (48, 48)


def test_align_command_warns_and_fails_on_problems(tmp_path):
    src = tmp_path / "raw"
    photos = _raw_set(src)
    (src / "alice" / "broken.png").write_bytes(b"not an image")
    lm = tmp_path / "lm.csv"
    entries = {k: p for k, (_, p) in photos.items()}
    _landmarks_csv(lm, {"alice/1.png": entries["alice/1.png"], "alice/ghost.png": entries["alice/1.png"]})
    result = cli("align", src, tmp_path / "out", "--landmarks", lm)
    assert result.exit_code == 0, result.output  # missing entries and unlisted photos are warnings
    assert "Aligned 1 image(s)" in result.output
    assert "had no landmarks and were skipped" in result.output and "name no file" in result.output

    _landmarks_csv(lm, {"alice/1.png": entries["alice/1.png"], "alice/broken.png": entries["alice/1.png"]})
    result = cli("align", src, tmp_path / "out2", "--landmarks", lm)
    assert result.exit_code == 1, result.output  # an unreadable photo is a failure
    assert "could not be read" in result.output and "broken.png" in result.output
    assert (tmp_path / "out2" / "alice" / "1.png").is_file()  # the good one is still written

    result = cli("align", src, tmp_path / "out3", "--landmarks", tmp_path / "nope.csv")
    assert result.exit_code == 2
    assert "error:" in result.output and "landmarks file not found" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out3").exists()

    result = cli("align", src, src / "inside", "--landmarks", lm)
    assert result.exit_code == 2 and "source folder" in result.output


def test_embed_with_landmarks_matches_embedding_aligned_faces(trained_checkpoint, tmp_path):
    src = tmp_path / "raw"
    photos = _raw_set(src)
    lm = tmp_path / "lm.csv"
    _landmarks_csv(lm, {k: p for k, (_, p) in photos.items()})
    # The checkpoint's input size is 32: align straight to it so no resize happens later.
    assert cli("align", src, tmp_path / "aligned", "--landmarks", lm, "--size", "32").exit_code == 0

    def embed(*args, count=2):
        out = tmp_path / f"e{len(list(tmp_path.glob('e*.npz')))}.npz"
        result = cli("embed", trained_checkpoint, *args, "--out", out)
        assert result.exit_code == 0, result.output
        assert f"Wrote {count} embeddings (512-d)" in result.output
        data = np.load(out)
        return data["embeddings"], [p.split("/")[-2] for p in data["paths"]]

    aligned, names_a = embed(tmp_path / "aligned")
    raw_lm, names_b = embed(src, "--landmarks", lm)
    raw, _ = embed(src)
    assert names_a == names_b == ["alice", "bob"]
    np.testing.assert_allclose(np.linalg.norm(raw_lm, axis=1), 1.0, atol=1e-5)
    # The tiny test model maps every face to nearby vectors, so "same" must be tight:
    # identical pixels give identical vectors; any other input moves them by > 1e-4.
    np.testing.assert_allclose(raw_lm, aligned, rtol=0, atol=1e-6)
    assert np.abs(raw - aligned).max(axis=1).min() > 1e-4  # without landmarks the input differs

    # A single image works too; its entry is found by file name.
    one, _ = embed(src / "bob" / "2.png", "--landmarks", lm, count=1)
    np.testing.assert_allclose(one, aligned[1:2], rtol=0, atol=1e-6)

    # Without an entry for an image, it is reported and the command says so by its exit code.
    _landmarks_csv(lm, {"alice/1.png": photos["alice/1.png"][1]})
    result = cli("embed", trained_checkpoint, src, "--landmarks", lm, "--out", tmp_path / "partial.npz")
    assert result.exit_code == 1, result.output
    assert "no landmarks for 'bob/2.png'" in result.output
    assert np.load(tmp_path / "partial.npz")["embeddings"].shape == (1, 512)
