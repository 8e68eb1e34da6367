"""The synthetic face set: layout, LFW protocol files, determinism, validation, difficulty."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecli.data import synth
from facecli.data.synth import CASIA_DIR, LFW_DIR, LFW_IMAGES, MARKER, generate_synthetic_set
from facecli.errors import UserError

SMALL = dict(identities=6, test_identities=20, images_per_identity=4, image_size=32, seed=0)
# 20 test people in 10 folds: 2 per fold, each with C(4, 2) = 6 matched pairs -> 12 per fold.
# View 1: round(20 * 4038 / 5749) = 14 DevTrain people (14 * 6 = 84 pairs), 6 DevTest (36 pairs).
FOLD_PAIRS, DEV_TRAIN, DEV_TEST = 12, 84, 36
REAL_LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"

NAME_RE = re.compile(r"^[A-Z][a-z]+_[A-Z][a-z]+$")


# --------------------------------------------------------------------------- independent parsers


def parse_pairs(text: str):
    """(folds, n, [[matched (name, i, j)], ...], [[mismatched (n1, i, n2, j)], ...]) per fold."""
    lines = text.split("\n")
    assert lines[-1] == "" and all(lines[:-1]), "LF-terminated, no blank lines"
    lines = lines[:-1]
    head = lines[0].split("\t")
    folds, n = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    assert len(lines) == 1 + folds * 2 * n
    matched, mismatched = [], []
    for f in range(folds):
        block = [ln.split("\t") for ln in lines[1 + f * 2 * n: 1 + (f + 1) * 2 * n]]
        assert all(len(r) == 3 for r in block[:n]) and all(len(r) == 4 for r in block[n:])
        matched.append([(r[0], int(r[1]), int(r[2])) for r in block[:n]])
        mismatched.append([(r[0], int(r[1]), r[2], int(r[3])) for r in block[n:]])
    return folds, n, matched, mismatched


def parse_people(text: str, folded: bool):
    """people.txt (folded) or peopleDev*.txt: a list of [(name, count)] per fold."""
    lines = text.rstrip("\n").split("\n")
    pos, groups = 0, []
    nfolds = int(lines[0]) if folded else 1
    pos = 1 if folded else 0
    for _ in range(nfolds):
        count = int(lines[pos])
        rows = [ln.split("\t") for ln in lines[pos + 1: pos + 1 + count]]
        assert all(len(r) == 2 for r in rows)
        groups.append([(r[0], int(r[1])) for r in rows])
        pos += 1 + count
    assert pos == len(lines)
    return groups


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    calls = []
    summary = generate_synthetic_set(out, progress=calls.append, **SMALL)
    return out, summary, calls


def lfw_text(out: Path, name: str) -> str:
    return (out / LFW_DIR / name).read_text(encoding="ascii")


# --------------------------------------------------------------------------- layout


def test_summary_counts_and_progress(small):
    out, s, calls = small
    assert (s.train_identities, s.train_images, s.test_identities, s.test_images) == (6, 24, 20, 80)
    assert (s.pairs_per_fold, s.dev_train_pairs, s.dev_test_pairs) == (FOLD_PAIRS, DEV_TRAIN, DEV_TEST)
    assert s.images == 104 and s.removed_stale == 0
    assert calls == [1] * 104  # once per image written
    assert s.train_dir == out / CASIA_DIR and s.lfw_images_dir == out / LFW_DIR / LFW_IMAGES
    assert s.pairs_file == out / LFW_DIR / "pairs.txt" and all(p.is_file() for p in s.protocol_files)
    assert s.marker_file == out / MARKER and not (out / synth.PARTIAL_MARKER).exists()
    marker = json.loads((out / MARKER).read_text())
    assert marker["generator"] == "facecli synth" and marker["identities"] == 6 and marker["seed"] == 0


def test_casia_layout(small):
    out, _, _ = small
    ids = sorted(p.name for p in (out / CASIA_DIR).iterdir())
    assert len(ids) == 6 and all(re.fullmatch(r"\d{7}", i) for i in ids)
    assert len(set(ids)) == 6 and ids == sorted(ids, key=int)
    for i in ids:
        files = sorted(p.name for p in (out / CASIA_DIR / i).iterdir())
        assert files == ["001.jpg", "002.jpg", "003.jpg", "004.jpg"]
    with Image.open(out / CASIA_DIR / ids[0] / "001.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
        assert "exif" not in im.info


def test_lfw_layout(small):
    out, _, _ = small
    lfw = out / LFW_DIR
    assert sorted(p.name for p in lfw.iterdir()) == sorted(
        [LFW_IMAGES, "pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt", "people.txt",
         "peopleDevTrain.txt", "peopleDevTest.txt", "lfw-names.txt"]
    )
    names = sorted(p.name for p in (lfw / LFW_IMAGES).iterdir())
    assert len(names) == 20 and all(NAME_RE.match(n) for n in names)
    assert len({n.lower() for n in names}) == 20
    for n in names:
        assert sorted(p.name for p in (lfw / LFW_IMAGES / n).iterdir()) == [f"{n}_{k:04d}.jpg" for k in range(1, 5)]
    with Image.open(lfw / LFW_IMAGES / names[0] / f"{names[0]}_0001.jpg") as im:
        assert (im.format, im.size) == ("JPEG", (32, 32))
    # lfw-names.txt: every person once, sorted, with the image count
    assert lfw_text(out, "lfw-names.txt") == "".join(f"{n}\t4\n" for n in names)


def test_test_identities_are_not_training_identities(small):
    out, _, _ = small
    train = {p.name for p in (out / CASIA_DIR).iterdir()}
    test = {p.name for p in (out / LFW_DIR / LFW_IMAGES).iterdir()}
    assert not train & test
    train_imgs = {hashlib.sha256(p.read_bytes()).digest() for p in (out / CASIA_DIR).rglob("*.jpg")}
    test_imgs = {hashlib.sha256(p.read_bytes()).digest() for p in (out / LFW_DIR).rglob("*.jpg")}
    assert len(train_imgs) == 24 and len(test_imgs) == 80 and not train_imgs & test_imgs
    # different people, not just different folders: the drawn appearances differ
    assert synth.identity_params(0, synth._TRAIN, 0) != synth.identity_params(0, synth._TEST, 0)


# --------------------------------------------------------------------------- protocol files


def test_pairs_txt(small):
    out, _, _ = small
    people = {p.name for p in (out / LFW_DIR / LFW_IMAGES).iterdir()}
    text = lfw_text(out, "pairs.txt")
    assert text.startswith(f"10\t{FOLD_PAIRS}\n")
    folds, n, matched, mismatched = parse_pairs(text)
    assert (folds, n) == (10, FOLD_PAIRS)
    fold_people = [parse_people(lfw_text(out, "people.txt"), folded=True)[f] for f in range(10)]
    all_matched = [m for fold in matched for m in fold]
    assert len(set(all_matched)) == 10 * FOLD_PAIRS  # matched pairs distinct within the file
    assert len({m for fold in mismatched for m in fold}) == 10 * FOLD_PAIRS
    seen: set[str] = set()
    for f in range(10):
        used = set()
        for name, i, j in matched[f]:
            assert name in people and 1 <= i < j <= 4
            used.add(name)
        for a, i, b, j in mismatched[f]:
            assert a in people and b in people and a < b  # fixed (name) order, two people
            assert 1 <= i <= 4 and 1 <= j <= 4
            used |= {a, b}
        assert matched[f] == sorted(matched[f]) and mismatched[f] == sorted(mismatched[f])
        assert used <= {name for name, _ in fold_people[f]}  # a fold's pairs use its own people
        assert not used & seen  # folds' people are disjoint
        seen |= used


def test_people_txt(small):
    out, _, _ = small
    text = lfw_text(out, "people.txt")
    assert text.startswith("10\n2\n")
    folds = parse_people(text, folded=True)
    assert [len(f) for f in folds] == [2] * 10
    names = [n for f in folds for n, _ in f]
    assert sorted(names) == sorted(p.name for p in (out / LFW_DIR / LFW_IMAGES).iterdir())
    assert all(c == 4 for f in folds for _, c in f)
    assert all([n for n, _ in f] == sorted(n for n, _ in f) for f in folds)


def test_view1_dev_files(small):
    out, _, _ = small
    groups = {}
    for part, n_pairs, n_people in (("Train", DEV_TRAIN, 14), ("Test", DEV_TEST, 6)):
        text = lfw_text(out, f"pairsDev{part}.txt")
        assert text.startswith(f"{n_pairs}\n")
        folds, n, matched, mismatched = parse_pairs(text)
        assert (folds, n) == (1, n_pairs)
        (people,) = parse_people(lfw_text(out, f"peopleDev{part}.txt"), folded=False)
        assert len(people) == n_people and all(c == 4 for _, c in people)
        names = {p for p, _ in people}
        assert len(set(matched[0])) == n_pairs and len(set(mismatched[0])) == n_pairs
        assert all(p in names and 1 <= i < j <= 4 for p, i, j in matched[0])
        assert all(a in names and b in names and a < b for a, _, b, _ in mismatched[0])
        groups[part] = names
    assert not groups["Train"] & groups["Test"]
    assert len(groups["Train"] | groups["Test"]) == 20


def test_pairs_read_by_facecli_reader(small):
    from facecli.data.lfw import find_image_root, read_pairs

    out, _, _ = small
    root = find_image_root(out / LFW_DIR)
    assert root == out / LFW_DIR / LFW_IMAGES
    ps = read_pairs(out / LFW_DIR / "pairs.txt", root)
    assert (len(ps), ps.folds, ps.missing) == (10 * 2 * FOLD_PAIRS, 10, 0)
    assert int(ps.issame.sum()) == 10 * FOLD_PAIRS


def test_unrank_pairs_is_colex_order():
    a, b = synth._unrank_pairs(np.arange(6))
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    m = 3000  # large ranks, where float sqrt needs the integer correction
    r = np.arange(m * (m - 1) // 2 - 5000, m * (m - 1) // 2)
    a, b = synth._unrank_pairs(r)
    assert np.all(b * (b - 1) // 2 + a == r) and np.all((0 <= a) & (a < b) & (b < m))


def test_names_stable_and_unique():
    names = synth.lfw_names(500, seed=3)
    assert len({n.lower() for n in names}) == 500 and all(NAME_RE.match(n) for n in names)
    assert synth.lfw_names(40, seed=3) == names[:40]  # person k's name does not depend on the count
    assert synth.lfw_names(40, seed=4) != names[:40]
    ids = synth.casia_ids(1000, seed=0)
    assert ids == sorted(ids) and len(set(ids)) == 1000 and all(len(i) == 7 for i in ids)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(small, tmp_path):
    out, _, _ = small
    again = generate_synthetic_set(tmp_path / "again", **SMALL)
    assert tree_hashes(out) == tree_hashes(again.out_dir)


def test_other_seed_other_set(small, tmp_path):
    out, _, _ = small
    other = generate_synthetic_set(tmp_path / "other", **{**SMALL, "seed": 1})
    a = {h for k, h in tree_hashes(out).items() if k.endswith(".jpg")}
    b = {h for k, h in tree_hashes(other.out_dir).items() if k.endswith(".jpg")}
    assert len(a) == len(b) == 104 and not a & b
    assert lfw_text(out, "lfw-names.txt") != (other.lfw_dir / "lfw-names.txt").read_text()


def test_images_do_not_depend_on_set_size(small, tmp_path):
    out, _, _ = small
    sub = generate_synthetic_set(tmp_path / "sub", identities=2, test_identities=20, images_per_identity=2,
                                 image_size=32, seed=0)
    big, little = tree_hashes(out), tree_hashes(sub.out_dir)
    jpgs = [k for k in little if k.endswith(".jpg")]
    assert len(jpgs) == 2 * 2 + 20 * 2
    assert all(big[k] == little[k] for k in jpgs)


def test_rerun_overwrites_and_prunes_only_its_own_files(tmp_path):
    out = tmp_path / "set"
    args = dict(SMALL, identities=3, images_per_identity=3)
    first = generate_synthetic_set(out, **args)
    before = tree_hashes(out)
    foreign = out / CASIA_DIR / "notes.txt"
    foreign.write_text("mine")
    again = generate_synthetic_set(out, **args)
    after = tree_hashes(out)
    assert after.pop(f"{CASIA_DIR}/notes.txt") and after == before and again.removed_stale == 0
    smaller = generate_synthetic_set(out, **dict(args, identities=2, images_per_identity=2))
    # 1 identity x 3 images + 2 x 1 extra image in training, 20 x 1 extra image in LFW
    assert smaller.removed_stale == 3 + 2 + 20
    assert len(list((out / CASIA_DIR).glob("*/*.jpg"))) == 4
    assert len(list((out / LFW_DIR / LFW_IMAGES).glob("*/*.jpg"))) == 40
    assert foreign.read_text() == "mine"
    fresh = generate_synthetic_set(tmp_path / "fresh", **dict(args, identities=2, images_per_identity=2))
    mine = {k: v for k, v in tree_hashes(out).items() if k != f"{CASIA_DIR}/notes.txt"}
    assert mine == tree_hashes(fresh.out_dir)
    assert first.train_dir == smaller.train_dir


def test_interrupted_run_is_marked_incomplete_and_can_be_resumed(tmp_path):
    out = tmp_path / "set"

    seen = []

    def stop_after_ten(advance):
        seen.append(advance)
        if len(seen) == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_set(out, progress=stop_after_ten, **SMALL)
    assert not (out / MARKER).exists() and (out / synth.PARTIAL_MARKER).is_file()
    done = generate_synthetic_set(out, **SMALL)  # the partial marker proves the folders are ours
    assert (out / MARKER).is_file() and not (out / synth.PARTIAL_MARKER).exists()
    fresh = generate_synthetic_set(tmp_path / "fresh", **SMALL)
    assert tree_hashes(done.out_dir) == tree_hashes(fresh.out_dir)


def test_refuses_file_and_foreign_data(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        generate_synthetic_set(f, **SMALL)
    real = tmp_path / "real"
    (real / CASIA_DIR / "0000045").mkdir(parents=True)
    (real / CASIA_DIR / "0000045" / "001.jpg").write_bytes(b"someone's data")
    with pytest.raises(UserError, match="not written by 'facecli synth'"):
        generate_synthetic_set(real, **SMALL)
    assert (real / CASIA_DIR / "0000045" / "001.jpg").read_bytes() == b"someone's data"
    assert not (real / MARKER).exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"identities": 1}, "--identities must be at least 2"),
        ({"identities": True}, "--identities must be an integer"),
        ({"identities": 2.5}, "--identities must be an integer"),
        ({"test_identities": 19}, "--test-identities must be at least 20"),
        ({"images_per_identity": 1}, "--images-per-identity must be at least 2"),
        ({"image_size": 15}, "--image-size must be at least 16"),
        ({"seed": -1}, "--seed must be at least 0"),
        ({"pairs_per_fold": 0}, "--pairs-per-fold must be at least 1"),
        ({"pairs_per_fold": FOLD_PAIRS + 1}, f"between 1 and {FOLD_PAIRS}"),
    ],
)
def test_argument_errors_write_nothing(tmp_path, override, message):
    out = tmp_path / "set"
    with pytest.raises(UserError, match=re.escape(message)):
        generate_synthetic_set(out, **{**SMALL, **override})
    assert not out.exists()


def test_explicit_pairs_per_fold(tmp_path):
    s = generate_synthetic_set(tmp_path / "set", **{**SMALL, "identities": 2, "images_per_identity": 2,
                                                    "pairs_per_fold": 1})
    # 2 images: one matched pair per person, 2 per fold at most; asked for 1
    folds, n, matched, _ = parse_pairs(s.pairs_file.read_text())
    assert (folds, n, s.pairs_per_fold) == (10, 1, 1) and all(m[0][1:] == (1, 2) for m in matched)


# --------------------------------------------------------------------------- difficulty


def test_learnable_but_not_trivial_on_raw_pixels(small):
    """Same-person images are closer in pixels on average, but pixels do not identify people."""
    out, _, _ = small
    x, y = [], []
    for c, d in enumerate(sorted((out / LFW_DIR / LFW_IMAGES).iterdir())):
        for f in sorted(d.iterdir()):
            with Image.open(f) as im:
                x.append(np.asarray(im, dtype=np.float64).ravel())
            y.append(c)
    x, y = np.stack(x), np.array(y)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None]
    assert dist[same].mean() < 0.95 * dist[diff].mean()  # identity is there
    assert dist[same].max() > dist[diff].min()  # distributions overlap
    np.fill_diagonal(dist, np.inf)
    nn_accuracy = (y[dist.argmin(1)] == y).mean()
    assert 1 / 20 < nn_accuracy < 0.5  # better than chance, far from solved (seed 0: 0.21)


# --------------------------------------------------------------------------- against the real LFW files


@pytest.mark.skipif(not (REAL_LFW / "pairs.txt").is_file(), reason="real LFW protocol files not in ../shared/data")
def test_same_formats_as_real_lfw(small):
    """The parsers above accept the real files, and both sets share header shapes and field order."""
    out, _, _ = small
    for name, folded in (("people.txt", True), ("peopleDevTrain.txt", False), ("peopleDevTest.txt", False)):
        real = parse_people((REAL_LFW / name).read_text(encoding="ascii"), folded)
        ours = parse_people(lfw_text(out, name), folded)
        assert len(real) == len(ours)
    for name, folds, n in (("pairs.txt", 10, 300), ("pairsDevTrain.txt", 1, 1100), ("pairsDevTest.txt", 1, 500)):
        rf, rn, rm, rmm = parse_pairs((REAL_LFW / name).read_text(encoding="ascii"))
        assert (rf, rn) == (folds, n)
        assert all(a < b for fold in rmm for a, _, b, _ in fold)  # the real files also order mismatched names
        of, _, _, _ = parse_pairs(lfw_text(out, name))
        assert of == folds
