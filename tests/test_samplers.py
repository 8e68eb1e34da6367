"""Batch samplers: order is a pure function of (seed, epoch, batch); resume skips exactly;
N processes see the global batch of one process; FaceNet batches are P identities x K images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from facecli.data.samplers import PKBatchSampler, ShuffledBatchSampler
from facecli.errors import UserError

# The tiny synthetic training set's layout: 12 identities x 6 images.
TINY_LABELS = np.repeat(np.arange(12), 6)


def epoch_batches(sampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    return [list(b) for b in sampler]


# ----------------------------------------------------------------- ShuffledBatchSampler
def test_shuffled_same_seed_and_epoch_give_same_order_other_epochs_and_seeds_differ():
    a = ShuffledBatchSampler(100, 8, seed=3)
    b = ShuffledBatchSampler(100, 8, seed=3)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)
    # Order does not depend on what was iterated before (pure function of seed, epoch).
    assert epoch_batches(a, 0) == epoch_batches(ShuffledBatchSampler(100, 8, seed=3), 0)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(a, 0) != epoch_batches(ShuffledBatchSampler(100, 8, seed=4), 0)


def test_shuffled_epoch_is_a_permutation_without_repeats_and_drops_the_short_batch():
    s = ShuffledBatchSampler(100, 8, seed=0)
    batches = epoch_batches(s, 0)
    assert s.batches_per_epoch() == 12 and len(s) == 12 and len(batches) == 12
    assert all(len(b) == 8 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 96 and all(0 <= i < 100 for i in flat)
    assert flat != sorted(flat)  # shuffled


@pytest.mark.parametrize("start", [1, 5, 11, 12])
def test_shuffled_start_batch_yields_the_tail_of_the_full_epoch(start):
    s = ShuffledBatchSampler(100, 8, seed=7)
    full = epoch_batches(s, 2)
    tail = epoch_batches(s, 2, start)
    assert tail == full[start:]
    assert len(s) == 12 - start


@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffled_rank_slices_concatenate_to_the_single_process_global_batch(world_size):
    bs = 4
    single = ShuffledBatchSampler(100, bs * world_size, seed=5)
    ranks = [ShuffledBatchSampler(100, bs, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch, start in [(0, 0), (1, 2)]:
        per_rank = [epoch_batches(r, epoch, start) for r in ranks]
        assert all(len(p) == len(per_rank[0]) for p in per_rank)
        joined = [sum((p[b] for p in per_rank), []) for b in range(len(per_rank[0]))]
        assert joined == epoch_batches(single, epoch, start)
        # no sample is seen by two ranks in one step
        assert all(len(set(b)) == len(b) for b in joined)


def test_shuffled_batch_larger_than_data_is_one_clear_error():
    with pytest.raises(UserError, match="exceeds the 10 training images"):
        ShuffledBatchSampler(10, 16)
    with pytest.raises(UserError, match="2 process"):
        ShuffledBatchSampler(10, 6, rank=0, world_size=2)


# ----------------------------------------------------------------- PKBatchSampler
def test_pk_tiny_set_batch16_is_4_identities_x_4_images():
    """FaceNet's default training batch on the test set: 16 = P4 x K4 from 12 ids x 6 images."""
    s = PKBatchSampler(TINY_LABELS, 16, k=4, seed=0)
    assert s.batches_per_epoch() == 72 // 16
    for epoch in range(3):
        batches = epoch_batches(s, epoch)
        assert len(batches) == 4
        for b in batches:
            assert len(b) == 16
            counts = Counter(int(TINY_LABELS[i]) for i in b)
            assert len(counts) == 4 and set(counts.values()) == {4}
            assert len(set(b)) == 16  # 6 images >= K: drawn without replacement


def test_pk_identities_are_used_evenly_across_an_epoch():
    labels = np.repeat(np.arange(8), 5)
    s = PKBatchSampler(labels, 8, k=2, seed=1)  # 4 identities per batch, 5 batches per epoch
    seen = Counter(int(labels[b[0]]) for b in [batch[j : j + 2] for batch in epoch_batches(s, 0) for j in range(0, 8, 2)])
    # 20 identity slots over 8 identities from a refilled queue: nobody used more than once above the others
    assert max(seen.values()) - min(seen.values()) <= 1 and len(seen) == 8


def test_pk_small_identities_are_sampled_with_replacement_and_singletons_never():
    # identity 0 has a single image (useless for triplets), identity 1 has 2 (< K=3)
    labels = np.array([0] + [1] * 2 + [2] * 6 + [3] * 6 + [4] * 6)
    s = PKBatchSampler(labels, 6, k=3, seed=0)
    used = Counter()
    for epoch in range(10):
        for b in epoch_batches(s, epoch):
            counts = Counter(int(labels[i]) for i in b)
            assert set(counts.values()) == {3} and len(counts) == 2
            used.update(counts.keys())
    assert 0 not in used
    assert used[1] > 0  # the 2-image identity is still used (drawn with replacement)


def test_pk_determinism_and_start_batch():
    a = PKBatchSampler(TINY_LABELS, 8, k=2, seed=11)
    b = PKBatchSampler(TINY_LABELS, 8, k=2, seed=11)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    assert epoch_batches(a, 3) != epoch_batches(PKBatchSampler(TINY_LABELS, 8, k=2, seed=12), 3)
    full = epoch_batches(a, 3)
    assert len(full) == 9
    for start in (1, 4, 8):
        assert epoch_batches(a, 3, start) == full[start:]
        assert len(a) == 9 - start


def test_pk_rank_slices_concatenate_to_the_single_process_global_batch():
    bs, k = 8, 4
    single = PKBatchSampler(TINY_LABELS, 2 * bs, k=k, seed=2)
    ranks = [PKBatchSampler(TINY_LABELS, bs, k=k, seed=2, rank=r, world_size=2) for r in range(2)]
    for epoch, start in [(0, 0), (1, 1)]:
        r0, r1 = (epoch_batches(r, epoch, start) for r in ranks)
        assert [x + y for x, y in zip(r0, r1)] == epoch_batches(single, epoch, start)
        for x, y in zip(r0, r1):
            # each rank holds whole identities (P x K on its own), different from the other rank's
            cx, cy = Counter(int(TINY_LABELS[i]) for i in x), Counter(int(TINY_LABELS[i]) for i in y)
            assert set(cx.values()) == {k} and set(cy.values()) == {k} and not set(cx) & set(cy)


@pytest.mark.parametrize(
    "labels, batch, k, world, message",
    [
        (TINY_LABELS, 16, 1, 1, "at least 2"),
        (TINY_LABELS, 18, 4, 1, "multiple of --images-per-identity 4"),
        (TINY_LABELS, 4, 4, 1, "at least 2 identities"),
        (np.repeat(np.arange(3), 6), 16, 4, 1, "needs 4 identities"),
        (TINY_LABELS, 16, 4, 4, "needs 16 identities"),
        (np.array([0, 1, 2, 3, 3, 4]), 4, 2, 1, "data has 1"),  # singletons do not count
    ],
)
def test_pk_impossible_sizes_are_one_clear_error(labels, batch, k, world, message):
    with pytest.raises(UserError, match=message):
        PKBatchSampler(labels, batch, k=k, seed=0, rank=0, world_size=world)
