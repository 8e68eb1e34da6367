"""Tests for facecli.align: similarity estimation, warping, landmarks files, folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from facecli.align import (
    ARCFACE_TEMPLATE,
    AlignSummary,
    align_face,
    align_folder,
    estimate_similarity,
    read_landmarks,
)
from facecli.errors import ImageError, UserError

PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]],
    dtype=np.float64,
)


def similarity(angle_deg: float, scale: float, translation) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([scale * rot, np.asarray(translation, dtype=np.float64)[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def linear_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent closed form: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty)."""
    n = len(src)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def blob_image(width: int, height: int, points: np.ndarray, sigma: float) -> Image.Image:
    """Black image with one Gaussian dot per landmark, each in its own colour, centred exactly
    at the (pixel-centre = integer) coordinates given."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for (px, py), colour in zip(points, PALETTE):
        img += np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma**2))[..., None] * colour
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def find_dots(img: Image.Image) -> np.ndarray:
    """Brightness-weighted centroid of each palette colour, in pixel-centre coordinates."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    bright = arr.max(axis=2)
    unit = PALETTE / np.linalg.norm(PALETTE, axis=1, keepdims=True)
    label = (arr @ unit.T).argmax(axis=2)
    weight = np.where(bright > 20, bright, 0.0)[..., None] * (label[..., None] == np.arange(5))
    yy, xx = np.mgrid[0 : arr.shape[0], 0 : arr.shape[1]].astype(np.float64)
    total = weight.sum(axis=(0, 1))
    assert (total > 0).all(), "a dot is missing from the aligned image"
    return np.column_stack(
        [(weight * xx[..., None]).sum(axis=(0, 1)) / total, (weight * yy[..., None]).sum(axis=(0, 1)) / total]
    )


# ------------------------------------------------------------------- estimate_similarity


def test_template_values():
    assert ARCFACE_TEMPLATE.shape == (5, 2) and ARCFACE_TEMPLATE.dtype == np.float64
    np.testing.assert_array_equal(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_array_equal(ARCFACE_TEMPLATE[4], [70.7299, 92.2041])


def test_two_points_hand_computed():
    # (0,0)->(1,1), (1,0)->(1,3): scale 2, rotation +90 deg, translation (1,1).
    m = estimate_similarity(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(m, [[0.0, -2.0, 1.0], [2.0, 0.0, 1.0]], atol=1e-12)


def test_recovers_known_similarity_exactly():
    truth = similarity(20.0, 1.7, (12.5, -7.25))
    m = estimate_similarity(ARCFACE_TEMPLATE, apply(truth, ARCFACE_TEMPLATE))
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, truth, atol=1e-10)


def test_noisy_points_give_least_squares_answer():
    rng = np.random.default_rng(3)
    truth = similarity(-35.0, 0.6, (40.0, 9.0))
    dst = apply(truth, ARCFACE_TEMPLATE) + rng.normal(0.0, 1.5, size=(5, 2))
    m = estimate_similarity(ARCFACE_TEMPLATE, dst)
    np.testing.assert_allclose(m, linear_lstsq(ARCFACE_TEMPLATE, dst), atol=1e-9)
    # Brute force: no nearby similarity fits better.
    best = ((apply(m, ARCFACE_TEMPLATE) - dst) ** 2).sum()
    for angle, scale, shift in rng.normal(0, [0.5, 0.01, 0.2], size=(200, 3)):
        a0 = math.degrees(math.atan2(m[1, 0], m[0, 0]))
        s0 = math.hypot(m[0, 0], m[1, 0])
        other = similarity(a0 + angle, s0 * (1 + scale), m[:, 2] + shift)
        assert ((apply(other, ARCFACE_TEMPLATE) - dst) ** 2).sum() >= best - 1e-9
    assert not np.allclose(m, truth, atol=1e-3)  # the noise did change the answer


def test_mirrored_points_give_proper_rotation():
    src = ARCFACE_TEMPLATE
    dst = src * np.array([-1.0, 1.0]) + np.array([200.0, 0.0])  # left-right mirror
    m = estimate_similarity(src, dst)
    linear = m[:, :2]
    assert np.linalg.det(linear) > 0
    np.testing.assert_allclose(linear[0, 0], linear[1, 1], atol=1e-12)
    np.testing.assert_allclose(linear[0, 1], -linear[1, 0], atol=1e-12)
    np.testing.assert_allclose(m, linear_lstsq(src, dst), atol=1e-9)


@pytest.mark.parametrize(
    "src, dst",
    [
        (np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])),  # one point
        (np.full((5, 2), 7.0), ARCFACE_TEMPLATE),  # all src equal
        (ARCFACE_TEMPLATE, np.full((5, 2), 7.0)),  # all dst equal
        (np.vstack([ARCFACE_TEMPLATE[:4], [[np.nan, 1.0]]]), ARCFACE_TEMPLATE),
        (ARCFACE_TEMPLATE, np.vstack([ARCFACE_TEMPLATE[:4], [[np.inf, 1.0]]])),
        (ARCFACE_TEMPLATE, ARCFACE_TEMPLATE[:4]),  # shape mismatch
        (ARCFACE_TEMPLATE.reshape(-1), ARCFACE_TEMPLATE.reshape(-1)),  # not (N, 2)
    ],
)
def test_degenerate_input_raises(src, dst):
    with pytest.raises(ValueError):
        estimate_similarity(src, dst)


