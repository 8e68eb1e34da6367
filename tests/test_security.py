"""Security: checkpoints never run code when opened, the W&B key is never written anywhere,
and pairs files or ``embed`` folders cannot make facecli read outside what they name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_ARGS, cli

# --------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this runs a shell command (what a booby-trapped .pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a facecli checkpoint but carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": "facecli-checkpoint", "format_version": 1, "model": "arcface",
            "net": {"backbone": "resnet18", "embedding_dim": 8, "normalize": False},
            "net_state": {"w": torch.zeros(2)}, "preprocess": {"image_size": 32}, "classes": ["a", "b"],
            "train_config": {"model": "arcface", "epochs": 5},
            "epoch": 1, "batch_in_epoch": 0, "step": 1, "hook": _Payload(marker),
        },
        path,
    )
    return path


def test_the_payload_is_live(tmp_path):
    """Control: opened the unsafe way, the file does run its command (so refusing it matters)."""
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["info", "eval-lfw", "embed", "resume", "tune-threshold"])
def test_malicious_checkpoint_is_refused_without_running(command, tmp_path, synth_lfw_dir, synth_train_dir):
    marker = tmp_path / "pwned"
    if command == "resume":
        _malicious_checkpoint(tmp_path / "ck" / "arcface" / "evil" / "latest.pt", marker)
        args = ["resume", "arcface", "--run", "evil", "--checkpoints-dir", tmp_path / "ck", "--no-wandb"]
    else:
        path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
        extra = {
            "info": [],
            "eval-lfw": ["--lfw-dir", synth_lfw_dir, "--workers", "0"],
            "embed": [synth_train_dir, "--out", tmp_path / "e.npz"],
            "tune-threshold": ["--lfw-dir", synth_lfw_dir, "--workers", "0"],
        }[command]
        args = [command, path, *extra]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Refused to load" in result.output and "could run code" in result.output
    assert not marker.exists(), "the checkpoint's code ran"


def test_every_checkpoint_load_is_weights_only(tmp_path, trained_checkpoint, monkeypatch):
    """Whatever path opens a checkpoint, torch.load is called with weights_only=True."""
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    from facecli.engine.checkpoint import set_threshold
    from facecli.models import load_model

    assert cli("info", trained_checkpoint).exit_code == 0
    load_model(trained_checkpoint)
    copy = tmp_path / "copy.pt"
    shutil.copy(trained_checkpoint, copy)
    set_threshold(copy, 0.3, "test")
    assert len(calls) >= 3 and all(flag is True for flag in calls), calls


def test_no_unsafe_load_in_the_source():
    """Every torch.load in facecli passes weights_only=True; nothing unpickles with plain pickle."""
    import ast

    import facecli

    unsafe = []
    for path in Path(facecli.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            flags = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and "map_location" in flags:
                wo = flags.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    unsafe.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if name in ("pickle.load", "pickle.loads", "torch.serialization.load"):
                unsafe.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if name.endswith("np.load") and not (isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value is False) and "allow_pickle" in flags:
                unsafe.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert unsafe == []


# --------------------------------------------------------------------------- the W&B key


FAKE_KEY = "f4k3f4k3" + "0123456789abcdef" * 2  # 40 characters, like a real key


@pytest.mark.parametrize("source", ["environment", ".env"])
def test_wandb_key_is_never_written(source, tmp_path, synth_root, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B writes its local files into the run directory
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    # W&B's worker hands the key to the wandb library through os.environ; make sure the test
    # process gets its environment back whatever the run leaves there.
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")
    if source == "environment":
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    else:
        monkeypatch.delenv("WANDB_API_KEY")
        (tmp_path / ".env").write_text(f"WANDB_API_KEY={FAKE_KEY}\nWANDB_PROJECT=facecli-test\n")
    args = ["train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path / "ck", "--run-name", "r", "--no-eval"]
    args += [a for a in TINY_TRAIN_ARGS if a != "--no-wandb"]
    args[args.index("--epochs") + 1] = "2"
    args += ["--checkpoint-every", "2", "--wandb"]
    result = cli(*args)
    captured = capfd.readouterr()
    assert result.exit_code == 0, result.output

    run = tmp_path / "ck" / "arcface" / "r"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != tmp_path / ".env"]
    names = {p.name for p in written}
    assert {"latest.pt", "min_loss.pt", "config.json", "metrics.jsonl"} <= names
    assert list(run.glob("wandb/*run-*")), "W&B wrote no local run files; the check would be empty"
    key = FAKE_KEY.encode()
    leaks = [str(p) for p in written if key in p.read_bytes()]
    assert leaks == [], f"the W&B key was written to {leaks}"
    for text in (result.output, captured.out, captured.err):
        assert FAKE_KEY not in text
    assert "api_key" not in (run / "config.json").read_text().lower()


# --------------------------------------------------------------------------- paths


@pytest.fixture()
def small_lfw(tmp_path, synth_lfw_dir) -> dict:
    """An LFW folder with two people, and a third person's images outside it."""
    src_root = synth_lfw_dir / "lfw_funneled"
    people = sorted(p.name for p in src_root.iterdir() if p.is_dir())[:3]
    lfw = tmp_path / "lfw"
    root = lfw / "lfw_funneled"
    for name in people[:2]:
        shutil.copytree(src_root / name, root / name)
    outside = tmp_path / "outside"
    shutil.copytree(src_root / people[2], outside / people[2])
    return {"lfw": lfw, "root": root, "outside": outside, "a": people[0], "b": people[1], "c": people[2]}


