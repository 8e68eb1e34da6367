"""What happens around the loop: progress bar, metrics and W&B, epoch-end evaluation and
``best.pt``, and the end-of-training protocol. Each hook has one job and sees the trainer's
public face only (``cfg``, ``state``, ``run_dir``, ``tracker``, ``embedder()``, ``log``, ``warn``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facecli.engine.health import warn_if_bunched
from facecli.errors import UserError


class Hook:
    def epoch_start(self, trainer) -> None: ...
    def step_end(self, trainer) -> None: ...
    def interval(self, trainer, record: dict) -> None: ...
    def epoch_end(self, trainer, record: dict, names: list[str]) -> None:
        """Before the epoch's checkpoints are written: may add figures to ``record`` and file names to ``names``."""

    def epoch_saved(self, trainer, record: dict) -> None: ...
    def train_end(self, trainer, result) -> None: ...
    def close(self, trainer) -> None: ...


class ProgressHook(Hook):
    """A rich bar per epoch with loss, lr and images/s (rank 0)."""

    def __init__(self, factory):
        self.bar = factory()
        self.bar.start()
        self.task = None

    def epoch_start(self, trainer) -> None:
        s, cfg = trainer.state, trainer.cfg
        self.task = self.bar.add_task(f"epoch {s.epoch + 1}/{cfg.epochs}", total=trainer.steps_per_epoch, completed=s.batch_in_epoch, loss="", lr="", ips="")

    def step_end(self, trainer) -> None:
        self.bar.advance(self.task)

    def interval(self, trainer, record: dict) -> None:
        loss = f"loss {record['loss']:.4f}" if record.get("loss") is not None else ""
        self.bar.update(self.task, loss=loss, lr=f"lr {record['lr']:.2e}", ips=f"{record['images_per_sec']:,.0f} img/s")

    def epoch_saved(self, trainer, record: dict) -> None:
        self.bar.remove_task(self.task)

    def close(self, trainer) -> None:
        self.bar.stop()


class TrackerHook(Hook):
    """``metrics.jsonl`` and W&B: the step intervals, each epoch, checkpoints as artifacts."""

    def interval(self, trainer, record: dict) -> None:
        trainer.tracker.log({k: v for k, v in record.items() if k != "step"}, record["step"])

    def epoch_saved(self, trainer, record: dict) -> None:
        cfg, s = trainer.cfg, trainer.state
        trainer.tracker.log({k: v for k, v in record.items() if k != "min_so_far"}, s.step)
        dev, cos, gap = record.get("dev_accuracy"), record.get("spread/mean_cosine"), record.get("spread/identity_gap")
        trainer.log(
            f"epoch {record['epoch']}/{cfg.epochs}: mean loss {record['epoch_loss']:.4f}"
            + (" (min so far)" if record.get("min_so_far") else "")
            + (f", embedding mean cosine {cos:.3f}" if cos is not None else "")
            + (f", same-vs-different gap {gap:.3f}" if gap is not None else "")
            + (f", View 1 dev-test accuracy {dev:.4f}" if dev is not None else "")
        )
        if cfg.wandb_artifacts:
            trainer.tracker.artifact(trainer.run_dir / "latest.pt", f"{cfg.model}-{trainer.run_name}")


class HealthHook(Hook):
    """At each epoch end, how spread the embedding is on a fixed sample of training images;
    one warning line when it has collapsed (:mod:`facecli.engine.health`)."""

    def __init__(self):
        self.indices = None

    def epoch_end(self, trainer, record: dict, names: list[str]) -> None:
        from facecli.engine.health import MIN_STEPS_FOR_VERDICT, measure, sample_indices, verdict

        dataset = trainer.parts.dataset
        if self.indices is None:
            self.indices = sample_indices(dataset.labels, trainer.cfg.seed)
        spread = measure(trainer.net, dataset, self.indices, trainer.preprocess, trainer.device)
        if spread is None:
            return
        record.update(spread.to_record())
        message = verdict(spread) if trainer.state.step >= MIN_STEPS_FOR_VERDICT else None
        if message:
            trainer.warn(f"epoch {record['epoch']}: {message}")


class EpochEvaluationHook(Hook):
    """``--eval-every N``: View 1 dev-test accuracy (keeps ``best.pt``) and ``--val-bin`` sets."""

    def epoch_end(self, trainer, record: dict, names: list[str]) -> None:
        cfg, s = trainer.cfg, trainer.state
        if not (cfg.eval_every and record["epoch"] % cfg.eval_every == 0):
            return
        dev = view1_accuracy(trainer)
        if dev is not None:
            record["dev_accuracy"] = dev
            if s.best_dev_accuracy is None or dev > s.best_dev_accuracy:
                s.best_dev_accuracy = dev
                names.append("best.pt")
        record.update(bin_accuracies(trainer))


