"""LFW pairs files: the real protocol files (when present) and every malformed-file error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from facecli.data.lfw import PairSet, find_image_root, read_pairs
from facecli.errors import UserError
from facecli.evaluation.protocol import verify

SHARED_LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"

PEOPLE = {"Alice": 3, "Bob": 2, "Carol": 1, "Dave": 1}

# folds=2, n=1: each fold one matched line then one mismatched line
GOOD = "2\t1\nAlice\t1\t2\nAlice\t1\tBob\t1\nBob\t1\t2\nCarol\t1\tDave\t1\n"


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "images"
    for name, count in PEOPLE.items():
        (r / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (r / name / f"{name}_{i:04d}.jpg").write_bytes(b"")  # only existence is checked
    return r


def write(tmp_path: Path, text: str, name: str = "pairs.txt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def expect_error(pairs_file: Path, root: Path, line: int, *words: str, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        read_pairs(pairs_file, root, **kwargs)
    msg = str(info.value)
    assert pairs_file.name in msg, msg
    assert re.search(rf"\bline {line}\b", msg), msg
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- crafted, valid


def test_reads_crafted_file(tmp_path, root):
    ps = read_pairs(write(tmp_path, GOOD), root)
    assert isinstance(ps, PairSet) and len(ps) == 4
    assert (ps.folds, ps.per_fold, ps.missing) == (2, 2, 0)
    np.testing.assert_array_equal(ps.issame, [True, False, True, False])
    assert ps.pairs[0] == (root / "Alice" / "Alice_0001.jpg", root / "Alice" / "Alice_0002.jpg")
    assert ps.pairs[3] == (root / "Carol" / "Carol_0001.jpg", root / "Dave" / "Dave_0001.jpg")
    assert ps.unique_images == sorted({p for pair in ps.pairs for p in pair})
    assert len(ps.unique_images) == 6  # Alice 1,2; Bob 1,2; Carol 1; Dave 1
    assert [ps.unique_images[i] for i in ps.index_a] == [a for a, _ in ps.pairs]
    assert [ps.unique_images[i] for i in ps.index_b] == [b for _, b in ps.pairs]
    assert ps.index_a.dtype == np.int64
    np.testing.assert_array_equal(ps.fold_of_pair, [0, 0, 1, 1])
    np.testing.assert_array_equal(ps.lines, [2, 3, 4, 5])
    assert ps.source == tmp_path / "pairs.txt"


def test_dev_format_spaces_crlf_and_blank_lines(tmp_path, root):
    text = "2\r\nAlice 1 2\r\n\r\nBob  1   2\r\nAlice 3 Carol 1\r\nDave\t1\tBob\t2\r\n\r\n"
    ps = read_pairs(write(tmp_path, text, "pairsDevTest.txt"), root)
    assert (ps.folds, ps.per_fold, len(ps)) == (1, 4, 4)
    np.testing.assert_array_equal(ps.issame, [True, True, False, False])
    np.testing.assert_array_equal(ps.lines, [2, 4, 5, 6])  # physical line numbers
    np.testing.assert_array_equal(ps.fold_of_pair, [0, 0, 0, 0])


def test_symlink_inside_root_is_fine(tmp_path, root):
    store = root / "_store" / "Frank"
    store.mkdir(parents=True)
    (store / "Frank_0001.jpg").write_bytes(b"")
    (root / "Frank").symlink_to(store)
    link_root = tmp_path / "root_link"
    link_root.symlink_to(root)  # the root itself may be a symlink
    ps = read_pairs(write(tmp_path, "1\nAlice 1 2\nFrank 1 Bob 1\n"), link_root)
    assert ps.pairs[1][0] == link_root / "Frank" / "Frank_0001.jpg"


# --------------------------------------------------------------------------- find_image_root


@pytest.mark.parametrize("sub", ["lfw_funneled", "lfw", "lfw-deepfunneled"])
def test_find_image_root_subfolders(tmp_path, sub):
    (tmp_path / sub).mkdir()
    assert find_image_root(tmp_path) == tmp_path / sub


def test_find_image_root_order_and_self(tmp_path, root):
    for sub in ("lfw-deepfunneled", "lfw"):
        (tmp_path / sub).mkdir()
    assert find_image_root(tmp_path) == tmp_path / "lfw"
    (tmp_path / "lfw_funneled").mkdir()
    assert find_image_root(tmp_path) == tmp_path / "lfw_funneled"
    assert find_image_root(root) == root  # person folders directly inside


def test_find_image_root_errors(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError) as info:
        find_image_root(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "lfw_funneled/" in msg and "lfw-deepfunneled/" in msg
    with pytest.raises(UserError, match="not found"):
        find_image_root(tmp_path / "nope")


# --------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    "header", ["ten\t300", "10\t300\t5", "0", "2\t0", "-2\t1", "Alice\t1\t2", "2.0\t1"]
)
def test_malformed_header(tmp_path, root, header):
    text = header + "\n" + "\n".join(GOOD.splitlines()[1:]) + "\n"
    expect_error(write(tmp_path, text), root, 1, "header")


def test_header_on_a_later_line_after_blank_lines(tmp_path, root):
    expect_error(write(tmp_path, "\n\nbad header\n"), root, 3, "header")


def test_empty_file(tmp_path, root):
    expect_error(write(tmp_path, "\n \n"), root, 1, "empty")


def test_too_few_lines(tmp_path, root):
    text = "".join(GOOD.splitlines(keepends=True)[:-1])  # last pair line gone
    expect_error(write(tmp_path, text), root, 5, "ends after 3 pair lines", "4 pair lines")


def test_too_many_lines(tmp_path, root):
    expect_error(write(tmp_path, GOOD + "Alice\t2\t3\n"), root, 6, "extra line", "4 pair lines")


def test_matched_line_where_mismatched_expected(tmp_path, root):
    text = GOOD.replace("Alice\t1\tBob\t1", "Alice\t1\t3")
    expect_error(write(tmp_path, text), root, 3, "expected a mismatched pair", "fold 1")


def test_mismatched_line_where_matched_expected(tmp_path, root):
    text = GOOD.replace("Bob\t1\t2", "Bob\t1\tAlice\t2")
    expect_error(write(tmp_path, text), root, 4, "expected a matched pair", "fold 2")


@pytest.mark.parametrize(
    "bad, line",
    [("Alice\t1\t2\t3\t4", 2), ("Alice\t1", 2), ("Carol\t1\tDave\t1\t9", 5), ("Carol", 5)],
)
def test_wrong_number_of_fields(tmp_path, root, bad, line):
    old = GOOD.splitlines()[line - 1]
    expect_error(write(tmp_path, GOOD.replace(old, bad)), root, line, "wrong number of fields")


@pytest.mark.parametrize(
    "old, new, line",
    [
        ("Alice\t1\t2", "Alice\tone\t2", 2),
        ("Alice\t1\t2", "Alice\t1\t0", 2),
        ("Alice\t1\t2", "Alice\t-1\t2", 2),
        ("Alice\t1\t2", "Alice\t1.5\t2", 2),
        ("Carol\t1\tDave\t1", "Carol\t1\tDave\tx", 5),
        ("Carol\t1\tDave\t1", "Carol\t0\tDave\t1", 5),
    ],
)
def test_bad_image_numbers(tmp_path, root, old, new, line):
    expect_error(write(tmp_path, GOOD.replace(old, new)), root, line, "positive integer")


@pytest.mark.parametrize(
    "old, new, line",
    [
        ("Alice\t1\t2", "..\t1\t2", 2),
        ("Alice\t1\t2", "a..b\t1\t2", 2),
        ("Alice\t1\t2", "../Alice\t1\t2", 2),
        ("Alice\t1\tBob\t1", "Alice\t1\t/etc\t1", 3),
        ("Alice\t1\tBob\t1", "x/y\t1\tBob\t1", 3),
        ("Carol\t1\tDave\t1", "Carol\t1\tC:\\x\t1", 5),
        ("Bob\t1\t2", ".\t1\t2", 4),
    ],
)
def test_names_that_leave_the_root_are_refused(tmp_path, root, old, new, line):
    msg = expect_error(write(tmp_path, GOOD.replace(old, new)), root, line, "refusing", allow_missing=True)
    assert "outside the image root" in msg


def test_mismatched_pair_with_one_person(tmp_path, root):
    text = GOOD.replace("Carol\t1\tDave\t1", "Alice\t1\tAlice\t3")
    expect_error(write(tmp_path, text), root, 5, "two different people")


def test_not_utf8(tmp_path, root):
    p = tmp_path / "pairs.txt"
    p.write_bytes(b"2\t1\nAlice\t1\t2\n\xff\xfe\n")
    expect_error(p, root, 3, "UTF-8")


def test_missing_file_and_root(tmp_path, root):
    with pytest.raises(UserError, match="pairs file not found"):
        read_pairs(tmp_path / "nope.txt", root)
    with pytest.raises(UserError, match="image root not found"):
        read_pairs(write(tmp_path, GOOD), tmp_path / "no_images")


# --------------------------------------------------------------------------- missing images


MISSING = (
    "2\t2\n"
    "Alice\t1\t2\n"  # 2
    "Alice\t1\t9\n"  # 3: no such image
    "Alice\t1\tBob\t1\n"  # 4
    "Zed\t1\tBob\t1\n"  # 5: unknown person
    "Bob\t1\t2\n"  # 6
    "Alice\t2\t3\n"  # 7
    "Carol\t1\tDave\t1\n"  # 8
    "Carol\t1\tDave\t2\n"  # 9: no such image
)


def test_missing_images_are_an_error_by_default(tmp_path, root):
    msg = expect_error(write(tmp_path, MISSING), root, 3, "3 of 8 pairs", "line 5", "line 9")
    assert "Alice_0009.jpg: no such image" in msg
    assert "no folder 'Zed'" in msg


def test_missing_list_is_capped(tmp_path, root):
    lines = ["1\t7"] + [f"Alice\t1\t{10 + k}" for k in range(7)] + ["Alice\t1\tBob\t1"] * 7
    msg = expect_error(write(tmp_path, "\n".join(lines) + "\n"), root, 2, "7 of 14 pairs", "and 2 more")
    assert "line 6" in msg and "line 7 " not in msg


def test_allow_missing_drops_pairs_and_keeps_folds(tmp_path, root):
    ps = read_pairs(write(tmp_path, MISSING), root, allow_missing=True)
    assert ps.missing == 3 and len(ps) == 5 and ps.folds == 2 and ps.per_fold == 4
    np.testing.assert_array_equal(ps.lines, [2, 4, 6, 7, 8])
    np.testing.assert_array_equal(ps.fold_of_pair, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ps.issame, [True, False, True, True, False])
    assert len(ps.unique_images) == 7  # Alice 1,2,3; Bob 1,2; Carol 1; Dave 1
    assert all(p.is_file() for p in ps.unique_images)
    assert [ps.unique_images[i] for i in ps.index_b] == [b for _, b in ps.pairs]
    # the original folds survive: fold 0 keeps 2 pairs, fold 1 keeps 3 (5 is no multiple of 2)
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2])
    rep = verify(scores, ps.issame, folds=ps.folds, fold_of_pair=ps.fold_of_pair)
    assert rep.pairs == 5 and rep.accuracy == 1.0
    with pytest.raises(ValueError):
        verify(scores, ps.issame, folds=ps.folds)


def test_allow_missing_with_an_emptied_fold(tmp_path, root):
    text = "2\t1\nAlice\t1\t2\nAlice\t1\tBob\t1\nZed\t1\t2\nCarol\t1\tZed\t1\n"
    msg = expect_error(write(tmp_path, text), root, 4, "fold 2", allow_missing=True)
    assert "lines 4-5" in msg


def test_allow_missing_with_nothing_left(tmp_path, root):
    with pytest.raises(UserError, match="none of its 2 pairs"):
        read_pairs(write(tmp_path, "1\nZed 1 2\nZed 1 Bob 1\n"), root, allow_missing=True)


def test_symlinked_folder_leaving_the_root_is_refused(tmp_path, root):
    outside = tmp_path / "outside" / "Eve"
    outside.mkdir(parents=True)
    (outside / "Eve_0001.jpg").write_bytes(b"")
    (outside / "Eve_0002.jpg").write_bytes(b"")
    (root / "Eve").symlink_to(outside)
    text = "2\nAlice\t1\t2\nEve\t1\t2\nAlice\t1\tBob\t1\nCarol\t1\tDave\t1\n"
    msg = expect_error(write(tmp_path, text), root, 3, "outside the image root", allow_missing=True)
    assert "refusing" in msg


def test_symlinked_image_leaving_the_root_is_refused(tmp_path, root):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"")
    (root / "Bob" / "Bob_0003.jpg").symlink_to(secret)
    text = "1\nBob\t1\t3\nAlice\t1\tBob\t1\n"
    expect_error(write(tmp_path, text), root, 2, "outside the image root", allow_missing=True)


# --------------------------------------------------------------------------- real LFW files

needs_lfw = pytest.mark.skipif(
    not (SHARED_LFW / "pairs.txt").is_file(), reason=f"LFW protocol files not found in {SHARED_LFW}"
)


@pytest.fixture(scope="module")
def lfw_root() -> Path:
    return find_image_root(SHARED_LFW)


@needs_lfw
def test_real_pairs_txt(lfw_root):
    assert lfw_root == SHARED_LFW / "lfw-deepfunneled"
    ps = read_pairs(SHARED_LFW / "pairs.txt", lfw_root)
    assert len(ps) == 6000 and ps.folds == 10 and ps.per_fold == 600 and ps.missing == 0
    block = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    np.testing.assert_array_equal(ps.issame, np.tile(block, 10))
    np.testing.assert_array_equal(ps.fold_of_pair, np.repeat(np.arange(10), 600))
    np.testing.assert_array_equal(ps.lines, np.arange(2, 6002))
    assert len(ps.unique_images) == 7701
    assert all(p.is_file() for p in ps.unique_images)
    assert ps.pairs[0] == (
        lfw_root / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg",
        lfw_root / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg",
    )
    assert ps.pairs[300] == (
        lfw_root / "Abdel_Madi_Shabneh" / "Abdel_Madi_Shabneh_0001.jpg",
        lfw_root / "Dean_Barker" / "Dean_Barker_0001.jpg",
    )
    uniq = np.array([str(p) for p in ps.unique_images])
    assert (uniq[ps.index_a] == np.array([str(a) for a, _ in ps.pairs])).all()
    assert (uniq[ps.index_b] == np.array([str(b) for _, b in ps.pairs])).all()
    same_dir = np.array([a.parent == b.parent for a, b in ps.pairs])
    np.testing.assert_array_equal(same_dir, ps.issame)


@needs_lfw
@pytest.mark.parametrize("name, n", [("pairsDevTrain.txt", 2200), ("pairsDevTest.txt", 1000)])
def test_real_dev_files(lfw_root, name, n):
    ps = read_pairs(SHARED_LFW / name, lfw_root)
    assert len(ps) == n and ps.folds == 1 and ps.per_fold == n and ps.missing == 0
    np.testing.assert_array_equal(ps.issame, np.arange(n) < n // 2)
    assert all(os.path.isfile(p) for p in ps.unique_images)