def test_collinear_points_are_fine():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    truth = similarity(90.0, 3.0, (5.0, 5.0))
    np.testing.assert_allclose(estimate_similarity(src, apply(truth, src)), truth, atol=1e-10)


# --------------------------------------------------------------------------- align_face


@pytest.mark.parametrize(
    "angle, scale, shift, size, sigma",
    [
        (15.0, 2.3, (60.0, 35.0), 112, 4.0),  # large face: downsampling
        (-30.0, 0.8, (90.0, 120.0), 224, 3.0),  # small face, bigger output: upsampling
    ],
)
def test_align_face_puts_dots_on_template(angle, scale, shift, size, sigma):
    truth = similarity(angle, scale, shift)
    landmarks = apply(truth, ARCFACE_TEMPLATE)
    image = blob_image(320, 300, landmarks, sigma)
    np.testing.assert_allclose(find_dots(image), landmarks, atol=0.05)  # the detector itself is exact

    out = align_face(image, landmarks, size=size)
    assert out.size == (size, size) and out.mode == "RGB"
    err = np.linalg.norm(find_dots(out) - ARCFACE_TEMPLATE * size / 112, axis=1)
    assert err.max() < 0.2, err  # a half-pixel convention slip would show as ~0.3-0.7 px


def test_align_face_integer_shift_is_an_exact_crop_with_black_outside():
    # Landmarks = template + (dx, dy): the warp is a pure translation, so bilinear sampling
    # must reproduce the pixels exactly (this pins the pixel-centre convention).
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(150, 140, 3), dtype=np.uint8)
    out = np.asarray(align_face(Image.fromarray(arr), ARCFACE_TEMPLATE + [17.0, 9.0]))
    np.testing.assert_array_equal(out, arr[9 : 9 + 112, 17 : 17 + 112])

    out = np.asarray(align_face(Image.fromarray(arr), ARCFACE_TEMPLATE + [-10.0, 0.0]))
    assert (out[:, :10] == 0).all()
    np.testing.assert_array_equal(out[:, 10:], arr[:112, :102])


