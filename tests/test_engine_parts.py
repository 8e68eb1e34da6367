"""The engine's parts on their own: hooks (through their context), CheckpointManager,
TrainState and build_parts. Each test is cheap; the whole-run behaviour is in test_training,
test_resume and test_faults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from facecli.engine import hooks as hooks_module
from facecli.engine.checkpoint import new_checkpoint
from facecli.engine.checkpoint_manager import CheckpointManager
from facecli.engine.config import TrainConfig
from facecli.engine.distributed import World
from facecli.engine.hooks import EpochAddition, EpochEvaluationHook, Hook, HookContext, Hooks, TrackerHook
from facecli.engine.setup import build_parts
from facecli.engine.state import TrainState


# ---------------------------------------------------------------- TrainState
def test_train_state_round_trips_through_a_checkpoint():
    s = TrainState(epoch=2, batch_in_epoch=3, step=19, epoch_loss_sum=4.5, epoch_loss_count=3, min_loss=1.25,
                   best_dev_accuracy=0.75, threshold=0.3)
    assert TrainState.from_checkpoint(new_checkpoint(**s.to_checkpoint())) == s


def test_train_state_end_epoch_gives_the_mean_and_whether_it_is_the_lowest():
    s = TrainState(epoch_loss_sum=6.0, epoch_loss_count=3, batch_in_epoch=3, step=3)
    assert s.end_epoch() == (2.0, True)
    assert (s.epoch, s.batch_in_epoch, s.epoch_loss_sum, s.epoch_loss_count, s.min_loss) == (1, 0, 0.0, 0, 2.0)
    s.epoch_loss_sum, s.epoch_loss_count = 2.0, 1
    assert s.end_epoch() == (2.0, False)  # equal is not lower: min_loss.pt keeps the first
    s.epoch_loss_sum, s.epoch_loss_count = 1.0, 1
    assert s.end_epoch() == (1.0, True) and s.min_loss == 1.0 and s.step == 3


# ---------------------------------------------------------------- CheckpointManager
def _ckpt(step: int):
    return lambda: new_checkpoint(model="arcface", step=step)


def test_checkpoint_manager_writes_once_and_links_every_name(tmp_path):
    manager = CheckpointManager(tmp_path, World(), keep_epochs=5)
    manager.save(_ckpt(7), ["latest.pt", "min_loss.pt"], epoch_file="epoch_001.pt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch_001.pt", "latest.pt", "min_loss.pt"]
    assert [torch.load(tmp_path / n, weights_only=True)["step"] for n in names] == [7, 7, 7]
    inode = os.stat(tmp_path / "epoch_001.pt").st_ino
    assert os.stat(tmp_path / "latest.pt").st_ino == inode  # one file on disk under every name


def test_checkpoint_manager_keeps_the_newest_epochs(tmp_path):
    manager = CheckpointManager(tmp_path, World(), keep_epochs=2)
    for epoch in range(1, 5):
        manager.save(_ckpt(epoch), ["latest.pt"], epoch_file=f"epoch_{epoch:03d}.pt")
        os.utime(tmp_path / f"epoch_{epoch:03d}.pt", ns=(epoch * 10**9, epoch * 10**9))  # distinct write times
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_003.pt", "epoch_004.pt"]
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 4


def test_checkpoint_manager_builds_on_every_rank_but_writes_on_rank_0_only(tmp_path):
    built = []
    manager = CheckpointManager(tmp_path, World(rank=1, world_size=2), keep_epochs=1)
    manager.save(lambda: built.append(1), ["latest.pt"])
    assert built == [1] and list(tmp_path.iterdir()) == []


def test_checkpoint_manager_clears_what_a_killed_save_left(tmp_path):
    (tmp_path / ".latest.pt.abc.tmp").write_bytes(b"torn")
    (tmp_path / "latest.pt").write_bytes(b"kept")
    CheckpointManager(tmp_path, World(), keep_epochs=1).clear_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


# ---------------------------------------------------------------- hooks
class _Tracker:
    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((dict(data), step))


def _context(tmp_path, **cfg) -> tuple[HookContext, list[str]]:
    lines: list[str] = []
    settings = dict(model="arcface", train_dir=str(tmp_path), device="cpu", epochs=3, wandb=False, **cfg)
    ctx = HookContext(
        cfg=TrainConfig(**settings), state=TrainState(step=12, epoch=2), run_dir=tmp_path, run_name="r", steps_per_epoch=6,
        tracker=_Tracker(), log=lines.append, warn=lines.append, embedder=lambda: None, net=torch.nn.Identity(),
        dataset=None, preprocess=None, device=torch.device("cpu"),
    )
    return ctx, lines


class _Adds(Hook):
    def __init__(self, figures, names=(), scribble=False):
        self.figures, self.names, self.scribble, self.seen = figures, names, scribble, []

    def epoch_end(self, ctx, epoch):
        return EpochAddition(dict(self.figures), tuple(self.names))

    def interval(self, ctx, record):
        self.seen.append(dict(record))
        if self.scribble:
            record["loss"] = -1.0


def test_hooks_merge_what_each_returns_in_order(tmp_path):
    ctx, _ = _context(tmp_path)
    hooks = Hooks([_Adds({"a": 1}), Hook(), _Adds({"b": 2, "a": 3}, ["best.pt"])])
    added = hooks.epoch_end(ctx, 2)
    assert added.figures == {"a": 3, "b": 2} and added.names == ("best.pt",)


def test_a_hook_cannot_change_what_the_next_hook_sees(tmp_path):
    ctx, _ = _context(tmp_path)
    first, second = _Adds({}, scribble=True), _Adds({})
    record = {"loss": 0.5, "lr": 0.1, "images_per_sec": 10.0, "epoch": 0.5, "step": 3}
    Hooks([first, second]).interval(ctx, record)
    assert second.seen == [record] and record["loss"] == 0.5


def test_epoch_evaluation_adds_best_pt_only_when_the_accuracy_improves(tmp_path, monkeypatch):
    ctx, _ = _context(tmp_path, eval_every=1)
    accuracies = iter([0.8, 0.7, 0.9])
    monkeypatch.setattr(hooks_module, "view1_accuracy", lambda c: next(accuracies))
    monkeypatch.setattr(hooks_module, "bin_accuracies", lambda c: {"cfp/accuracy": 0.6})
    hook = EpochEvaluationHook()
    got = [hook.epoch_end(ctx, epoch) for epoch in (1, 2, 3)]
    assert [a.names for a in got] == [("best.pt",), (), ("best.pt",)]
    assert got[1].figures == {"dev_accuracy": 0.7, "cfp/accuracy": 0.6}
    assert ctx.state.best_dev_accuracy == 0.9


def test_epoch_evaluation_runs_every_n_epochs_only(tmp_path, monkeypatch):
    ctx, _ = _context(tmp_path, eval_every=2)
    monkeypatch.setattr(hooks_module, "view1_accuracy", lambda c: 0.5)
    monkeypatch.setattr(hooks_module, "bin_accuracies", lambda c: {})
    hook = EpochEvaluationHook()
    assert hook.epoch_end(ctx, 1) is None and hook.epoch_end(ctx, 2).names == ("best.pt",)


def test_tracker_hook_logs_the_epoch_record_and_one_line(tmp_path):
    ctx, lines = _context(tmp_path)
    TrackerHook().epoch_saved(ctx, {"epoch": 2, "epoch_loss": 1.5, "dev_accuracy": 0.75, "min_so_far": True})
    assert ctx.tracker.logged == [({"epoch": 2, "epoch_loss": 1.5, "dev_accuracy": 0.75}, 12)]
    assert lines == ["epoch 2/3: mean loss 1.5000 (min so far), View 1 dev-test accuracy 0.7500"]


# ---------------------------------------------------------------- build_parts
def _parts(synth_train_dir: Path, model: str, **settings):
    cfg = TrainConfig(model=model, train_dir=str(synth_train_dir), backbone="resnet18", image_size=32, batch_size=12,
                      epochs=2, workers=0, device="cpu", wandb=False, **settings)
    return build_parts(cfg, World(), torch.device("cpu"), None, None, warn=lambda _: None), cfg


def test_build_parts_follows_the_loss_capabilities(synth_train_dir):
    from facecli.data.samplers import PKBatchSampler, ShuffledBatchSampler
    from facecli.losses import LOSSES

    arc, _ = _parts(synth_train_dir, "arcface", margin_warmup_epochs=1.0)
    assert type(arc.head) is LOSSES["arcface"] and isinstance(arc.sampler, ShuffledBatchSampler)
    assert arc.net.normalize is False and arc.channels_last is False  # CPU: NCHW unless asked
    assert len(arc.classes) == 12 and arc.steps_per_epoch == 12 * 6 // 12
    assert arc.margin_warmup_steps == arc.steps_per_epoch
    facenet, _ = _parts(synth_train_dir, "facenet", images_per_identity=3, channels_last=True)
    assert isinstance(facenet.sampler, PKBatchSampler) and facenet.net.normalize is True and facenet.channels_last is True
    conv = next(p for p in facenet.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert facenet.head.hparams() == {"margin": pytest.approx(0.2)}


class _Faces:
    """Eight identities x two 8 px images; ``labels`` and items as the training data set gives them."""

    labels = [i // 2 for i in range(16)]

    def __getitem__(self, i):
        return torch.full((3, 8, 8), 10 * i, dtype=torch.uint8), self.labels[i], None


class _Collapsed(torch.nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 4) + 1e-3 * x.mean(dim=(1, 2, 3)).unsqueeze(1)


def test_health_hook_reads_the_context_and_warns_on_a_collapsed_embedding(tmp_path):
    from facecli.data.images import Preprocess
    from facecli.engine.hooks import HealthHook

    ctx, lines = _context(tmp_path)
    ctx.net, ctx.dataset, ctx.preprocess = _Collapsed(), _Faces(), Preprocess(8)
    early = HealthHook().epoch_end(ctx, 1)  # step 12: figures, no verdict yet
    assert early.figures["spread/mean_cosine"] == pytest.approx(1.0, abs=1e-3) and early.names == () and lines == []
    ctx.state.step = 60
    HealthHook().epoch_end(ctx, 2)
    assert len(lines) == 1 and lines[0].startswith("epoch 2: The embeddings have collapsed")
