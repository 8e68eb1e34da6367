"""The identity-folder index: same samples as a plain walk, compact, cached, shared by ranks.

Claims: the dataset lists exactly what a straightforward ``scandir`` + ``stat`` walk lists
(order, labels, empty files, hidden and non-image files skipped, identity lists and label
maps honoured); the index is numpy arrays, not Python strings; a second load of an unchanged
tree reads the cache without walking the tree; adding, removing or renaming a file or a
folder invalidates it; a damaged or doctored cache is rebuilt; in a two-process group the
local rank 0 walks the tree and the other rank reads its cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from facecli.data import index as idx
from facecli.data.folders import IdentityFolderDataset
from facecli.data.images import Preprocess, is_image_file

PRE = Preprocess(32)
OLD = time.time() - 3600  # folder mtimes set an hour back: the tree counts as settled


def reference_walk(root: Path, wanted: list[str] | None = None):
    """The index as the first facecli computed it: sorted folders, sorted image files, a stat each."""
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels, empty = [], [], []
    for label, name in enumerate(wanted or folders):
        for e in sorted((e for e in os.scandir(root / name) if e.is_file() and is_image_file(Path(e.name))), key=lambda e: e.name):
            if e.stat().st_size == 0:
                empty.append(e.path)
            else:
                paths.append(e.path)
                labels.append(label)
    return paths, labels, empty


def settle(root: Path) -> None:
    for d in [root, *(p for p in root.iterdir() if p.is_dir())]:
        os.utime(d, (OLD, OLD))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "train"
    spec = {
        "b_person": ["2.jpg", "10.jpg", "1.JPG", "x.png", ".hidden.jpg", "notes.txt", "empty.jpg"],
        "a_person": ["z.jpeg", "a.webp", "Ünïcode é.jpg"],
        "c_person": ["only.bmp", "zero.png"],
        "d_person": ["k.tif"],
    }
    for folder, names in spec.items():
        (root / folder).mkdir(parents=True)
        for n in names:
            (root / folder / n).write_bytes(b"" if n in ("empty.jpg", "zero.png") else b"data " + n.encode())
    (root / "b_person" / "sub.jpg").mkdir()  # a directory named like an image is not a file
    (root / ".cache").mkdir()
    (root / "stray.jpg").write_bytes(b"not in a folder")
    os.symlink(root / "a_person" / "z.jpeg", root / "d_person" / "link.jpg")
    settle(root)
    return root


def as_reference(ds: IdentityFolderDataset):
    return list(ds.paths), ds.labels.tolist(), ds.empty_files


def test_same_samples_as_a_plain_walk(tree, tmp_path):
    ds = IdentityFolderDataset(tree, PRE, index_cache=tmp_path / "cache")
    assert as_reference(ds) == reference_walk(tree)
    assert ds.classes == ["a_person", "b_person", "c_person", "d_person"]
    assert str(tree / "b_person" / "empty.jpg") in ds.empty_files and str(tree / "c_person" / "zero.png") in ds.empty_files


@pytest.mark.parametrize("wanted", [["d_person", "a_person"], ["c_person", "b_person", "d_person", "a_person"]])
def test_identity_lists_and_label_maps(tree, tmp_path, wanted):
    by_list = IdentityFolderDataset(tree, PRE, identities=wanted, index_cache=tmp_path / "cache")
    by_map = IdentityFolderDataset(tree, PRE, classes=wanted, index_cache=tmp_path / "cache")
    for ds in (by_list, by_map):
        assert ds.classes == wanted
        assert as_reference(ds) == reference_walk(tree, wanted)


def test_index_is_numpy_not_python_strings(tree, tmp_path):
    ds = IdentityFolderDataset(tree, PRE, index_cache=False)
    assert ds.labels.dtype == np.int32
    assert ds.files.data.dtype == np.uint8 and ds.files.offsets.dtype == np.int64
    assert isinstance(ds.files, idx.PackedStrings)
    assert not [k for k, v in vars(ds).items() if isinstance(v, (list, tuple, np.ndarray)) and np.asarray(v).dtype == object]
    assert ds.paths[-1] == ds.paths[len(ds) - 1] and ds.paths[1:3] == [ds.paths[1], ds.paths[2]]
    with pytest.raises(IndexError):
        ds.paths[len(ds)]


def _no_walk(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the tree was walked again")

    monkeypatch.setattr(idx, "scan_tree", refuse)


def test_second_load_reads_the_cache(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = idx.load_index(tree, cache, min_files=0)
    assert len(list((cache / "index").glob("*.npz"))) == 1
    _no_walk(monkeypatch)
    second = idx.load_index(tree, cache, min_files=0)
    assert second.files.tolist() == first.files.tolist() and second.empty.tolist() == first.empty.tolist()
    assert np.array_equal(second.labels, first.labels) and second.folders.tolist() == first.folders.tolist()
    ds = IdentityFolderDataset(tree, PRE, index_cache=cache)  # below CACHE_MIN_FILES, but the cache is there
    assert as_reference(ds) == reference_walk(tree)


@pytest.mark.parametrize("change", ["add file", "remove file", "rename file", "add folder", "remove folder"])
def test_a_changed_tree_is_walked_again(tree, tmp_path, change):
    cache = tmp_path / "cache"
    idx.load_index(tree, cache, min_files=0)
    if change == "add file":
        (tree / "a_person" / "new.jpg").write_bytes(b"new")
    elif change == "remove file":
        (tree / "b_person" / "2.jpg").unlink()
    elif change == "rename file":
        (tree / "b_person" / "2.jpg").rename(tree / "b_person" / "3.jpg")
    elif change == "add folder":
        (tree / "e_person").mkdir()
        (tree / "e_person" / "e.jpg").write_bytes(b"e")
    else:
        for p in (tree / "d_person").iterdir():
            p.unlink()
        (tree / "d_person").rmdir()
    again = idx.load_index(tree, cache, min_files=0)
    ds = IdentityFolderDataset(tree, PRE, index_cache=cache)
    assert as_reference(ds) == reference_walk(tree)
    assert again.files.tolist() == [p[len(str(tree)) + 1 :] for p in reference_walk(tree)[0]]


def test_recently_changed_trees_are_not_cached(tree, tmp_path):
    cache = tmp_path / "cache"
    (tree / "a_person" / "fresh.jpg").write_bytes(b"fresh")  # its folder's mtime is now
    idx.load_index(tree, cache, min_files=0)
    assert not list(cache.glob("index/*.npz"))


def test_small_trees_are_not_cached(tree, tmp_path):
    cache = tmp_path / "cache"
    idx.load_index(tree, cache)  # default min_files: 20,000
    assert not (cache / "index").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "path escapes", "wrong labels"])
def test_a_damaged_or_doctored_cache_is_rebuilt(tree, tmp_path, damage):
    cache = tmp_path / "cache"
    good = idx.load_index(tree, cache, min_files=0)
    path = next((cache / "index").glob("*.npz"))
    digest, _ = idx.fingerprint(tree, idx.list_folders(tree))
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        files, labels = good.files, good.labels.copy()
        if damage == "path escapes":
            files = idx.PackedStrings.from_strings(["../../etc/passwd"] + good.files.tolist()[1:])
        else:
            labels[0] = len(good.folders.tolist()) + 5
        idx.save_index(path, idx.FolderIndex(good.folders, files, labels, good.empty, good.empty_labels), digest)
    assert idx.read_index(path, digest) is None
    rebuilt = idx.load_index(tree, cache, min_files=0)
    assert rebuilt.files.tolist() == good.files.tolist() and np.array_equal(rebuilt.labels, good.labels)


def test_unwritable_cache_folder_is_not_an_error(tree, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    ds = IdentityFolderDataset(tree, PRE, index_cache=blocker)
    assert as_reference(ds) == reference_walk(tree)


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACECLI_CACHE_DIR", str(tmp_path / "c"))
    assert idx.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACECLI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert idx.default_cache_dir() == tmp_path / "x" / "facecli"


def _rank_main(rank: int, root: str, cache: str, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    walks = []
    original = idx.scan_tree
    idx.scan_tree = lambda *a, **k: walks.append(time.time()) or original(*a, **k)
    try:
        ds = IdentityFolderDataset(root, PRE, index_cache=cache, coordinate=True)
        Path(out, f"rank{rank}").write_text(f"{len(walks)} {len(ds)}")
    finally:
        dist.destroy_process_group()


def test_local_rank_zero_walks_and_the_other_rank_reads(tree, tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setattr(idx, "CACHE_MIN_FILES", 0)  # inherited by the forked ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(str(tree), str(tmp_path / "cache"), port, str(tmp_path)), nprocs=2, start_method="fork")
    walks0, n0 = (tmp_path / "rank0").read_text().split()
    walks1, n1 = (tmp_path / "rank1").read_text().split()
    assert (walks0, walks1) == ("1", "0") and n0 == n1 == str(len(reference_walk(tree)[0]))