def test_align_face_rounds_instead_of_truncating():
    # Bilinear weights sum to 1 only up to rounding: a flat grey must stay exactly grey
    # (PIL's own affine bilinear truncates and would give 199 here).
    image = Image.new("RGB", (400, 400), (200, 100, 50))
    truth = similarity(33.0, 2.7, (150.0, 40.0))  # template (output) coords -> photo coords
    out = np.asarray(align_face(image, apply(truth, ARCFACE_TEMPLATE)))
    ys, xs = np.mgrid[0:112, 0:112]
    source = apply(truth, np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)).reshape(112, 112, 2)
    inside = ((source > 1e-6) & (source < 399 - 1e-6)).all(axis=2)  # all 4 taps in the photo
    assert inside.mean() > 0.3 and (out == 0).all(axis=2).any()  # the corner leaves the photo
    np.testing.assert_array_equal(out[inside], np.tile([200, 100, 50], (int(inside.sum()), 1)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_align_face_any_mode_gives_rgb(mode):
    image = Image.new("RGB", (130, 130), (200, 200, 200)).convert(mode)
    out = align_face(image, ARCFACE_TEMPLATE + 5.0)
    assert out.mode == "RGB" and out.size == (112, 112)


def test_align_face_accepts_flat_landmarks_and_rejects_wrong_count():
    image = Image.new("RGB", (120, 120))
    assert align_face(image, ARCFACE_TEMPLATE.reshape(-1)).size == (112, 112)
    with pytest.raises(ValueError):
        align_face(image, ARCFACE_TEMPLATE[:4])
    with pytest.raises(ValueError):
        align_face(image, ARCFACE_TEMPLATE, size=0)


# ----------------------------------------------------------------------- read_landmarks

ROW = "38.3,51.7,73.5,51.5,56.0,71.7,41.5,92.4,70.7,92.2"
POINTS = np.array([38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2]).reshape(5, 2)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_header(tmp_path):
    header = "path," + ",".join(f"{c}{i}" for i in range(1, 6) for c in "xy")
    path = write(tmp_path, "lm.csv", f"{header}\na/1.jpg,{ROW}\n\nb/2.png,{ROW}\n")
    out = read_landmarks(path)
    assert sorted(out) == ["a/1.jpg", "b/2.png"]
    np.testing.assert_array_equal(out["a/1.jpg"], POINTS)
    assert out["a/1.jpg"].shape == (5, 2) and out["a/1.jpg"].dtype == np.float64


def test_csv_without_header_and_path_normalisation(tmp_path):
    text = (
        "\ufeff"  # BOM from spreadsheet exports
        f"a\\1.jpg,{ROW}\n"  # Windows separators
        f"./b/./2.jpg, {ROW.replace(',', ', ')},\n"  # spaces, trailing comma
        f'"c/with, comma.jpg",{ROW}\n'
        f"d/x/../3.jpg,{ROW}\n"  # '..' that stays inside is fine
    )
    out = read_landmarks(write(tmp_path, "lm.txt", text))
    assert sorted(out) == ["a/1.jpg", "b/2.jpg", "c/with, comma.jpg", "d/3.jpg"]
    for points in out.values():
        np.testing.assert_array_equal(points, POINTS)


def test_json_variants(tmp_path):
    pairs = POINTS.tolist()
    flat = POINTS.reshape(-1).tolist()
    as_dict = read_landmarks(write(tmp_path, "a.json", json.dumps({"a/1.jpg": pairs, "b\\2.jpg": flat})))
    assert sorted(as_dict) == ["a/1.jpg", "b/2.jpg"]
    as_list = read_landmarks(
        write(tmp_path, "b.json", json.dumps([{"path": "a/1.jpg", "landmarks": flat}, {"path": "c.jpg", "landmarks": pairs}]))
    )
    assert sorted(as_list) == ["a/1.jpg", "c.jpg"]
    # JSON content is recognised without the suffix too.
    sniffed = read_landmarks(write(tmp_path, "lm.txt", json.dumps({"x.jpg": pairs})))
    for points in [*as_dict.values(), *as_list.values(), *sniffed.values()]:
        np.testing.assert_array_equal(points, POINTS)


@pytest.mark.parametrize(
    "text, where, words",
    [
        (f"a.jpg,{ROW}\nb.jpg,1,2,3\n", "line 2", "got 3"),
        (f"a.jpg,{ROW}\nb.jpg,{ROW},5,6\n", "line 2", "got 12"),
        (f"a.jpg,{ROW}\n\nb.jpg,{ROW.replace('56.0', 'abc')}\n", "line 3", "'abc'"),
        (f"a.jpg,{ROW.replace('56.0', 'nan')}\n", "line 1", "finite"),
        (f"/etc/a.jpg,{ROW}\n", "line 1", "absolute"),
        (f"C:\\photos\\a.jpg,{ROW}\n", "line 1", "absolute"),
        (f"ok.jpg,{ROW}\n../a.jpg,{ROW}\n", "line 2", "leaves the source folder"),
        (f"x/../../a.jpg,{ROW}\n", "line 1", "leaves the source folder"),
        (f"a.jpg,{ROW}\n./a.jpg,{ROW}\n", "line 2", "line 1"),  # duplicate names the first line
        (f",{ROW}\n", "line 1", "empty image path"),
        ("a.jpg\n", "line 1", "got 0"),
        ("a.jpg," + ",".join(["3"] * 10) + "\n", "line 1", "same point"),
        ("path,x1,y1\n", "line 1", "got 2"),  # header of the wrong width is not silently skipped
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, text, where, words):
    path = write(tmp_path, "lm.csv", text)
    with pytest.raises(UserError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert str(path) in message and where in message and words in message, message


@pytest.mark.parametrize(
    "data, where, words",
    [
        ({"a.jpg": POINTS.tolist()[:4]}, "'a.jpg'", "got 4"),
        ({"a.jpg": POINTS.reshape(-1).tolist()[:8]}, "'a.jpg'", "got 8"),
        ({"a.jpg": [[1, 2]] * 4 + [[1, 2, 3]]}, "'a.jpg'", "pair 5 has 3 values"),
        ({"a.jpg": "38,51"}, "'a.jpg'", "list"),
        ({"a.jpg": [True] * 10}, "'a.jpg'", "not a number"),
        ({"a.jpg": ["x"] * 10}, "'a.jpg'", "not a number"),
        ({"../a.jpg": POINTS.tolist()}, "'../a.jpg'", "leaves the source folder"),
        ({"/a.jpg": POINTS.tolist()}, "'/a.jpg'", "absolute"),
        ([{"path": "a.jpg", "landmarks": POINTS.tolist()}, {"path": "b.jpg"}], "entry 1", "landmarks"),
        ([{"path": "a.jpg", "landmarks": POINTS.tolist()}, {"path": "a.jpg", "landmarks": POINTS.tolist()}], "entry 1", "entry 0"),
        ([{"path": 3, "landmarks": POINTS.tolist()}], "entry 0", "string"),
        ([{"path": "../../x.jpg", "landmarks": POINTS.tolist()}], "entry 0", "leaves the source folder"),
        (42, "", "expected a JSON object"),
    ],
)
def test_json_errors_name_file_and_entry(tmp_path, data, where, words):
    path = write(tmp_path, "lm.json", json.dumps(data))
    with pytest.raises(UserError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert str(path) in message and where in message and words in message, message


def test_json_syntax_error_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "lm.json", '{\n  "a.jpg": [1, 2,\n  }')
    with pytest.raises(UserError, match=r"line 3: invalid JSON"):
        read_landmarks(path)
    row = json.dumps(POINTS.tolist())
    path = write(tmp_path, "dup.json", f'{{"a.jpg": {row}, "a.jpg": {row}}}')
    with pytest.raises(UserError, match=r"dup\.json.*duplicate key 'a\.jpg'"):
        read_landmarks(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_landmarks(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="no landmarks entries"):
        read_landmarks(write(tmp_path, "empty.csv", "\n\n"))
    with pytest.raises(UserError, match="no landmarks entries"):
        read_landmarks(write(tmp_path, "empty.json", "{}"))
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x80garbage")
    with pytest.raises(UserError, match="UTF-8"):
        read_landmarks(binary)
    with pytest.raises(UserError, match="folder"):
        read_landmarks(tmp_path)


# ------------------------------------------------------------------------- align_folder


def face_photo(angle: float, scale: float, shift) -> tuple[Image.Image, np.ndarray]:
    landmarks = apply(similarity(angle, scale, shift), ARCFACE_TEMPLATE)
    assert (landmarks > 10).all() and (landmarks < [250, 230]).all(), "test photo must hold every dot"
    return blob_image(260, 240, landmarks, 3.5), landmarks


def landmarks_csv(path, entries: dict) -> None:
    lines = ["path," + ",".join(f"{c}{i}" for i in range(1, 6) for c in "xy")]
    lines += [f"{k}," + ",".join(f"{v:.4f}" for v in np.asarray(pts).reshape(-1)) for k, pts in entries.items()]
    path.write_text("\n".join(lines) + "\n")


def test_align_folder_end_to_end(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    (src / "alice").mkdir(parents=True)
    (src / "bob").mkdir()
    one, lm_one = face_photo(10.0, 1.8, (40.0, 20.0))
    one.save(src / "alice" / "1.jpg", quality=98)
    two, lm_two = face_photo(-20.0, 1.4, (80.0, 60.0))
    # Stored sideways with an EXIF orientation: landmarks are in the displayed frame.
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 deg clockwise
    two.transpose(Image.Transpose.ROTATE_90).save(src / "bob" / "2.png", exif=exif)
    one.save(src / "bob" / "no_entry.jpg")
    (src / "alice" / "broken.jpg").write_bytes(b"not a jpeg at all")
    lm_file = tmp_path / "lm.csv"
    landmarks_csv(
        lm_file,
        {"alice/1.jpg": lm_one, "bob/2.png": lm_two, "alice/broken.jpg": lm_one, "alice/ghost.jpg": lm_one},
    )

    ticks = []
    summary = align_folder(src, dst, lm_file, progress=ticks.append)
    assert isinstance(summary, AlignSummary)
    assert ticks == [1, 1, 1, 1]
    assert sorted(p.relative_to(dst).as_posix() for p in summary.written) == ["alice/1.jpg", "bob/2.png"]
    assert summary.skipped == ["bob/no_entry.jpg"]
    assert summary.missing == ["alice/ghost.jpg"]
    assert [rel for rel, _ in summary.unreadable] == ["alice/broken.jpg"]
    assert "broken.jpg" in summary.unreadable[0][1]
    assert summary.describe() == "aligned 2 image(s), 1 without landmarks skipped, 1 listed but not found, 1 unreadable."
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == ["alice/1.jpg", "bob/2.png"]

    with Image.open(dst / "alice" / "1.jpg") as img:
        assert img.format == "JPEG" and img.size == (112, 112)
        err = np.linalg.norm(find_dots(img) - ARCFACE_TEMPLATE, axis=1)
    assert err.max() < 1.0, err  # JPEG ringing shifts centroids slightly
    with Image.open(dst / "bob" / "2.png") as img:
        assert img.format == "PNG" and img.size == (112, 112)
        err = np.linalg.norm(find_dots(img) - ARCFACE_TEMPLATE, axis=1)
    assert err.max() < 0.25, err

    # A different output size scales the template.
    summary = align_folder(src, tmp_path / "big", lm_file, size=224)
    with Image.open(tmp_path / "big" / "bob" / "2.png") as img:
        assert img.size == (224, 224)
        err = np.linalg.norm(find_dots(img) - ARCFACE_TEMPLATE * 2, axis=1)
    assert err.max() < 0.25, err


def test_align_folder_refuses_paths_leaving_source(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    src.mkdir()
    photo, lm = face_photo(0.0, 1.5, (50.0, 30.0))
    photo.save(src / "ok.png")
    photo.save(tmp_path / "outside.png")
    lm_file = tmp_path / "lm.csv"
    landmarks_csv(lm_file, {"ok.png": lm, "../outside.png": lm})
    with pytest.raises(UserError, match=r"lm\.csv, line 3: path '\.\./outside\.png' leaves the source folder"):
        align_folder(src, dst, lm_file)
    assert not dst.exists()  # refused before anything was written


def test_align_folder_refuses_overwriting_sources(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    photo, lm = face_photo(0.0, 1.5, (50.0, 30.0))
    photo.save(src / "a.png")
    lm_file = tmp_path / "lm.csv"
    landmarks_csv(lm_file, {"a.png": lm})
    with pytest.raises(UserError, match="source folder"):
        align_folder(src, src, lm_file)
    with pytest.raises(UserError, match="source folder"):
        align_folder(src, src / "out", lm_file)
    with pytest.raises(UserError, match="positive integer"):
        align_folder(src, tmp_path / "out", lm_file, size=0)
    with pytest.raises(UserError, match="not found"):
        align_folder(tmp_path / "nothing", tmp_path / "out", lm_file)
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]


def test_align_single_image(tmp_path):
    photo, lm = face_photo(25.0, 1.6, (80.0, 20.0))
    image = tmp_path / "me.png"
    photo.save(image)
    lm_file = tmp_path / "lm.json"
    lm_file.write_text(json.dumps({"me.png": lm.tolist()}))

    summary = align_folder(image, tmp_path / "out.jpg", lm_file)
    assert summary.written == [tmp_path / "out.jpg"]
    with Image.open(tmp_path / "out.jpg") as img:
        assert img.format == "JPEG" and img.size == (112, 112)

    summary = align_folder(image, tmp_path / "outdir", lm_file)
    assert summary.written == [tmp_path / "outdir" / "me.png"]
    with Image.open(summary.written[0]) as img:
        err = np.linalg.norm(find_dots(img) - ARCFACE_TEMPLATE, axis=1)
    assert err.max() < 0.25, err

    # A folder-wide landmarks file works when exactly one entry ends in the name.
    landmarks_csv(lm_file.with_suffix(".csv"), {"someone/me.png": lm, "someone/other.png": lm})
    assert align_folder(image, tmp_path / "o2.png", lm_file.with_suffix(".csv")).written == [tmp_path / "o2.png"]

    landmarks_csv(lm_file.with_suffix(".csv"), {"other.png": lm})
    with pytest.raises(UserError, match="no entry for 'me.png'"):
        align_folder(image, tmp_path / "o3.png", lm_file.with_suffix(".csv"))

    broken = tmp_path / "bad.jpg"
    broken.write_bytes(b"\x00" * 10)
    lm_file.write_text(json.dumps({"bad.jpg": lm.tolist()}))
    with pytest.raises(ImageError, match="bad.jpg"):
        align_folder(broken, tmp_path / "o4.png", lm_file)