def _pairs(path: Path, line: str, a: str, b: str) -> Path:
    """A 10-fold pairs.txt, one matched and one mismatched pair per fold; ``line`` opens fold 1."""
    rows = ["10\t1"]
    for fold in range(10):
        rows += [line if fold == 0 else f"{(a, b)[fold % 2]}\t1\t2", f"{a}\t{fold % 3 + 1}\t{b}\t1"]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("case", ["dotdot name", "absolute name", "symlinked folder", "symlinked image"])
def test_pairs_cannot_reach_outside_the_image_root(case, small_lfw, tmp_path, trained_checkpoint):
    lfw, root, outside, a, b, c = (small_lfw[k] for k in ("lfw", "root", "outside", "a", "b", "c"))
    if case == "dotdot name":
        # ../outside/<c> really exists: only the name check stands between facecli and it
        assert (root / ".." / ".." / "outside" / c).is_dir()
        line = f"../../outside/{c}\t1\t2"
    elif case == "absolute name":
        line = f"{outside / c}\t1\t2"
    elif case == "symlinked folder":
        (root / c).symlink_to(outside / c, target_is_directory=True)
        line = f"{c}\t1\t2"
    else:
        (root / c).mkdir()
        for n in (1, 2):
            name = f"{c}_{n:04d}.jpg"
            (root / c / name).symlink_to(outside / c / name)
        line = f"{c}\t1\t2"
    pairs = _pairs(tmp_path / "pairs.txt", line, a, b)
    result = cli("eval-lfw", trained_checkpoint, "--lfw-dir", lfw, "--pairs", pairs, "--workers", "0", "--json", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "outside the image root" in out
    assert not (tmp_path / "r.json").exists()

    # the same layout with the person inside the root is evaluated: the refusal is about the path
    if case in ("symlinked folder", "symlinked image"):
        shutil.rmtree(root / c) if case == "symlinked image" else (root / c).unlink()
        shutil.copytree(outside / c, root / c)
        ok = cli("eval-lfw", trained_checkpoint, "--lfw-dir", lfw, "--pairs", pairs, "--workers", "0", "--json", tmp_path / "r.json")
        assert ok.exit_code == 0, ok.output


def test_embed_follows_links_out_of_a_folder_as_train_does_but_not_loops(tmp_path, trained_checkpoint, synth_train_dir):
    """Issue 19: symlinked data trees are the norm on clusters, so links are followed (as
    `train` and `pack` always did); a link back up the tree is a loop, skipped and named."""
    images = sorted(p for p in synth_train_dir.rglob("*.jpg"))[:4]
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(images[0], folder / "a.jpg")
    shutil.copy(images[1], folder / "sub" / "b.jpg")
    (folder / "sub" / "again.jpg").symlink_to(folder / "a.jpg")  # inside: fine
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    shutil.copy(images[2], elsewhere / "secret.jpg")
    shutil.copy(images[3], elsewhere / "deep" / "other.jpg")
    (folder / "link.jpg").symlink_to(elsewhere / "secret.jpg")
    (folder / "linkdir").symlink_to(elsewhere / "deep", target_is_directory=True)
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)

    out = tmp_path / "e.npz"
    result = cli("embed", trained_checkpoint, folder, "--out", out, "--no-flip")
    assert result.exit_code == 1, result.output  # something was skipped
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "up: links to" in text and "(a loop); not read" in text
    data = np.load(out)
    read = sorted(Path(p).relative_to(folder).as_posix() for p in data["paths"])
    assert read == ["a.jpg", "link.jpg", "linkdir/other.jpg", "sub/again.jpg", "sub/b.jpg"]
    assert data["embeddings"].shape[0] == 5

    # a file the user names explicitly is read, wherever it is
    result = cli("embed", trained_checkpoint, elsewhere / "secret.jpg", folder / "a.jpg", "--out", out, "--no-flip", "--overwrite")
    assert result.exit_code == 0, result.output
    assert [Path(p).name for p in np.load(out)["paths"]] == ["secret.jpg", "a.jpg"]
