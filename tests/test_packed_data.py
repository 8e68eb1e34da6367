"""Real-world data formats end to end: ``facecli pack`` + training from ``train.rec``, and
insightface ``.bin`` verification sets evaluated through the CLI.

The claims: a packed set trains on exactly the images, labels and order of the folders
it was packed from; a ``.bin`` built from LFW pairs (written by Python 3 at protocol 2,
or byte for byte as Python 2 wrote them) scores exactly like the same pairs read from
the folders; a ``.bin`` that would run code is refused by the commands; ``--val-bin``
sets are evaluated during training every ``--eval-every`` epochs.
"""

from __future__ import annotations

import builtins
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_ARGS, cli
from facecli.data import build_train_dataset
from facecli.data.binset import read_bin, write_bin
from facecli.data.images import Preprocess
from facecli.data.lfw import find_image_root, read_pairs
from facecli.data.recordio import RecordIODataset


# ----------------------------------------------------------------------------- helpers


def _metrics(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_sec")} for r in rows]


def _train(args, ck, run):
    result = cli("train", "arcface", *args, "--checkpoints-dir", ck, "--run-name", run, "--no-eval", *TINY_TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    return ck / "arcface" / run


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's ``cPickle.dump((bins, issame_list), f, protocol=2)`` writes.

    Python 2 ``str`` objects are pickled as (SHORT_)BINSTRING opcodes, which Python 3
    can only load as bytes with ``encoding="bytes"``; bools are NEWTRUE/NEWFALSE.
    """
    out = bytearray(b"\x80\x02]q\x00(")
    for b in images:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    out += b"e]q\x01(" + b"".join(b"\x88" if v else b"\x89" for v in issame) + b"e\x86q\x02."
    return bytes(out)


@pytest.fixture(scope="module")
def lfw_bins(synth_lfw_dir, tmp_path_factory):
    """The synthetic View 2 pairs as lfw.bin (protocol 2) and lfw_py2.bin (Python 2 bytes)."""
    pairs = read_pairs(synth_lfw_dir / "pairs.txt", find_image_root(synth_lfw_dir))
    images = [p.read_bytes() for pair in pairs.pairs for p in pair]
    issame = [bool(v) for v in pairs.issame]
    out = tmp_path_factory.mktemp("bins")
    py3 = write_bin(out / "lfw.bin", images, issame, protocol=2)
    py2 = out / "lfw_py2.bin"
    py2.write_bytes(_py2_pickle(images, issame))
    return pairs, images, issame, py3, py2


# ----------------------------------------------------------------------------- pack


def test_packed_set_decodes_to_the_same_samples(synth_train_dir, tmp_path):
    out = tmp_path / "rec"
    result = cli("pack", synth_train_dir, out)
    assert result.exit_code == 0, result.output
    assert "Packed 72 images of 12 identities" in result.output

    pre = Preprocess(32)
    folder = build_train_dataset(synth_train_dir, pre)
    packed = build_train_dataset(out, pre)
    assert isinstance(packed, RecordIODataset)
    assert len(packed) == len(folder) == 72
    assert packed.classes == folder.classes
    assert np.array_equal(packed.labels, folder.labels)
    for i in range(len(folder)):
        a, la, bad_a = folder[i]
        b, lb, bad_b = packed[i]
        assert bad_a is None and bad_b is None
        assert la == lb
        assert a.dtype == b.dtype == torch.uint8 and a.shape == (3, 32, 32)
        assert torch.equal(a, b), f"sample {i} ({folder.paths[i]}) decodes differently from the pack"

    # An identity list selects the same identities, in the list's label order, from both.
    wanted = [folder.classes[5], folder.classes[2]]
    f2 = build_train_dataset(synth_train_dir, pre, identities=wanted)
    p2 = build_train_dataset(out, pre, identities=wanted)
    assert f2.classes == p2.classes == wanted
    assert np.array_equal(f2.labels, p2.labels) and len(p2) == 12
    assert all(torch.equal(f2[i][0], p2[i][0]) for i in range(len(p2)))


def test_training_from_rec_equals_training_from_folders(synth_train_dir, tmp_path):
    rec = tmp_path / "rec"
    assert cli("pack", synth_train_dir, rec).exit_code == 0
    ck = tmp_path / "ck"
    runs = {
        "folders": _train(["--train-dir", synth_train_dir], ck, "folders"),
        "train_rec": _train(["--train-rec", rec], ck, "train_rec"),
        "auto": _train(["--dataset-path", rec], ck, "auto"),  # DATASET_PATH holding train.rec
    }
    # Each run really read what it was given.
    assert "RecordIO" not in json.loads((runs["folders"] / "config.json").read_text())["dataset"]
    for name in ("train_rec", "auto"):
        assert json.loads((runs[name] / "config.json").read_text())["dataset"].startswith(f"RecordIO {rec}")

    reference = _metrics(runs["folders"])
    assert any("epoch_loss" in r for r in reference)
    ref_ckpt = torch.load(runs["folders"] / "latest.pt", weights_only=True)
    assert ref_ckpt["step"] == 4  # 72 images // batch 16
    for name in ("train_rec", "auto"):
        assert _metrics(runs[name]) == reference, name  # same losses at every logged step
        ckpt = torch.load(runs[name] / "latest.pt", weights_only=True)
        assert ckpt["classes"] == ref_ckpt["classes"]
        for key, value in ref_ckpt["net_state"].items():
            assert torch.equal(ckpt["net_state"][key], value), f"{name}: {key} differs"
        assert torch.equal(ckpt["head_state"]["weight"], ref_ckpt["head_state"]["weight"])


# ----------------------------------------------------------------------------- .bin


def test_bin_layout_needs_bytes_encoding(lfw_bins):
    pairs, images, issame, py3, py2 = lfw_bins
    assert len(images) == 2 * len(pairs) == 1200
    with pytest.raises(UnicodeDecodeError):  # JPEG bytes are not ASCII: Python 2 str needs encoding="bytes"
        pickle.loads(py2.read_bytes())
    bins, flags = pickle.loads(py2.read_bytes(), encoding="bytes")
    assert bins == images and flags == issame
    for path in (py3, py2):
        s = read_bin(path)
        assert s.images == images and s.issame.tolist() == issame


def test_bin_evaluates_like_the_same_pairs_from_folders(trained_checkpoint, synth_lfw_dir, lfw_bins, tmp_path):
    pairs, _, _, py3, py2 = lfw_bins
    folder = cli("eval-lfw", trained_checkpoint, "--lfw-dir", synth_lfw_dir, "--workers", "0", "--json", tmp_path / "folder.json")
    assert folder.exit_code == 0, folder.output
    binned = cli("eval-lfw", trained_checkpoint, "--bin", py3, "--workers", "0", "--json", tmp_path / "bin.json")
    assert binned.exit_code == 0, binned.output
    a = json.loads((tmp_path / "folder.json").read_text())
    b = json.loads((tmp_path / "bin.json").read_text())
    assert a["pairs"] == b["pairs"] == 600
    assert a["unique_images"] == 120 and b["unique_images"] == 1200  # a .bin stores every pair's images
    assert 0.0 < a["accuracy"] < 1.0  # a non-trivial result, so agreement means something
    assert b["accuracy"] == a["accuracy"]
    assert b["fold_accuracies"] == a["fold_accuracies"]
    assert b["fold_thresholds"] == pytest.approx(a["fold_thresholds"], abs=1e-6)
    assert b["auc"] == pytest.approx(a["auc"], abs=1e-9)

    # `facecli eval` reports several sets in one table: the folders and both .bin files agree.
    both = cli(
        "eval", trained_checkpoint, "--bin", py3, "--bin", py2, "--lfw-dir", synth_lfw_dir,
        "--no-flip", "--workers", "0", "--json", tmp_path / "all.json",
    )
    assert both.exit_code == 0, both.output
    rows = [line for line in both.output.splitlines() if line.strip().startswith(("│ lfw", "| lfw", "│ LFW"))]
    assert {r.split()[1] for r in rows} == {"LFW", "lfw", "lfw_py2"}, both.output
    data = json.loads((tmp_path / "all.json").read_text())
    assert set(data) == {"LFW", "lfw", "lfw_py2"}
    for name in ("lfw", "lfw_py2"):
        assert data[name]["accuracy"] == data["LFW"]["accuracy"], name
        assert data[name]["fold_thresholds"] == pytest.approx(data["LFW"]["fold_thresholds"], abs=1e-6)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("command", ["eval-lfw", "eval"])
def test_cli_refuses_a_bin_that_would_run_code(trained_checkpoint, tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_System(f"touch {marker}")], [True]), protocol=2))
    result = cli(command, trained_checkpoint, "--bin", evil)
    assert result.exit_code == 2, result.output
    assert "refusing to unpickle" in result.output and "system" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()

    sneaky = tmp_path / "sneaky.bin"  # the payload hides in the issame list
    sneaky.write_bytes(pickle.dumps(([b"x", b"y"], [_Exec(f"open({str(marker)!r}, 'w').close()")]), protocol=4))
    result = cli(command, trained_checkpoint, "--bin", sneaky)
    assert result.exit_code == 2 and "refusing to unpickle" in result.output, result.output
    assert not marker.exists()


def test_val_bins_are_evaluated_every_eval_every_epochs(synth_root, lfw_bins, tmp_path):
    pairs, images, issame, _, _ = lfw_bins
    # A small set keeps the test quick: the first 10 matched and 10 mismatched pairs of fold 1.
    keep = list(range(10)) + list(range(30, 40))
    small = write_bin(
        tmp_path / "small.bin", [images[2 * k + j] for k in keep for j in (0, 1)], [issame[k] for k in keep], protocol=4
    )
    ck = tmp_path / "ck"
    args = [a for a in TINY_TRAIN_ARGS]
    args[args.index("--epochs") + 1] = "2"
    result = cli(
        "train", "arcface", "--train-dir", synth_root / "CASIA-webface", "--checkpoints-dir", ck, "--run-name", "vb",
        "--no-eval", "--eval-every", "1", "--val-bin", small, *args,
    )
    assert result.exit_code == 0, result.output
    epochs = [r for r in _metrics(ck / "arcface" / "vb") if "epoch_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert 0.0 <= r["small/accuracy"] <= 1.0, r
    assert "small: accuracy" in result.output


def test_pack_reports_unreadable_images_and_keeps_the_rest(synth_train_dir, tmp_path):
    src = tmp_path / "src"
    for name in sorted(p.name for p in synth_train_dir.iterdir())[:2]:
        (src / name).mkdir(parents=True)
        for f in sorted((synth_train_dir / name).iterdir())[:2]:
            (src / name / f.name).symlink_to(f)
    (src / name / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = cli("pack", src, tmp_path / "rec")
    assert result.exit_code == 0, result.output
    assert "Packed 4 images of 2 identities" in result.output
    assert "Skipped 1 unreadable image(s)" in result.output and "zz_broken.jpg" in result.output
    assert len(build_train_dataset(tmp_path / "rec", Preprocess(32))) == 4
