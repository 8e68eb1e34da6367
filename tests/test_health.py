"""Collapse detection: embedding spread at each epoch end, one warning line, and bunched scores in evaluation."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from conftest import cli

from facecli.engine.health import bunched_scores_warning, sample_indices, spread_of, verdict


def test_spread_figures_and_verdict_on_known_embeddings():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40).repeat_interleave(2)
    centres = F.normalize(torch.randn(40, 64, generator=g), dim=1)
    healthy = F.normalize(centres[labels] + 0.05 * torch.randn(80, 64, generator=g), dim=1)
    s = spread_of(healthy, labels)
    assert abs(s.mean_cosine) < 0.1 and s.mean_norm < 0.3 and s.identity_gap > 0.5
    assert verdict(s) is None

    cone = F.normalize(torch.ones(80, 64) + 0.1 * torch.randn(80, 64, generator=g), dim=1)  # all near one direction
    s = spread_of(cone, labels)
    assert s.mean_cosine > 0.9 and s.mean_norm > 0.9
    assert "collapsed" in verdict(s) and "--lr" in verdict(s) and "\n" not in verdict(s)

    mixed = F.normalize(torch.randn(80, 64, generator=g), dim=1)  # spread, but identities not separated
    s = spread_of(mixed, labels)
    assert abs(s.identity_gap) < 0.05 and "do not separate identities" in verdict(s)


def test_the_sample_is_fixed_and_holds_same_identity_pairs():
    labels = np.repeat(np.arange(100), 3)
    a, b = sample_indices(labels, 0), sample_indices(labels, 0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == len(a) == 2 * 64 + 128
    pairs = labels[a[: 2 * 64]].reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all()
    assert not np.array_equal(a, sample_indices(labels, 1))


def test_bunched_scores_warning():
    assert bunched_scores_warning(0.6) is None
    text = bunched_scores_warning(0.988, np.linspace(0.97, 1.0, 50))
    assert "0.988" in text and "bunched" in text and "\n" not in text


def _run(synth_root, tmp_path, name, *args):
    base = [
        "train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path / "ck", "--run-name", name, "--no-eval",
        "--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "8", "--workers", "0", "--no-wandb",
        "--device", "cpu",
    ]  # fmt: skip
    result = cli(*base, *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "ck" / "arcface" / name
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch_loss"' in line]
    return " ".join(result.output.split()), epochs, run


def test_a_collapsing_run_warns_and_a_healthy_one_does_not(synth_root, synth_lfw_dir, tmp_path):
    # 8 epochs of 9 steps: the verdict starts once BatchNorm's running statistics are settled (50 steps)
    out, epochs, run = _run(synth_root, tmp_path, "collapse", "--lr", "100", "--warmup-epochs", "0", "--margin-warmup-epochs", "0")
    assert len(epochs) == 8 and all("spread/mean_cosine" in e and "spread/identity_gap" in e for e in epochs)
    assert "epoch 8: The embeddings have collapsed" in out and "Try a lower --lr" in out
    assert "epoch 5:" not in out  # no verdict before 50 steps
    assert epochs[-1]["spread/mean_cosine"] > 0.75
    result = cli("eval-lfw", run / "latest.pt", "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0 and "bunched" in " ".join(result.output.split()), result.output

    out, epochs, run = _run(synth_root, tmp_path, "healthy", "--lr", "0.05", "--scale", "30", "--margin", "0.3")
    assert "collapsed" not in out and "do not separate" not in out, out
    assert epochs[-1]["spread/mean_cosine"] < 0.5 and epochs[-1]["spread/identity_gap"] > 0.3
    assert "embedding mean cosine" in out
    result = cli("eval-lfw", run / "latest.pt", "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0 and "bunched" not in result.output, result.output


def test_a_narrow_cone_that_still_separates_identities_is_not_called_collapsed():
    """Early in a healthy run (the demo's first epoch: mean cosine 0.73, gap 0.21) the embedding is
    narrow but already verifies: no warning."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(40).repeat_interleave(2)
    centres = F.normalize(torch.randn(40, 64, generator=g), dim=1)
    narrow = F.normalize(torch.ones(64) / 8 + 0.5 * centres[labels] + 0.02 * torch.randn(80, 64, generator=g), dim=1)
    s = spread_of(narrow, labels)
    assert s.mean_cosine > 0.75 and s.identity_gap > 0.15, s
    assert verdict(s) is None
