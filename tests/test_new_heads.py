"""AdaFace, MagFace and ElasticFace against naive float64 implementations of the papers'
formulas as the authors released them (written out here, one line per step of theirs):
loss, gradients with respect to the embeddings and the class weights, and the running state
(AdaFace's norm statistics over several steps, ElasticFace's margin draws) through a
state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facecli.errors import UserError
from facecli.losses import build_loss

D, C = 6, 5


def _batch(seed: int, rows: int = 8):
    """Embeddings of assorted norms (one above AdaFace's 100, one below MagFace's l_a), one almost
    on its class weight (|cos| > 1 - 1e-3: AdaFace's clamp) and one almost on another class's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g)
    x = torch.randn(rows, D, generator=g)
    y = torch.randint(0, C, (rows,), generator=g)
    norms = torch.tensor([150.0, 3.0, 20.0, 45.0, 80.0, 12.0, 30.0, 60.0][:rows])
    x = F.normalize(x, dim=1) * norms[:, None]
    x[2] = F.normalize(w[y[2]], dim=0) * 20.0 + 1e-4 * torch.randn(D, generator=g)
    other = (int(y[3]) + 1) % C
    x[3] = F.normalize(w[other], dim=0) * 45.0 + 1e-4 * torch.randn(D, generator=g)
    return x, y, w


def _grads(fn, x, w):
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    loss = fn(x64, w64)
    loss.backward()
    return loss.detach(), x64.grad, w64.grad


def _head_grads(head, x, y):
    x = x.clone().requires_grad_(True)
    head.zero_grad()
    loss = head.loss(x, y)
    loss.backward()
    return loss.detach().double(), x.grad.double(), head.weight.grad.double()


def _assert_match(head_out, ref_out, what):
    for name, a, b in zip(("loss", "embedding grad", "weight grad"), head_out, ref_out):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{what} {name}: {m}")


def _cosines(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).T


# ------------------------------------------------------------------------------ AdaFace


