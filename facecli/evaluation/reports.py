"""What people look at: rich tables of verification figures, and PNG pictures.

Pictures: the ROC curve (log-scale false-accept axis, as face papers draw it), the
histogram of same/different scores with the chosen threshold, and accuracy versus
threshold. matplotlib runs headless (Agg); it is imported only when a picture is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def verification_table(report, title: str = "LFW verification (10-fold)") -> Table:
    t = Table(title=title)
    t.add_column("fold", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_column("threshold", justify="right")
    for i, (acc, thr) in enumerate(zip(report.fold_accuracies, report.fold_thresholds), 1):
        t.add_row(str(i), _pct(acc), f"{thr:.4f}")
    t.add_section()
    t.add_row("mean ± std", f"{100 * report.accuracy:.2f} ± {100 * report.accuracy_std:.2f}%", "")
    t.add_row("AUC", f"{report.auc:.4f}" if np.isfinite(report.auc) else "n/a", "")
    t.add_row("EER", _pct(report.eer), "")
    for far in sorted(report.tar_at_far):
        t.add_row(f"TAR@FAR={far:g}", _pct(report.tar_at_far[far]), "")
    return t


def summary_table(rows: Sequence[tuple[str, object]], title: str) -> Table:
    """One row per evaluated set: name, accuracy ± std, AUC, EER, TAR@FAR=1e-3, pairs."""
    t = Table(title=title)
    for col in ("set", "accuracy", "AUC", "EER", "TAR@FAR=1e-3", "pairs"):
        t.add_column(col, justify="left" if col == "set" else "right")
    for name, r in rows:
        t.add_row(
            name,
            f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}%",
            f"{r.auc:.4f}" if np.isfinite(r.auc) else "n/a",
            _pct(r.eer),
            _pct(r.tar_at_far.get(1e-3)),
            str(int(getattr(r, "pairs", 0))),
        )
    return t


def threshold_table(candidates: np.ndarray, accuracies: np.ndarray, chosen: float, rows: int = 11) -> Table:
    """Accuracy at evenly spread thresholds around the chosen one (the curve, in text)."""
    t = Table(title="Accuracy versus threshold (View 1 training pairs)")
    t.add_column("threshold", justify="right")
    t.add_column("accuracy", justify="right")
    finite = np.isfinite(candidates)
    c, a = candidates[finite], accuracies[finite]
    if len(c) == 0:
        return t
    lo, hi = np.quantile(c, [0.02, 0.98])
    picks = np.unique(np.searchsorted(c, np.linspace(lo, hi, rows)).clip(0, len(c) - 1))
    for i in picks:
        mark = " ◀" if abs(c[i] - chosen) < 1e-12 else ""
        t.add_row(f"{c[i]:.4f}", f"{100 * a[i]:.2f}%{mark}")
    j = int(np.argmin(np.abs(c - chosen)))
    t.add_section()
    t.add_row(f"{chosen:.4f} (chosen)", f"{100 * a[j]:.2f}%")
    return t


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_roc(report, path: Path, title: str = "ROC") -> Path:
    return _save_log_roc(report.roc[0], report.roc[1], 1e-4, f"{title}: AUC {report.auc:.4f}, EER {100 * report.eer:.2f}%", path)


def _save_log_roc(fpr: np.ndarray, tpr: np.ndarray, lowest_far: float, title: str, path: Path) -> Path:
    """An ROC on a log-FAR axis from ``lowest_far`` to 1 (FARs below it drawn at its edge)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(np.clip(fpr, lowest_far / 10, 1), tpr, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(lowest_far, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, path)


def ijb_table(report) -> Table:
    """TAR at each FAR of the IJB protocol, and the AUC."""
    d = report.to_dict()
    t = Table(title=f"{report.target} 1:1 template verification: {d['pairs']:,} pairs ({d['genuine_pairs']:,} genuine), {d['templates']:,} templates")
    t.add_column("FAR", justify="right")
    t.add_column("TAR", justify="right")
    for far, tar in report.tar_at_far.items():
        short = " (fewer impostor pairs than 1/FAR)" if d["impostor_pairs"] * far < 1 else ""
        t.add_row(f"{far:g}", _pct(tar) + short)
    t.add_section()
    t.add_row("AUC", f"{report.auc:.6f}")
    return t


def save_ijb_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path, title: str) -> Path:
    """The IJB ROC on a log-FAR axis from 1e-6, as the IJB papers draw it."""
    return _save_log_roc(fpr, tpr, 1e-6, f"{title}: AUC {auc:.4f}", path)


def save_histogram(scores: np.ndarray, issame: np.ndarray, path: Path, threshold: float | None = None, title: str = "Scores") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    bins = np.linspace(float(np.min(scores)), float(np.max(scores)) + 1e-9, 60)
    ax.hist(scores[issame], bins=bins, alpha=0.6, label="same person")
    ax.hist(scores[~issame], bins=bins, alpha=0.6, label="different people")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def save_threshold_curve(candidates: np.ndarray, accuracies: np.ndarray, chosen: float, path: Path) -> Path:
    """Accuracy against the threshold, over the range the scores use (the outermost candidates
    lie 1 beyond the scores: cosines would otherwise span -2..2)."""
    plt = _plt()
    finite = np.isfinite(candidates)
    lo, hi = threshold_axis(candidates)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(np.clip(candidates[finite], lo, hi), accuracies[finite], lw=1.2)
    ax.set_xlim(lo, hi)
    ax.axvline(chosen, color="k", ls="--", lw=1, label=f"chosen {chosen:.3f}")
    ax.set_xlabel("threshold (same iff score >= t)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy versus threshold")
    ax.legend()
    return _save(plt, fig, path)


def threshold_axis(candidates: np.ndarray) -> tuple[float, float]:
    """[-1, 1] when the scores are cosines, else the scores' own range."""
    inner = candidates[1:-1][np.isfinite(candidates[1:-1])]
    if inner.size == 0 or (inner.min() >= -1.0 and inner.max() <= 1.0):
        return -1.0, 1.0
    return float(inner.min()), float(inner.max())


def save_loss_curve(metrics_jsonl: Path, path: Path) -> Path | None:
    """Training loss per logged step, from a run's metrics.jsonl."""
    import json

    steps, losses = [], []
    try:
        for line in Path(metrics_jsonl).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("loss") is not None and "step" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    except (OSError, ValueError):
        return None
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    return _save(plt, fig, path)
