"""Bad input: one clear error line (what, where, what to do), a non-zero exit, no traceback.

Covers the dataset root and its identity folders, unreadable images (skipped and counted)
and unusual image modes (converted), LFW pairs files, checkpoints that are not usable
facecli checkpoints, out-of-range flags, and a ``.env`` with mistakes (warned, not fatal).
Everything goes through the CLI in-process, as a user would meet it.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_ARGS, cli

TRAIN = ["train", "arcface", *TINY_TRAIN_ARGS, "--no-eval"]


def user_error(result, *fragments: str, code: int = 2) -> str:
    """Assert one facecli error line holding every fragment, exit ``code``, no traceback; return the line."""
    out = result.output
    assert result.exit_code == code, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _copy_identity(src: Path, dst: Path, n: int | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir())[:n]:
        shutil.copy(f, dst / f.name)


# --------------------------------------------------------------------------- dataset root


def _layout(kind: str, tmp_path: Path, synth_train_dir: Path) -> list[str]:
    """Build a broken dataset of one kind; return the flags that point train at it."""
    ids = sorted(p for p in synth_train_dir.iterdir() if p.is_dir())
    if kind == "root missing":
        return ["--dataset-path", str(tmp_path / "no-such-dir")]
    if kind == "root empty":
        (tmp_path / "empty").mkdir()
        return ["--dataset-path", str(tmp_path / "empty")]
    root = tmp_path / "data" / "CASIA-webface"
    root.mkdir(parents=True)
    if kind == "no identity folders":
        (root / "README.txt").write_text("images went elsewhere\n")
    elif kind == "identity without images":
        _copy_identity(ids[0], root / "alice")
        (root / "bob").mkdir()
        (root / "bob" / "notes.txt").write_text("not an image\n")
    elif kind == "one identity":
        _copy_identity(ids[0], root / "alice")
    return ["--dataset-path", str(tmp_path / "data")]


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("root missing", ["no-such-dir", "does not exist", "--dataset-path", "--train-dir"]),
        ("root empty", ["No training set under", "empty", "CASIA-webface", "Pass --train-dir"]),
        ("no identity folders", ["has no identity folders", "CASIA-webface", "one sub-folder of images per identity"]),
        ("identity without images", ["bob", "holds no usable images", "Remove the folder or add its images"]),
        ("one identity", ["has 1 identity", "at least 2", "Add more identity folders"]),
    ],
)
def test_dataset_problems(kind, fragments, tmp_path, synth_train_dir):
    flags = _layout(kind, tmp_path, synth_train_dir)
    user_error(cli(*TRAIN, *flags, "--checkpoints-dir", tmp_path / "ck"), *fragments)
    assert not (tmp_path / "ck").exists()  # nothing was started


def test_dataset_path_from_environment_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET_PATH", str(tmp_path / "gone"))
    user_error(cli(*TRAIN), "DATASET_PATH", "gone", "does not exist", "Fix DATASET_PATH or pass --dataset-path")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = cli("--debug", *TRAIN, "--dataset-path", tmp_path / "no-such-dir")
    assert result.exit_code == 2
    assert "Traceback" in result.output and "UserError" in result.output
    assert "error: Dataset path" in result.output


# --------------------------------------------------------------------------- images


def _two_colour_rgb(size: int = 40) -> np.ndarray:
    """Left half one colour, right half another: easy to check after any conversion."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2] = (200, 40, 40)
    a[:, size // 2 :] = (30, 160, 220)
    return a


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mode_images() -> dict[str, bytes]:
    """One image per awkward mode: grayscale, CMYK JPEG, 16-bit grayscale, palette with alpha."""
    rgb = Image.fromarray(_two_colour_rgb())
    gray = rgb.convert("L")
    g16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # the same picture, 16 bits deep
    assert g16.mode.startswith("I;16")
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)  # index 0 green (transparent), 1 red
    pal.paste(1, (20, 0, 40, 40))
    return {
        "gray.png": _encode(gray, "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _encode(g16, "PNG"),
        "palette_alpha.png": _encode(pal, "PNG", transparency=0),
    }


def test_unusual_modes_are_converted_to_rgb():
    from facecli.data.images import decode_image

    images = _mode_images()
    with Image.open(io.BytesIO(images["cmyk.jpg"])) as im:
        assert im.mode == "CMYK"
    with Image.open(io.BytesIO(images["palette_alpha.png"])) as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(io.BytesIO(images["gray16.png"])) as im:
        assert im.mode.startswith("I;16")
    out = {name: decode_image(data, 40, 1.0).permute(1, 2, 0).numpy().astype(int) for name, data in images.items()}
    for name, arr in out.items():
        assert arr.shape == (40, 40, 3), name
    gray = out["gray.png"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # 16 bits scaled down, not clipped to white nor wrapped around
    assert np.abs(out["gray16.png"] - gray).max() <= 1
    # CMYK: the colours come back (PIL's Adobe-inverted CMYK JPEGs read correctly)
    assert np.abs(out["cmyk.jpg"][:, 2:18] - (200, 40, 40)).max() <= 8
    assert np.abs(out["cmyk.jpg"][:, 22:38] - (30, 160, 220)).max() <= 8
    # palette with alpha: transparent pixels on black, opaque ones keep their colour
    assert (out["palette_alpha.png"][:, :18] == 0).all()
    assert (out["palette_alpha.png"][:, 22:] == (255, 0, 0)).all()


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("zero.jpg", b"", "empty (0 bytes)"),
        ("truncated.jpg", None, "not a readable image"),
        ("text.jpg", b"this is not a JPEG\n" * 20, "not a readable image"),
    ],
)
def test_unreadable_image_errors_name_the_file(tmp_path, name, data, fragment):
    from facecli.data.images import decode_image
    from facecli.errors import ImageError

    if data is None:
        full = _encode(Image.fromarray(_two_colour_rgb(64)), "JPEG", quality=90)
        data = full[: len(full) // 2]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as e:
        decode_image(path, 32)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_training_skips_and_counts_bad_images_and_uses_converted_modes(tmp_path, synth_train_dir):
    """Zero-byte, truncated and non-image files are skipped and counted once each, over two
    epochs; grayscale, CMYK, 16-bit and palette-with-alpha images are trained on."""
    root = tmp_path / "train"
    ids = sorted(p for p in synth_train_dir.iterdir() if p.is_dir())[:3]
    modes = _mode_images()
    for k, src in enumerate(ids):
        d = root / f"person{k}"
        _copy_identity(src, d, 1)  # one plain RGB JPEG each
        for name, data in modes.items():
            (d / name).write_bytes(data)
    good_jpeg = next(ids[0].iterdir()).read_bytes()
    (root / "person0" / "zero.jpg").write_bytes(b"")
    (root / "person1" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "person2" / "notanimage.jpg").write_bytes(b"GIF? no, plain text\n" * 10)
    # 3 x 5 good + 2 unreadable = 17 indexed (the empty file is dropped at indexing); batch 17
    # puts every image in every step, so each bad file is met once per epoch.
    args = [*TRAIN, "--train-dir", root, "--checkpoints-dir", tmp_path / "ck", "--run-name", "r"]
    args[args.index("--batch-size") + 1] = "17"
    args[args.index("--epochs") + 1] = "2"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "Skipped 1 empty image file(s)" in out and "zero.jpg" in out
    assert "Skipped 2 unreadable image(s) during training" in out, out  # 2 files, not 2 per epoch
    assert "truncated.jpg" in out and "notanimage.jpg" in out
    for mode_file in modes:
        assert mode_file not in out  # converted, not skipped
    assert "Traceback" not in out
    from facecli.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "ck" / "arcface" / "r" / "latest.pt")
    assert ck["epoch"] == 2 and ck["step"] == 2


