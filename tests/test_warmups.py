"""The head warm-ups (margin and scale) and gradient clipping, against naive references.

Margin warm-up: the target logit is lerp(cos_y, f(cos_y), w), SphereFace's annealing, exact
at w = 1. Scale warm-up: the scale is lerp(s0, s, w) with s0 AdaCos's sqrt(2) ln(C - 1).
Clipping: the network's gradient is scaled to a total norm of at most ``clip_grad_norm``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facecli.engine.config import TrainConfig
from facecli.engine.optim import margin_weight_at
from facecli.engine.setup import adacos_scale
from facecli.engine.trainer import Trainer
from test_losses import _close, _expected, _head, _inputs


def _arc(c, m):
    return math.cos(math.acos(c) + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)


def _psi(c, m):
    theta = math.acos(c)
    k = math.floor(m * theta / math.pi)
    return (-1) ** k * math.cos(m * theta) - 2 * k


TARGETS = {"cosface": lambda c: c - 0.35, "arcface": lambda c: _arc(c, 0.5), "sphereface": lambda c: _psi(c, 1.5)}


def _torch_target(name, c):
    """The same formulas in torch ops (float64), for autograd."""
    if name == "cosface":
        return c - 0.35
    theta = torch.acos(c)
    if name == "arcface":
        return torch.where(c > math.cos(math.pi - 0.5), torch.cos(theta + 0.5), c - 0.5 * math.sin(0.5))
    k = torch.floor(1.5 * theta.detach() / math.pi)
    return (1 - 2 * torch.remainder(k, 2)) * torch.cos(1.5 * theta) - 2 * k


def _naive_loss(name, x, weight, labels, w, scale):
    cos = F.normalize(x.double(), dim=1) @ F.normalize(weight.double(), dim=1).T
    c_y = cos.gather(1, labels[:, None]).squeeze(1)
    target = c_y + w * (_torch_target(name, c_y) - c_y)
    logits = cos.scatter(1, labels[:, None], target[:, None]) * scale
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("w", [0.0, 0.25, 1.0])
def test_margin_warmup_blends_the_target_towards_the_plain_cosine(name, w):
    x, y = _inputs()
    s = 16.0
    head = _head(name, scale=s)
    head.set_margin_weight(w)
    f = TARGETS[name]
    _close(head(x, y), _expected(lambda c: c + w * (f(c) - c), s))
    # Gradients (the heads' closed-form slope, blended) against autograd through the naive formula.
    xs = x.clone().requires_grad_(True)
    head.loss(xs, y).backward()
    xr = x.double().clone().requires_grad_(True)
    wr = head.weight.detach().double().clone().requires_grad_(True)
    _naive_loss(name, xr, wr, y, w, s).backward()
    _close(xs.grad, xr.grad.float(), atol=1e-5)
    _close(head.weight.grad, wr.grad.float(), atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_scale_warmup_moves_the_scale_from_s0_to_s(w):
    x, y = _inputs()
    s, s0 = 16.0, 4.0
    plain = _head("arcface", scale=s)
    warm = _head("arcface", scale=s)
    warm.warmup_scale = s0
    for head in (plain, warm):
        head.set_margin_weight(w)
    scale = s0 + w * (s - s0)
    _close(warm(x, y), _expected(lambda c: c + w * (_arc(c, 0.5) - c), scale))
    xs = x.clone().requires_grad_(True)
    warm.loss(xs, y).backward()
    xr = x.double().clone().requires_grad_(True)
    _naive_loss("arcface", xr, warm.weight.detach(), y, w, scale).backward()
    _close(xs.grad, xr.grad.float(), atol=1e-5)
    if w == 1.0:  # the end of the warm-up is the paper's head, bit for bit
        assert torch.equal(warm(x, y), plain(x, y))


def test_warmup_schedule_and_adacos_scale():
    assert [margin_weight_at(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert margin_weight_at(0, 0) == 1.0
    assert adacos_scale(4038) == pytest.approx(math.sqrt(2) * math.log(4037))  # 11.74 for LFW's DevTrain people
    assert adacos_scale(4038) == pytest.approx(11.74, abs=0.01)


def _cfg(train_dir, tmp_path, run, **extra):
    fields = dict(
        model="arcface", train_dir=str(train_dir), backbone="resnet18", image_size=32, batch_size=16, epochs=2, workers=0,
        device="cpu", checkpoints_dir=str(tmp_path), run_name=run, eval=False, wandb=False, log_every=1,
    )
    return TrainConfig(**{**fields, **extra})


def test_the_trainer_ramps_margin_and_scale_in(synth_train_dir, tmp_path):
    trainer = Trainer(_cfg(synth_train_dir, tmp_path, "warm", scale_warmup=True, margin_warmup_epochs=2.0), log=lambda _: None, warn=lambda _: None)
    head = trainer.parts.head
    warm = trainer.parts.margin_warmup_steps
    assert warm == 2 * trainer.steps_per_epoch and warm > 3
    assert head.warmup_scale == pytest.approx(adacos_scale(len(trainer.parts.classes)))
    trainer.run(stop_after_steps=3)
    w = 3 / warm  # the weight of the last step run
    assert head.margin_weight.item() == pytest.approx(w)
    assert head.scale_now.item() == pytest.approx(head.warmup_scale + w * (64.0 - head.warmup_scale))


def _one_step_change(train_dir, tmp_path, run, **extra):
    cfg = _cfg(train_dir, tmp_path, run, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, scheduler="constant",
               warmup_epochs=0.0, **extra)
    trainer = Trainer(cfg, log=lambda _: None, warn=lambda _: None)
    net0 = [p.detach().clone() for p in trainer.parts.net.parameters()]
    head0 = trainer.parts.head.weight.detach().clone()
    trainer.run(stop_after_steps=1)
    net_step = torch.cat([(p.detach() - q).flatten() for p, q in zip(trainer.parts.net.parameters(), net0)])
    return net_step, trainer.parts.head.weight.detach() - head0


def test_clip_grad_norm_bounds_the_networks_step_and_leaves_the_head_alone(synth_train_dir, tmp_path):
    free_net, free_head = _one_step_change(synth_train_dir, tmp_path, "free")
    clipped_net, clipped_head = _one_step_change(synth_train_dir, tmp_path, "clipped", clip_grad_norm=1e-3)
    assert free_net.norm() > 1e-2  # lr 1: the step is the gradient, far above the limit
    assert clipped_net.norm() <= 1e-3 * (1 + 1e-4)
    assert clipped_net.norm() >= 1e-3 * (1 - 1e-3)  # scaled down to the limit, not zeroed
    assert F.cosine_similarity(free_net, clipped_net, dim=0) > 0.9999  # same direction
    assert torch.equal(free_head, clipped_head)


def test_scale_warmup_is_on_by_default_and_off_without_a_margin_warmup(synth_train_dir, tmp_path):
    quiet = dict(log=lambda _: None, warn=lambda _: None)
    default = Trainer(_cfg(synth_train_dir, tmp_path, "default"), **quiet)
    assert default.parts.head.warmup_scale == pytest.approx(adacos_scale(len(default.parts.classes)))
    papers = Trainer(_cfg(synth_train_dir, tmp_path, "papers", margin_warmup_epochs=0.0), **quiet)  # the configs/ recipes
    assert papers.parts.head.warmup_scale is None
    papers.run(stop_after_steps=1)
    assert papers.parts.head.scale_now.item() == 64.0 and papers.parts.head.margin_weight.item() == 1.0