def view1_accuracy(trainer) -> float | None:
    """Dev-test accuracy at the threshold tuned on dev-train: the model-selection signal."""
    from facecli.evaluation.runner import tune_view1

    if not trainer.cfg.lfw_dir:
        return None
    try:
        return tune_view1(trainer.embedder(), Path(trainer.cfg.lfw_dir)).test_accuracy
    except UserError as e:
        trainer.warn(f"View 1 evaluation skipped: {e}")
        return None


def bin_accuracies(trainer) -> dict:
    """``{"<set>/accuracy": ...}`` for every ``--val-bin`` set (10-fold protocol)."""
    return {f"{ev.name}/accuracy": ev.report.accuracy for ev in _bins(trainer)}


class FinalEvaluationHook(Hook):
    """After training: the View 1 threshold (stored in latest.pt), View 2 and ``.bin`` sets, with pictures."""

    def train_end(self, trainer, result) -> None:
        from facecli.evaluation.runner import write_json

        cfg = trainer.cfg
        if not cfg.lfw_dir and not cfg.val_bins:
            trainer.log("No LFW folder given (--lfw-dir or DATASET_PATH): skipping the end-of-training evaluation.")
            return
        results: dict = {}
        if cfg.lfw_dir:
            results.update(self._view1(trainer))
            results.update(self._view2(trainer))
        for ev in _bins(trainer):
            results[ev.name] = ev.to_dict()
            trainer.tracker.log({f"{ev.name}/accuracy": ev.report.accuracy}, trainer.state.step)
        if results:
            write_json(trainer.run_dir / "evaluation.json", results)
            trainer.tracker.summary({k: v.get("accuracy", v.get("test_accuracy")) for k, v in results.items()})
        result.evaluation = results

    def _view1(self, trainer) -> dict:
        from facecli.engine.checkpoint import set_threshold
        from facecli.evaluation.reports import save_threshold_curve
        from facecli.evaluation.runner import tune_view1

        try:
            choice = tune_view1(trainer.embedder(), Path(trainer.cfg.lfw_dir))
        except UserError as e:
            trainer.warn(f"View 1 threshold tuning skipped: {e}")
            return {}
        step, run_dir = trainer.state.step, trainer.run_dir
        trainer.state.threshold = choice.threshold
        # Tuned on the final weights: it belongs to latest.pt only (min_loss.pt and best.pt
        # hold earlier weights; `facecli tune-threshold FILE --save` gives them their own).
        set_threshold(run_dir / "latest.pt", choice.threshold, "View 1 pairsDevTrain.txt")
        curve = save_threshold_curve(choice.candidates, choice.accuracies, choice.threshold, run_dir / "view1_threshold.png")
        trainer.tracker.log({"view1/threshold": choice.threshold, "view1/dev_test_accuracy": choice.test_accuracy}, step)
        trainer.tracker.image("view1/threshold_curve", curve, step)
        finite = np.isfinite(choice.candidates)
        trainer.tracker.line("view1/accuracy_vs_threshold", choice.candidates[finite], choice.accuracies[finite], "threshold", "accuracy", step)
        trainer.log(f"View 1: threshold {choice.threshold:.4f} (dev-train accuracy {choice.train_accuracy:.4f}), dev-test accuracy {choice.test_accuracy:.4f}")
        warn_if_bunched(trainer.warn, choice.threshold)
        return {"view1": choice.to_dict()}

    def _view2(self, trainer) -> dict:
        from facecli.evaluation.runner import evaluate_lfw_view2, save_pictures

        try:
            ev = evaluate_lfw_view2(trainer.embedder(), Path(trainer.cfg.lfw_dir))
        except UserError as e:
            trainer.warn(f"View 2 evaluation skipped: {e}")
            return {}
        pictures = save_pictures(ev, trainer.run_dir, "lfw")
        report, step = ev.report, trainer.state.step
        trainer.tracker.log({"lfw/accuracy": report.accuracy, "lfw/accuracy_std": report.accuracy_std, "lfw/auc": report.auc}, step)
        trainer.tracker.image("lfw/roc", pictures[0], step)
        trainer.log(f"LFW View 2: accuracy {100 * report.accuracy:.2f} ± {100 * report.accuracy_std:.2f}% (10-fold), AUC {report.auc:.4f}")
        return {"view2": ev.to_dict()}


def _bins(trainer):
    from facecli.evaluation.runner import evaluate_bins

    evs = evaluate_bins(trainer.embedder(), trainer.cfg.val_bins, trainer.warn)
    for ev in evs:
        trainer.log(f"{ev.name}: accuracy {100 * ev.report.accuracy:.2f} ± {100 * ev.report.accuracy_std:.2f}%")
    return evs
