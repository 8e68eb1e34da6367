"""What happens around the loop: progress bar, metrics and W&B, the embedding's health,
epoch-end evaluation and ``best.pt``, and the end-of-training protocol.

Each hook has one job and sees only a :class:`HookContext`: the run's configuration,
position and folder, the tracker, ``log``/``warn``, an ``embedder()`` and the network with
its training images (to measure them). A hook may set two things, both on ``ctx.state``:
``best_dev_accuracy`` and ``threshold``. Everything else it produces it returns: figures
and extra checkpoint names from :meth:`Hook.epoch_end`, the evaluation from
:meth:`Hook.train_end`. The trainer calls hooks through :class:`Hooks`, as methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from facecli.engine.health import warn_if_bunched
from facecli.engine.runs import BEST, LATEST
from facecli.engine.state import TrainState
from facecli.errors import UserError


@dataclass
class HookContext:
    """The narrow door hooks see the run through (read-only but for ``state``'s two fields)."""

    cfg: Any  # TrainConfig
    state: TrainState
    run_dir: Path
    run_name: str
    steps_per_epoch: int
    tracker: Any  # facecli.engine.tracking.Tracker
    log: Callable[[str], None]
    warn: Callable[[str], None]
    embedder: Callable[[], Any]  # the network as evaluation uses it
    net: torch.nn.Module  # the bare embedding network (no DDP wrapper)
    dataset: Any  # the training images (``labels``, ``__getitem__``)
    preprocess: Any
    device: torch.device


@dataclass
class EpochAddition:
    """What a hook adds at an epoch's end: figures for the epoch's record, and checkpoint
    names (e.g. ``best.pt``) the epoch's weights are also saved under."""

    figures: dict = field(default_factory=dict)
    names: tuple[str, ...] = ()


class Hook:
    def epoch_start(self, ctx: HookContext) -> None: ...
    def step_end(self, ctx: HookContext) -> None: ...
    def interval(self, ctx: HookContext, record: dict) -> None: ...

    def epoch_end(self, ctx: HookContext, epoch: int) -> EpochAddition | None:
        """Before the epoch's checkpoints are written (``epoch``: epochs finished, 1-based)."""
        return None

    def epoch_saved(self, ctx: HookContext, record: dict) -> None: ...

    def train_end(self, ctx: HookContext) -> dict:
        """After the last epoch (with ``cfg.eval``): evaluation results by protocol name."""
        return {}

    def close(self, ctx: HookContext) -> None: ...


class Hooks:
    """The hooks of a run, called in order; merges what they return."""

    def __init__(self, hooks: list[Hook]):
        self.hooks = tuple(hooks)

    def epoch_start(self, ctx: HookContext) -> None:
        for hook in self.hooks:
            hook.epoch_start(ctx)

    def step_end(self, ctx: HookContext) -> None:
        for hook in self.hooks:
            hook.step_end(ctx)

    def interval(self, ctx: HookContext, record: dict) -> None:
        for hook in self.hooks:
            hook.interval(ctx, dict(record))

    def epoch_end(self, ctx: HookContext, epoch: int) -> EpochAddition:
        total = EpochAddition()
        for hook in self.hooks:
            added = hook.epoch_end(ctx, epoch)
            if added is not None:
                total = EpochAddition({**total.figures, **added.figures}, total.names + tuple(added.names))
        return total

    def epoch_saved(self, ctx: HookContext, record: dict) -> None:
        for hook in self.hooks:
            hook.epoch_saved(ctx, dict(record))

    def train_end(self, ctx: HookContext) -> dict:
        results: dict = {}
        for hook in self.hooks:
            results.update(hook.train_end(ctx))
        return results

    def close(self, ctx: HookContext) -> None:
        for hook in self.hooks:
            hook.close(ctx)


class ProgressHook(Hook):
    """A rich bar per epoch with loss, lr and images/s (rank 0)."""

    def __init__(self, factory):
        self.bar = factory()
        self.bar.start()
        self.task = None

    def epoch_start(self, ctx: HookContext) -> None:
        s = ctx.state
        self.task = self.bar.add_task(
            f"epoch {s.epoch + 1}/{ctx.cfg.epochs}", total=ctx.steps_per_epoch, completed=s.batch_in_epoch, loss="", lr="", ips=""
        )

    def step_end(self, ctx: HookContext) -> None:
        self.bar.advance(self.task)

    def interval(self, ctx: HookContext, record: dict) -> None:
        loss = f"loss {record['loss']:.4f}" if record.get("loss") is not None else ""
        self.bar.update(self.task, loss=loss, lr=f"lr {record['lr']:.2e}", ips=f"{record['images_per_sec']:,.0f} img/s")

    def epoch_saved(self, ctx: HookContext, record: dict) -> None:
        self.bar.remove_task(self.task)

    def close(self, ctx: HookContext) -> None:
        self.bar.stop()


class TrackerHook(Hook):
    """``metrics.jsonl`` and W&B: the step intervals, each epoch, checkpoints as artifacts."""

    def interval(self, ctx: HookContext, record: dict) -> None:
        ctx.tracker.log({k: v for k, v in record.items() if k != "step"}, record["step"])

    def epoch_saved(self, ctx: HookContext, record: dict) -> None:
        cfg = ctx.cfg
        ctx.tracker.log({k: v for k, v in record.items() if k != "min_so_far"}, ctx.state.step)
        dev, cos, gap = record.get("dev_accuracy"), record.get("spread/mean_cosine"), record.get("spread/identity_gap")
        ctx.log(
            f"epoch {record['epoch']}/{cfg.epochs}: mean loss {record['epoch_loss']:.4f}"
            + (" (min so far)" if record.get("min_so_far") else "")
            + (f", embedding mean cosine {cos:.3f}" if cos is not None else "")
            + (f", same-vs-different gap {gap:.3f}" if gap is not None else "")
            + (f", View 1 dev-test accuracy {dev:.4f}" if dev is not None else "")
        )
        if cfg.wandb_artifacts:
            ctx.tracker.artifact(ctx.run_dir / LATEST, f"{cfg.model}-{ctx.run_name}")


class HealthHook(Hook):
    """At each epoch end, how spread the embedding is on a fixed sample of training images;
    one warning line when it has collapsed (:mod:`facecli.engine.health`)."""

    def __init__(self):
        self.indices = None

    def epoch_end(self, ctx: HookContext, epoch: int) -> EpochAddition | None:
        from facecli.engine.health import MIN_STEPS_FOR_VERDICT, measure, sample_indices, verdict

        if self.indices is None:
            self.indices = sample_indices(ctx.dataset.labels, ctx.cfg.seed)
        spread = measure(ctx.net, ctx.dataset, self.indices, ctx.preprocess, ctx.device)
        if spread is None:
            return None
        message = verdict(spread) if ctx.state.step >= MIN_STEPS_FOR_VERDICT else None
        if message:
            ctx.warn(f"epoch {epoch}: {message}")
        return EpochAddition(spread.to_record())


class EpochEvaluationHook(Hook):
    """``--eval-every N``: View 1 dev-test accuracy (keeps ``best.pt``) and ``--val-bin`` sets."""

    def epoch_end(self, ctx: HookContext, epoch: int) -> EpochAddition | None:
        cfg, s = ctx.cfg, ctx.state
        if not (cfg.eval_every and epoch % cfg.eval_every == 0):
            return None
        figures, names = {}, ()
        dev = view1_accuracy(ctx)
        if dev is not None:
            figures["dev_accuracy"] = dev
            if s.best_dev_accuracy is None or dev > s.best_dev_accuracy:
                s.best_dev_accuracy = dev
                names = (BEST,)
        figures.update(bin_accuracies(ctx))
        return EpochAddition(figures, names)


def view1_accuracy(ctx: HookContext) -> float | None:
    """Dev-test accuracy at the threshold tuned on dev-train: the model-selection signal."""
    from facecli.evaluation.runner import tune_view1

    if not ctx.cfg.lfw_dir:
        return None
    try:
        return tune_view1(ctx.embedder(), Path(ctx.cfg.lfw_dir)).test_accuracy
    except UserError as e:
        ctx.warn(f"View 1 evaluation skipped: {e}")
        return None


def bin_accuracies(ctx: HookContext) -> dict:
    """``{"<set>/accuracy": ...}`` for every ``--val-bin`` set (10-fold protocol)."""
    return {f"{ev.name}/accuracy": ev.report.accuracy for ev in _bins(ctx)}


class FinalEvaluationHook(Hook):
    """After training: the View 1 threshold (stored in latest.pt), View 2 and ``.bin`` sets, with pictures."""

    def train_end(self, ctx: HookContext) -> dict:
        from facecli.evaluation.runner import write_json

        cfg = ctx.cfg
        if not cfg.lfw_dir and not cfg.val_bins:
            ctx.log("No LFW folder given (--lfw-dir or DATASET_PATH): skipping the end-of-training evaluation.")
            return {}
        results: dict = {}
        if cfg.lfw_dir:
            results.update(self._view1(ctx))
            results.update(self._view2(ctx))
        for ev in _bins(ctx):
            results[ev.name] = ev.to_dict()
            ctx.tracker.log({f"{ev.name}/accuracy": ev.report.accuracy}, ctx.state.step)
        if results:
            write_json(ctx.run_dir / "evaluation.json", results)
            ctx.tracker.summary({k: v.get("accuracy", v.get("test_accuracy")) for k, v in results.items()})
        return results

    def _view1(self, ctx: HookContext) -> dict:
        from facecli.engine.checkpoint import set_threshold
        from facecli.evaluation.reports import save_threshold_curve
        from facecli.evaluation.runner import tune_view1

        try:
            choice = tune_view1(ctx.embedder(), Path(ctx.cfg.lfw_dir))
        except UserError as e:
            ctx.warn(f"View 1 threshold tuning skipped: {e}")
            return {}
        step, run_dir, tracker = ctx.state.step, ctx.run_dir, ctx.tracker
        ctx.state.threshold = choice.threshold
        # Tuned on the final weights: it belongs to latest.pt only (min_loss.pt and best.pt
        # hold earlier weights; `facecli tune-threshold FILE --save` gives them their own).
        set_threshold(run_dir / LATEST, choice.threshold, "View 1 pairsDevTrain.txt")
        curve = save_threshold_curve(choice.candidates, choice.accuracies, choice.threshold, run_dir / "view1_threshold.png")
        tracker.log({"view1/threshold": choice.threshold, "view1/dev_test_accuracy": choice.test_accuracy}, step)
        tracker.image("view1/threshold_curve", curve, step)
        finite = np.isfinite(choice.candidates)
        tracker.line("view1/accuracy_vs_threshold", choice.candidates[finite], choice.accuracies[finite], "threshold", "accuracy", step)
        ctx.log(f"View 1: threshold {choice.threshold:.4f} (dev-train accuracy {choice.train_accuracy:.4f}), dev-test accuracy {choice.test_accuracy:.4f}")
        warn_if_bunched(ctx.warn, choice.threshold)
        return {"view1": choice.to_dict()}

    def _view2(self, ctx: HookContext) -> dict:
        from facecli.evaluation.runner import evaluate_lfw_view2, save_pictures

        try:
            ev = evaluate_lfw_view2(ctx.embedder(), Path(ctx.cfg.lfw_dir))
        except UserError as e:
            ctx.warn(f"View 2 evaluation skipped: {e}")
            return {}
        pictures = save_pictures(ev, ctx.run_dir, "lfw")
        report, step = ev.report, ctx.state.step
        ctx.tracker.log({"lfw/accuracy": report.accuracy, "lfw/accuracy_std": report.accuracy_std, "lfw/auc": report.auc}, step)
        ctx.tracker.image("lfw/roc", pictures[0], step)
        ctx.log(f"LFW View 2: accuracy {100 * report.accuracy:.2f} ± {100 * report.accuracy_std:.2f}% (10-fold), AUC {report.auc:.4f}")
        return {"view2": ev.to_dict()}


def _bins(ctx: HookContext):
    from facecli.evaluation.runner import evaluate_bins

    evs = evaluate_bins(ctx.embedder(), ctx.cfg.val_bins, ctx.warn)
    for ev in evs:
        ctx.log(f"{ev.name}: accuracy {100 * ev.report.accuracy:.2f} ± {100 * ev.report.accuracy_std:.2f}%")
    return evs


def default_hooks(progress_factory: Callable | None) -> Hooks:
    """Rank 0's hooks, in the order they run (health and evaluation figures before the tracker logs them)."""
    hooks: list[Hook] = [ProgressHook(progress_factory)] if progress_factory else []
    return Hooks(hooks + [HealthHook(), EpochEvaluationHook(), TrackerHook(), FinalEvaluationHook()])
