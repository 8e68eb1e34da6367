"""A skipped first optimizer step (fp16 overflow, non-finite loss) must leave no trace.

Fused SGD used to create its momentum buffers with ``empty_like`` in the first step and let
that step's kernel fill them: skipped through ``found_inf``, they kept uninitialised memory.
"""

from __future__ import annotations

import pytest
import torch

from facecli.engine.optim import build_optimizer, zero_momentum

LR = 0.1


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(48, 24)), torch.nn.Parameter(torch.randn(24))]


def _reference(name, grads):
    """Plain (unfused) torch optimizer, one good step from the same start."""
    params = _params()
    groups = [{"params": [params[0]], "weight_decay": 5e-4}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9) if name == "sgd" else torch.optim.AdamW(groups, lr=LR)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return params


def _facecli(name, fused):
    params = _params()
    if fused:
        return params, build_optimizer(name, params, LR)
    groups = [{"params": [params[0]], "weight_decay": 5e-4}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = zero_momentum(torch.optim.SGD(groups, lr=LR, momentum=0.9)) if name == "sgd" else torch.optim.AdamW(groups, lr=LR)
    return params, opt


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_skipped_first_step_then_good_step_equals_one_plain_step(name, fused):
    params, opt = _facecli(name, fused)
    assert all(p.device.type == "cpu" for p in params)
    if fused:
        assert opt.param_groups[0]["fused"], "build_optimizer no longer fuses: this test must then skip differently"
    grads = [torch.randn_like(p) for p in params]
    for p in params:  # an overflowing first step: what GradScaler / StepRunner skip
        p.grad = torch.full_like(p, float("inf"))
    garbage = [torch.full_like(p, -3e8) for p in params]  # freed memory the allocator may hand out again
    del garbage
    if fused:  # the fused kernel skips on the device, as GradScaler and StepRunner._update ask it to
        opt.grad_scale, opt.found_inf = None, torch.ones(())
        opt.step()
        opt.found_inf = torch.zeros(())
    # (unfused optimizers take no found_inf: GradScaler skips by not calling step())
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for got, want in zip(params, _reference(name, grads)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