# --------------------------------------------------------------------------- pairs files


@pytest.fixture(scope="module")
def dev_lines(synth_lfw_dir) -> list[str]:
    return (synth_lfw_dir / "pairsDevTest.txt").read_text().splitlines()


def _pairs_text(case: str, lines: list[str]) -> str:
    matched, mismatched = lines[1].split(), lines[-1]
    name = matched[0]
    one_pair_each = lambda first: f"1\n{first}\n{mismatched}\n"  # noqa: E731
    return {
        "header": "ten 300\n" + "\n".join(lines[1:]) + "\n",
        "too few lines": "\n".join(lines[:-1]) + "\n",
        "too many lines": "\n".join(lines) + f"\n{mismatched}\n",
        "non-numeric index": one_pair_each(f"{name}\tone\t2"),
        "unknown name": one_pair_each("Nobody_Atall\t1\t2"),
        "missing image": one_pair_each(f"{name}\t1\t99"),
        "dotdot name": one_pair_each("../etc\t1\t2"),
        "absolute name": one_pair_each("/etc\t1\t2"),
    }[case]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("header", ["line 1", "malformed header 'ten 300'", "'<folds> <n>'"]),
        ("too few lines", ["the file ends after", "announces", "re-download"]),
        ("too many lines", ["extra line", "Remove the extra lines or fix the header"]),
        ("non-numeric index", ["line 2", "image number 'one' is not a positive integer", "Fix or re-download"]),
        ("unknown name", ["line 2", "no folder 'Nobody_Atall'", "Check that the image root"]),
        ("missing image", ["line 2", "_0099.jpg: no such image", "Check that the image root"]),
        ("dotdot name", ["line 2", "refusing person name '../etc'", "outside the image root"]),
        ("absolute name", ["line 2", "refusing person name '/etc'", "outside the image root"]),
    ],
)
def test_bad_pairs_files(case, fragments, tmp_path, trained_checkpoint, synth_lfw_dir, dev_lines):
    pairs = tmp_path / f"{case.replace(' ', '_')}.txt"
    pairs.write_text(_pairs_text(case, dev_lines))
    result = cli("eval-lfw", trained_checkpoint, "--lfw-dir", synth_lfw_dir, "--pairs", pairs, "--workers", "0")
    user_error(result, pairs.name, *fragments)
    assert not list(tmp_path.glob("*.png"))


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, trained_checkpoint) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("badck")
    out = {"not a file": d / "a-directory.pt", "missing": d / "missing.pt"}
    out["not a file"].mkdir()
    out["empty"] = d / "empty.pt"
    out["empty"].write_bytes(b"")
    out["random bytes"] = d / "random.pt"
    out["random bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    out["truncated"] = d / "truncated.pt"
    out["truncated"].write_bytes(trained_checkpoint.read_bytes()[:100_000])
    out["plain state_dict"] = d / "state_dict.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), out["plain state_dict"])
    real = torch.load(trained_checkpoint, weights_only=True)
    out["other version"] = d / "v99.pt"
    torch.save({**real, "format_version": 99}, out["other version"])
    return out


CHECKPOINT_CASES = [
    ("not a file", ["is not a file", "Name a .pt file"]),
    ("missing", ["does not exist", "Check the path"]),
    ("empty", ["is empty (0 bytes)", "use another checkpoint"]),
    ("random bytes", ["damaged or not a PyTorch checkpoint", "Use another checkpoint"]),
    ("truncated", ["damaged or not a PyTorch checkpoint", "Use another checkpoint"]),
    ("plain state_dict", ["is not a facecli checkpoint", "Use a .pt written by `facecli train`"]),
    ("other version", ["format version 99", "Use the facecli version that wrote it"]),
]


@pytest.mark.parametrize(
    "command, case, fragments",
    [
        (command, case, fragments)
        for command in ("info", "eval-lfw", "embed", "resume")
        for case, fragments in CHECKPOINT_CASES
        if not (command == "resume" and case == "missing")  # resume names runs: see test_resume_problems
    ],
)
def test_bad_checkpoints(command, case, fragments, bad_checkpoints, tmp_path, synth_lfw_dir, synth_train_dir):
    path = bad_checkpoints[case]
    if command == "info":
        result = cli("info", path)
    elif command == "eval-lfw":
        result = cli("eval-lfw", path, "--lfw-dir", synth_lfw_dir, "--workers", "0")
    elif command == "embed":
        result = cli("embed", path, synth_train_dir, "--out", tmp_path / "e.npz")
        assert not (tmp_path / "e.npz").exists()
    else:
        run = tmp_path / "ck" / "arcface" / "r"
        run.mkdir(parents=True)
        target = run / "latest.pt"
        if path.is_dir():
            target.mkdir()
            fragments = ["has no latest.pt", "start the run again"]  # resume reports the run, not the file
        else:
            shutil.copy(path, target)
        path = target
        result = cli("resume", "arcface", "--run", "r", "--checkpoints-dir", tmp_path / "ck", "--no-wandb")
    line = user_error(result, *fragments)
    assert path.name in line


def test_resume_problems(tmp_path, trained_checkpoint):
    ck = tmp_path / "ck"
    # a cosface run where resume arcface looks
    real = torch.load(trained_checkpoint, weights_only=True)
    (ck / "arcface" / "other").mkdir(parents=True)
    torch.save({**real, "model": "cosface"}, ck / "arcface" / "other" / "latest.pt")
    user_error(
        cli("resume", "arcface", "--run", "other", "--checkpoints-dir", ck, "--no-wandb"),
        "is a cosface run, not arcface", "facecli resume cosface",
    )
    user_error(cli("resume", "arcface", "--run", "nope", "--checkpoints-dir", ck), "No arcface run named 'nope'", "Existing runs: other")
    user_error(cli("resume", "cosface", "--checkpoints-dir", ck), "No cosface runs in", "facecli train")
    user_error(cli("resume", "arcface", "--run", "../x", "--checkpoints-dir", ck), "is not a run name")
    user_error(cli("resume", "arcface", "--run", "other", "--from", "best", "--checkpoints-dir", ck), "has no best.pt", "Try --from latest")


# --------------------------------------------------------------------------- flags


def test_unknown_model_is_a_usage_error(synth_root):
    result = cli("train", "vggface", "--dataset-path", synth_root, *TINY_TRAIN_ARGS)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Invalid value for 'model'" in result.output and "'vggface' is not one of" in result.output
    assert "arcface" in result.output and "Try 'facecli train --help'" in result.output


@pytest.mark.parametrize(
    "model, flag, value, fragments",
    [
        ("arcface", "--batch-size", "0", ["--batch-size must be a positive integer, got 0"]),
        ("arcface", "--batch-size", "-16", ["--batch-size must be a positive integer, got -16"]),
        ("arcface", "--lr", "0", ["--lr must be a positive number, got 0"]),
        ("arcface", "--lr", "-0.1", ["--lr must be a positive number, got -0.1"]),
        ("arcface", "--lr", "nan", ["--lr must be a positive number, got nan"]),
        ("arcface", "--epochs", "0", ["--epochs must be a positive integer, got 0"]),
        ("arcface", "--epochs", "-3", ["--epochs must be a positive integer, got -3"]),
        ("arcface", "--margin", repr(math.pi), ["arcface", "margin 3.14159", "[0, pi)", "default is 0.5"]),
        ("arcface", "--margin", "4", ["arcface", "margin 4", "[0, pi)"]),
        ("arcface", "--margin", "-0.1", ["arcface", "margin -0.1", "[0, pi)"]),
        ("cosface", "--margin", "1.5", ["cosface", "margin 1.5", "[0, 1]"]),
        ("sphereface", "--margin", "0.5", ["sphereface", "margin 0.5", ">= 1"]),
        ("facenet", "--margin", "0", ["triplet --margin must be in (0, 4]"]),
        ("arcface", "--scale", "0", ["scale must be > 0", "30-64"]),
    ],
)
def test_out_of_range_training_flags(model, flag, value, fragments, tmp_path, synth_root):
    args = ["train", model, "--dataset-path", synth_root, *TINY_TRAIN_ARGS, "--no-eval", "--checkpoints-dir", tmp_path / "ck"]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    user_error(cli(*args), *fragments)
    assert not (tmp_path / "ck").exists()


def test_device_cuda_without_cuda(tmp_path, synth_root, trained_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["train", "arcface", "--dataset-path", synth_root, *TINY_TRAIN_ARGS, "--no-eval", "--checkpoints-dir", tmp_path / "ck"]
    args[args.index("--device") + 1] = "cuda"
    user_error(cli(*args), "--device cuda", "CUDA is not available", "Use --device cpu or auto")
    user_error(cli("embed", trained_checkpoint, tmp_path, "--device", "cuda:0"), "--device cuda:0", "CUDA is not available")
    args[args.index("--device") + 1] = "tpu"
    user_error(cli(*args), "Unknown device 'tpu'", "Use auto, cpu, cuda or cuda:N")


@pytest.mark.parametrize("command", ["eval-lfw", "embed"])
def test_non_positive_batch_size_in_evaluation(command, trained_checkpoint, synth_lfw_dir, tmp_path):
    extra = ["--lfw-dir", synth_lfw_dir] if command == "eval-lfw" else [tmp_path]
    user_error(cli(command, trained_checkpoint, *extra, "--batch-size", "0"), "--batch-size must be a positive integer, got 0")


# --------------------------------------------------------------------------- .env


def test_env_file_mistakes_are_warnings_not_fatal(tmp_path, synth_root):
    (tmp_path / ".env").write_text(
        "# settings\n"
        f"DATASET_PATH={synth_root}\n"
        "this line has no equals sign\n"
        "DATSET_PATH=/typo/ignored\n"
        f"CHECKPOINTS_DIR={tmp_path / 'runs'}\n"
    )
    result = cli(*TRAIN, "--run-name", "envtest")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "warning:" in out
    assert ".env:3: malformed line (expected KEY=value); it is ignored." in out
    assert ".env:4: unknown key 'DATSET_PATH'" in out and "DATASET_PATH" in out.split("unknown key", 1)[1]
    # the good lines were still applied
    assert (tmp_path / "runs" / "arcface" / "envtest" / "latest.pt").is_file()


def test_env_file_bad_value_is_one_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # the environment would override .env
    (tmp_path / ".env").write_text("WANDB_MODE=sometimes\n")
    user_error(cli(*TRAIN), "Invalid setting", ".env", "WANDB_MODE")  # the key as written in .env
