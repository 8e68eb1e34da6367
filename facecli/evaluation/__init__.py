"""Verification evaluation: the LFW protocol, embedding each image once, reports.

Public API::

    from facecli.evaluation import verify
    report = verify(scores, issame, folds=10)   # pure numpy, the LFW 10-fold protocol
    report.accuracy, report.accuracy_std, report.auc, report.eer, report.tar_at_far[1e-3]
"""

from facecli.evaluation.protocol import (
    Roc,
    VerificationReport,
    best_threshold,
    roc_curve,
    threshold_curve,
    verify,
)

__all__ = [
    "Roc",
    "VerificationReport",
    "best_threshold",
    "roc_curve",
    "threshold_curve",
    "verify",
    "evaluate_pair_set",
    "evaluate_bin",
    "tune_threshold",
    "embed_paths",
]


def __getattr__(name):  # the runners import torch; keep `verify` importable without it
    if name in ("evaluate_pair_set", "evaluate_bin", "tune_threshold"):
        from facecli.evaluation import runner

        return getattr(runner, name)
    if name == "embed_paths":
        from facecli.evaluation.embedding import embed_paths

        return embed_paths
    raise AttributeError(name)