def _naive_adaface(x, w, y, stats, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """The released head.py, step by step (``stats`` = [batch_mean, batch_std], updated in place)."""
    cosine = _cosines(x, w).clamp(-1 + eps, 1 - eps)
    safe_norms = x.norm(dim=1, keepdim=True).clamp(0.001, 100).clone().detach()
    mean, std = safe_norms.mean(), safe_norms.std()
    stats[0] = mean * t_alpha + (1 - t_alpha) * stats[0]
    stats[1] = std * t_alpha + (1 - t_alpha) * stats[1]
    margin_scaler = ((safe_norms - stats[0]) / (stats[1] + eps) * h).clip(-1, 1)
    one_hot = torch.zeros_like(cosine).scatter_(1, y[:, None], 1.0)
    theta = cosine.acos()
    theta_m = torch.clip(theta + one_hot * (m * margin_scaler * -1), min=eps, max=math.pi - eps)
    cosine = theta_m.cos() - one_hot * (m + m * margin_scaler)
    return F.cross_entropy(cosine * s, y)


def test_adaface_matches_the_released_head_over_several_steps():
    head = build_loss("adaface", D, C).train()
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    stats = [torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)]
    for step in range(4):  # the statistics move away from 20 / 100 step by step
        x, y, w = _batch(step)
        with torch.no_grad():
            head.weight.copy_(w)
        ours = _head_grads(head, x, y)
        ref = _grads(lambda a, b: _naive_adaface(a, b, y, stats), x, w)
        _assert_match(ours, ref, f"adaface step {step}")
        torch.testing.assert_close(head.batch_mean.double(), stats[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(head.batch_std.double(), stats[1], rtol=1e-6, atol=0)
    assert abs(head.batch_mean.item() - 20.0) > 0.5  # really moved
    # The clamped entries (rows 2 and 3) get no gradient through the clamp, as released.
    cos = head.cosine(x).detach()
    assert cos[2, y[2]] > 1 - 1e-3 and cos[3].max() > 1 - 1e-3

    # The statistics are buffers: a fresh head loaded from the state dict continues identically.
    clone = build_loss("adaface", D, C).train()
    clone.load_state_dict(head.state_dict())
    x, y, _ = _batch(9)
    torch.testing.assert_close(clone.loss(x, y), head.loss(x, y), rtol=0, atol=0)
    torch.testing.assert_close(clone.batch_std, head.batch_std, rtol=0, atol=0)


def test_adaface_eval_leaves_the_statistics_and_a_batch_of_one_keeps_its_std():
    head = build_loss("adaface", D, C).eval()
    x, y, _ = _batch(1)
    head.loss(x, y)
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    head.train()
    head.loss(x[:1], y[:1])
    assert math.isfinite(head.batch_std.item()) and head.batch_std.item() == 100.0
    assert head.batch_mean.item() != 20.0


# ------------------------------------------------------------------------------ MagFace


def _naive_magface(x, w, y, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0):
    """The released MagLinear (easy margin) + MagLoss + the training script's loss_id + lambda_g loss_g."""
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = _cosines(x, w).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = torch.where(cos_theta > 0, cos_theta * cos_m - sin_theta * sin_m, cos_theta)
    one_hot = torch.zeros_like(cos_theta).scatter_(1, y[:, None], 1.0)
    output = one_hot * s * cos_theta_m + (1.0 - one_hot) * s * cos_theta
    loss_g = torch.mean(1 / (u_a**2) * x_norm + 1 / x_norm)
    return F.cross_entropy(output, y) + lambda_g * loss_g


def test_magface_matches_the_released_loss():
    x, y, w = _batch(3)
    x[2] = x[2] * 0.9 + 0.5  # away from cos = 1, where the released sqrt has an infinite slope
    head = build_loss("magface", D, C)
    with torch.no_grad():
        head.weight.copy_(w)
    ours = _head_grads(head, x, y)
    _assert_match(ours, _grads(lambda a, b: _naive_magface(a, b, y), x, w), "magface")
    # The norm gets a gradient (margin and g) inside [l_a, u_a], none where clamped (row 0: 150, row 1: 3).
    radial = (ours[1] * F.normalize(x.double(), dim=1)).sum(1)
    assert radial[4].abs() > 1e-4 and radial[0].abs() < 1e-9


def test_magface_bounds_are_checked():
    with pytest.raises(UserError, match="magface_u_a"):
        build_loss("magface", D, C, l_a=50.0, u_a=20.0)


# --------------------------------------------------------------------------- ElasticFace


def _naive_elastic(x, w, y, margins, s=64.0):
    """The released ElasticArcFace: cos(acos(cos_y) + margin_i) on the target, no fallback."""
    cos_theta = _cosines(x, w).clamp(-1, 1)
    m_hot = torch.zeros_like(cos_theta).scatter_(1, y[:, None], margins.double()[:, None])
    return F.cross_entropy((cos_theta.acos() + m_hot).cos() * s, y)


@pytest.mark.parametrize("sort", [False, True])
def test_elasticface_draws_per_sample_margins_and_resumes_them(sort):
    torch.manual_seed(11)
    head = build_loss("elasticface", D, C, sort=sort).train()
    x, y, w = _batch(4)
    x[2] = x[2] * 0.9 + 0.5  # away from cos = 1 (the released acos has an infinite slope there)
    with torch.no_grad():
        head.weight.copy_(w)
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    twin = build_loss("elasticface", D, C, sort=sort)
    twin.load_state_dict(saved)
    margins = twin.draw_margins(len(y))
    assert 0.3 < margins.mean() < 0.7 and 0.01 < margins.std() < 0.12 and margins.unique().numel() == len(y)
    if sort:  # ElasticFace+: the row nearest its class gets the smallest margin
        cos_y = head.cosine(x).gather(1, y[:, None]).squeeze(1)
        order = torch.argsort(cos_y, descending=True)
        margins = torch.empty_like(margins).scatter_(0, order, margins.sort().values)
    ours = _head_grads(head, x, y)
    _assert_match(ours, _grads(lambda a, b: _naive_elastic(a, b, y, margins), x, w), f"elasticface sort={sort}")
    # The next step draws new margins; a head loaded from the state dict draws the same ones.
    resumed = build_loss("elasticface", D, C, sort=sort).train()
    resumed.load_state_dict(head.state_dict())
    torch.testing.assert_close(resumed.loss(x, y), head.loss(x, y), rtol=0, atol=0)
    assert not torch.equal(head.loss(x, y), ours[0].float())


def test_elasticface_eval_uses_the_mean_margin():
    head = build_loss("elasticface", D, C).eval()
    arc = build_loss("arcface", D, C)
    arc.load_state_dict({"weight": head.weight.detach()})
    x, y, _ = _batch(5)
    x[2] = x[2] * 0.9 + 0.5
    a, b = head(x, y), arc(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_elastic_sort_is_an_on_off_setting():
    from facecli.engine.config import TrainConfig

    assert TrainConfig(model="elasticface", elastic_sort=True).loss_hparams()["sort"] == 1.0
    assert TrainConfig(model="elasticface").loss_hparams() == {"scale": 64.0, "margin": 0.5, "margin_std": 0.05, "sort": 0.0}
    with pytest.raises(UserError, match="elastic-sort must be on or off .* The default is off"):
        TrainConfig(model="elasticface", elastic_sort=0.5)


def test_elasticface_processes_draw_their_own_margins_under_ddp():
    """Replicated under DDP, each process must not draw the same margins as the others."""
    torch.manual_seed(3)
    ranks = [build_loss("elasticface", D, C) for _ in range(2)]
    ranks[1].set_process_rank(1)
    a, b = (r.draw_margins(16) for r in ranks)
    assert not torch.allclose(a, b)
    again = build_loss("elasticface", D, C)  # same seed and rank: the same draws (resume)
    torch.testing.assert_close(again.draw_margins(16), a, rtol=0, atol=0)
