"""Real faces: train on AT&T (ORL) people s1-s30, verify on the unseen people s31-s40.

A model trained with the facecli CLI must tell the 10 held-out people apart better than

* the same network untrained (same architecture, same seed: the Trainer's initial weights),
* eigenfaces: PCA fitted on the 300 training images (92x112 grey pixels, mean-centred,
  40 components), cosine similarity of the coefficients,

on 900 LFW-style pairs (all 450 same-person pairs of s31-s40 and 450 different-person
pairs), scored by the 10-fold protocol of ``facecli.evaluation.verify``.

Skips when ../shared/data/att_faces is absent. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import torch
from PIL import Image

from conftest import ATT_DIR, cli, requires_shared

pytestmark = requires_shared(ATT_DIR)

TRAIN_PEOPLE = [f"s{i}" for i in range(1, 31)]
TEST_PEOPLE = [f"s{i}" for i in range(31, 41)]
IMAGES = range(1, 11)
PCA_COMPONENTS = 40
# Chosen by trying (about 40 s of one CPU core). AdamW converges in a few epochs on 300
# images; a 64-d embedding, dropout 0.5 and weight decay 0.1 keep 30 identities from being
# memorised (held-out accuracy 86-88% over seeds 0-3, against 85-87% without them).
TRAIN_ARGS = [
    "--backbone", "resnet18", "--image-size", "48", "--epochs", "10", "--batch-size", "16",
    "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.1", "--dropout", "0.5",
    "--embedding-dim", "64", "--scale", "30", "--seed", "0",
    "--workers", "0", "--device", "cpu", "--no-wandb", "--no-eval",
]


def held_out_pairs(seed: int = 0):
    """(test image paths, index_a, index_b, issame) for 900 pairs in 10 folds of 45 + 45.

    Fold f is 45 same-person pairs then 45 different-person pairs (the LFW pairs.txt
    layout), each drawn from a fixed shuffle, so every fold mixes all ten people.
    """
    paths = [ATT_DIR / person / f"{i}.pgm" for person in TEST_PEOPLE for i in IMAGES]
    index = {(p.parent.name, p.name): k for k, p in enumerate(paths)}
    rng = np.random.default_rng(seed)
    same = [((p, f"{i}.pgm"), (p, f"{j}.pgm")) for p in TEST_PEOPLE for i, j in itertools.combinations(IMAGES, 2)]
    different: set = set()
    while len(different) < len(same):
        a, b = rng.choice(len(TEST_PEOPLE), 2, replace=False)
        i, j = rng.integers(1, 11, 2)
        # unordered: (x, y) and (y, x) are the same pair
        different.add(tuple(sorted(((TEST_PEOPLE[a], f"{i}.pgm"), (TEST_PEOPLE[b], f"{j}.pgm")))))
    different = sorted(different)
    rng.shuffle(same)
    rng.shuffle(different)
    pairs, issame = [], []
    for f in range(10):
        pairs += same[45 * f : 45 * (f + 1)] + different[45 * f : 45 * (f + 1)]
        issame += [True] * 45 + [False] * 45
    ia = np.array([index[a] for a, _ in pairs])
    ib = np.array([index[b] for _, b in pairs])
    return paths, ia, ib, np.array(issame)


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64).reshape(-1) for p in paths])


def eigenface_scores(test_paths, ia, ib, k: int = PCA_COMPONENTS) -> np.ndarray:
    train = _pixels([ATT_DIR / person / f"{i}.pgm" for person in TRAIN_PEOPLE for i in IMAGES])
    assert train.shape == (300, 92 * 112)
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    coeff = (_pixels(test_paths) - mean) @ vt[:k].T
    coeff /= np.linalg.norm(coeff, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", coeff[ia], coeff[ib])


def network_scores(net, preprocess, test_paths, ia, ib) -> np.ndarray:
    from facecli.evaluation.embedding import embed_paths, pair_scores

    emb = embed_paths(net, preprocess, test_paths, "cpu", flip=True)
    assert not emb.bad
    return pair_scores(emb.vectors, ia, ib)


def test_pairs_are_held_out_and_balanced():
    paths, ia, ib, issame = held_out_pairs()
    assert len(issame) == 900 and issame.sum() == 450
    assert all(p.parent.name in TEST_PEOPLE for p in paths)
    for f in range(10):  # every fold: 45 same then 45 different
        assert issame[90 * f : 90 * f + 45].all() and not issame[90 * f + 45 : 90 * (f + 1)].any()
    who = np.array([p.parent.name for p in paths])
    assert (who[ia] == who[ib]).tolist() == issame.tolist()
    assert len({tuple(sorted(x)) for x in zip(ia.tolist(), ib.tolist())}) == 900  # no pair twice
    assert np.array_equal(held_out_pairs()[1], ia)  # fixed seed, same pairs every run


def test_trained_model_beats_untrained_network_and_eigenfaces(tmp_path):
    from facecli.models import load_model
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer
    from facecli.evaluation import verify

    people = tmp_path / "s1-s30.txt"
    people.write_text("".join(f"{p}\n" for p in TRAIN_PEOPLE))
    ck = tmp_path / "ck"
    result = cli(
        "train", "cosface", "--train-dir", ATT_DIR, "--identities", people, "--checkpoints-dir", ck, "--run-name", "att", *TRAIN_ARGS
    )
    assert result.exit_code == 0, result.output
    run = ck / "cosface" / "att"
    config = json.loads((run / "config.json").read_text())
    assert config["images"] == 300 and config["classes"] == 30
    checkpoint = run / "latest.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["classes"] == TRAIN_PEOPLE  # s31-s40 never reached training

    paths, ia, ib, issame = held_out_pairs()
    trained = load_model(checkpoint, device="cpu")
    acc_trained = verify(network_scores(trained.net, trained.preprocess, paths, ia, ib), issame).accuracy

    # The untrained network: what the same configuration builds before its first step.
    untrained = Trainer(TrainConfig.from_dict(ckpt["train_config"], checkpoints_dir=str(tmp_path / "untrained")))
    untrained.tracker.close()
    assert untrained.step == 0
    acc_untrained = verify(network_scores(untrained.net, untrained.preprocess, paths, ia, ib), issame).accuracy

    acc_pca = verify(eigenface_scores(paths, ia, ib), issame).accuracy

    print(
        f"\nAT&T s31-s40, 900 pairs, 10-fold accuracy: trained {100 * acc_trained:.2f}%, "
        f"untrained {100 * acc_untrained:.2f}%, eigenfaces (k={PCA_COMPONENTS}) {100 * acc_pca:.2f}%"
    )
    assert acc_trained > acc_untrained
    assert acc_trained > acc_pca
