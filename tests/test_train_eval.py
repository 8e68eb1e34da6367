"""Training integration of the evaluation: View 1 threshold, View 2 report, best.pt, the demo."""

from __future__ import annotations

import json

import torch

from conftest import TINY_TRAIN_ARGS, cli


def test_train_ends_with_view1_threshold_and_view2_report(synth_root, tmp_path):
    ck = tmp_path / "ck"
    args = list(TINY_TRAIN_ARGS)
    args[args.index("--epochs") + 1] = "2"
    r = cli("train", "cosface", "--dataset-path", synth_root, "--checkpoints-dir", ck, "--run-name", "e", "--eval-every", "1", *args)
    assert r.exit_code == 0, r.output
    run = ck / "cosface" / "e"
    ev = json.loads((run / "evaluation.json").read_text())
    # View 1: threshold chosen on dev-train, accuracy on dev-test; View 2: the 10-fold protocol.
    assert 0.0 <= ev["view1"]["test_accuracy"] <= 1.0
    assert ev["view2"]["folds"] == 10 and len(ev["view2"]["fold_accuracies"]) == 10
    assert abs(ev["view2"]["accuracy"] - sum(ev["view2"]["fold_accuracies"]) / 10) < 1e-12
    for name in ("lfw_roc.png", "lfw_scores.png", "view1_threshold.png", "loss.png", "best.pt"):
        assert (run / name).is_file(), name
    latest = torch.load(run / "latest.pt", weights_only=True)
    assert latest["threshold"] == ev["view1"]["threshold"]
    # best.pt is chosen by View 1 dev-test accuracy, logged every epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dev = [rec["dev_accuracy"] for rec in records if "dev_accuracy" in rec]
    assert len(dev) == 2
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["best_dev_accuracy"] == max(dev)
    assert best["epoch"] == 1 + dev.index(max(dev))


def test_no_eval_writes_no_evaluation(synth_root, tmp_path):
    r = cli("train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path / "ck", "--run-name", "n", "--no-eval", *TINY_TRAIN_ARGS)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "ck" / "arcface" / "n" / "evaluation.json").exists()
    assert torch.load(tmp_path / "ck" / "arcface" / "n" / "latest.pt", weights_only=True)["threshold"] is None


def test_demo_prints_trained_and_untrained(tmp_path):
    r = cli(
        "demo", "--out", tmp_path / "demo", "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--workers", "0",
        "--identities", "8", "--test-identities", "20", "--images-per-identity", "4",
    )
    assert r.exit_code == 0, r.output
    assert "untrained" in r.output and "trained (arcface, 1 epochs)" in r.output
    assert "Held-out verification" in r.output
    assert (tmp_path / "demo" / "data" / "facecli-synth.json").is_file()
