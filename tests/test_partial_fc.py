"""Partial FC class sampling (``--sample-rate``, issue 21).

* The sampled head's loss and gradients equal a naive reference that builds the head of the
  sampled classes explicitly (all four margin heads, with and without surplus columns), the
  positives are always sampled, and the update changes only the sampled rows and their
  momentum (weight decay and momentum leave every other row alone).
* ``--sample-rate 1`` is today's run bit for bit; a sampled run resumes exactly; facenet and
  a replicated head under DDP are refused in one line.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TRAIN_ARGS, cli, one_line_error
from facecli.engine.checkpoint import load_checkpoint
from facecli.engine.optim import build_optimizer
from facecli.engine.partial_fc import ClassSampler, SampledMarginHead
from facecli.losses import build_head

C, D, B = 50, 8, 12
LR, WD, MOMENTUM = 0.1, 5e-4, 0.9


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[3] = labels[0]  # a repeated class
    return emb, labels


@pytest.mark.parametrize("rate", [0.4, 0.1])  # 20 columns >= B; 5 < B: surplus columns masked
@pytest.mark.parametrize("name", ["cosface", "arcface", "sphereface", "curricularface"])
def test_sampled_head_equals_explicit_reference(name, rate):
    torch.manual_seed(0)
    head = build_head(name, D, C, scale=16.0)
    sampled = SampledMarginHead(copy.deepcopy(head), rate, seed=7).train()
    sampled.start_step(5)
    emb, labels = _batch(1)
    x = emb.clone().requires_grad_(True)
    loss = sampled.loss(x, labels)
    loss.backward()
    sample = sampled.sample

    kept = sample.index if sample.keep is None else sample.index[sample.keep]
    kept = kept.tolist()
    positives = set(labels.tolist())
    assert positives <= set(kept) and len(set(kept)) == len(kept) == max(len(positives), math.ceil(rate * C))

    # The naive reference: a head of exactly the sampled classes, labels renumbered.
    ref = build_head(name, D, len(kept), scale=16.0).train()
    with torch.no_grad():
        ref.weight.copy_(head.weight[kept])
    x_ref = emb.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref(x_ref, torch.tensor([kept.index(y) for y in labels.tolist()])), torch.tensor([kept.index(y) for y in labels.tolist()]))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    rows_grad = sample.rows.grad if sample.keep is None else sample.rows.grad[sample.keep]
    torch.testing.assert_close(rows_grad, ref.weight.grad, rtol=1e-4, atol=1e-6)
    if sample.keep is not None:  # surplus columns are outside the softmax
        assert not sample.keep.all() and torch.count_nonzero(sample.rows.grad[~sample.keep]) == 0
    if name == "curricularface":
        torch.testing.assert_close(sampled.inner.t, ref.t)

    # The update: sampled rows move by SGD (momentum, weight decay); every other row and its momentum stay.
    weight = sampled.inner.weight
    opt = build_optimizer("sgd", [weight], LR, WD, MOMENTUM)
    momentum0 = torch.randn(C, D)
    opt.state[weight]["momentum_buffer"].copy_(momentum0)
    w0 = weight.detach().clone()
    with sampled.optimizer_rows(opt):
        opt.step()
    buf = opt.state[weight]["momentum_buffer"]
    assert weight.shape == (C, D) and buf.shape == (C, D) and weight.grad is None
    others = torch.tensor([c for c in range(C) if c not in set(kept)])
    assert torch.equal(weight.detach()[others], w0[others]) and torch.equal(buf[others], momentum0[others])
    expect_buf = MOMENTUM * momentum0[kept] + ref.weight.grad + WD * w0[kept]
    torch.testing.assert_close(buf[kept], expect_buf, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.detach()[kept], w0[kept] - LR * expect_buf, rtol=1e-5, atol=1e-6)


def test_positives_always_sampled_and_draws_depend_on_the_step():
    sampler = ClassSampler(0.1, 300, seed=3, rank=1)
    g = torch.Generator().manual_seed(0)
    seen = {}
    for step in range(40):
        sampler.step = step
        n = int(torch.randint(1, 80, (1,), generator=g))  # up to 80 samples: positives beyond ceil(0.1 x 300) = 30
        labels = torch.randint(-1, 300, (n,), generator=g)  # -1: a class of another process
        index, keep = sampler.draw(labels)
        kept = (index if keep is None else index[keep]).tolist()
        positives = {y for y in labels.tolist() if y >= 0}
        assert positives <= set(kept), step
        assert len(set(kept)) == len(kept) == max(len(positives), 30), step
        again, keep_again = sampler.draw(labels)  # the same step draws the same classes (exact resume)
        assert torch.equal(again, index) and (keep is None) == (keep_again is None)
        seen[step] = frozenset(kept) - positives
    drawn = [negatives for negatives in seen.values() if negatives]
    assert len(drawn) > 10 and len(set(drawn)) == len(drawn)  # other steps, other negatives


def _tiny(root, ck, run, *extra):
    return ["--dataset-path", root, "--checkpoints-dir", ck, "--run-name", run, "--no-eval", *TINY_TRAIN_ARGS, *extra]


def test_sample_rate_one_is_todays_head_bit_for_bit(synth_root, tmp_path):
    for run, extra in (("plain", ()), ("rate1", ("--sample-rate", "1.0"))):
        result = cli("train", "arcface", *_tiny(synth_root, tmp_path, run, *extra))
        assert result.exit_code == 0, result.output
    a, b = (load_checkpoint(tmp_path / "arcface" / r / "latest.pt") for r in ("plain", "rate1"))
    for part in ("net_state", "head_state"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_sampled_run_resumes_exactly_and_saves_the_full_head(synth_train_dir, tmp_path):
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer

    def cfg(run):
        return TrainConfig(
            model="curricularface", train_dir=str(synth_train_dir), backbone="resnet18", image_size=32, batch_size=4, epochs=1,
            workers=0, lr=0.05, device="cpu", checkpoints_dir=str(tmp_path), run_name=run, eval=False, wandb=False, sample_rate=0.2,
        )

    quiet = lambda _: None  # noqa: E731
    Trainer(cfg("A"), log=quiet, warn=quiet).run(stop_after_steps=6)
    Trainer(cfg("B"), log=quiet, warn=quiet).run(stop_after_steps=3)
    latest = tmp_path / "curricularface" / "B" / "latest.pt"
    Trainer(cfg("B"), resume_from=latest, log=quiet, warn=quiet).run(stop_after_steps=3)
    a, b = load_checkpoint(tmp_path / "curricularface" / "A" / "latest.pt"), load_checkpoint(latest)
    assert a["step"] == b["step"] == 6
    assert a["head_state"]["weight"].shape == (12, 512)  # the full head, today's format
    for part in ("net_state", "head_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for pid, state in a["optimizer_state"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer_state"]["state"][pid]["momentum_buffer"]), pid


def test_sample_rate_refused_for_facenet(synth_root, tmp_path):
    line = one_line_error(cli("train", "facenet", "--sample-rate", "0.5", *_tiny(synth_root, tmp_path, "f")))
    assert "--sample-rate" in line and "facenet" in line
    line = one_line_error(cli("train", "arcface", "--sample-rate", "0", *_tiny(synth_root, tmp_path, "z")))
    assert "--sample-rate" in line


def test_sample_rate_under_ddp_needs_the_sharded_head():
    from facecli.engine.config import TrainConfig
    from facecli.engine.distributed import World
    from facecli.engine.setup import _head
    from facecli.errors import UserError

    cfg = TrainConfig(model="arcface", sample_rate=0.5)
    with pytest.raises(UserError, match="--sharded-head"):
        _head(cfg, World(rank=0, world_size=2), 10)


def test_sharded_sampled_run_under_two_processes_lowers_its_loss(synth_root, tmp_path):
    from test_distributed import _load, _metrics, _tiny as _tiny_ddp, _torchrun

    # 6 classes per rank at rate 0.1 and a global batch of 16: each rank keeps its positives
    # (ceil(0.6) = 1 at least), the surplus of the 6 drawn columns masked out.
    args = _tiny_ddp(synth_root, tmp_path, "sampled", 8, 2) + ["--sharded-head", "--sample-rate", "0.1", "--scale", "16", "--margin-warmup-epochs", "0"]
    _torchrun("-m", "facecli", "train", "arcface", *args)
    run = tmp_path / "arcface" / "sampled"
    epochs = [r["epoch_loss"] for r in _metrics(run) if "epoch_loss" in r]
    assert len(epochs) == 2 and epochs[1] < epochs[0], epochs
    final = _load(run / "latest.pt")
    assert final["head_state"]["weight"].shape == (12, 32) and final["train_config"]["sample_rate"] == 0.1


def test_sharded_sampled_head_equals_explicit_reference():
    """2 gloo ranks, each sampling its own shard: loss and gradients of the reference head
    built from the union of both ranks' sampled classes (all four heads)."""
    import test_distributed as td

    old = td.HERE
    td.HERE = Path(__file__).resolve()  # run this file as the workers' script
    try:
        outs = td._two_workers("sharded-reference")
    finally:
        td.HERE = old
    for out in outs:
        assert "PFC-SHARDED-OK 8" in out, out  # 4 heads x 2 rates compared on each rank


def _sharded_reference_worker() -> None:
    import torch.distributed as dist

    import facecli.engine.sharded_head as sh
    from facecli.engine.distributed import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = World(rank, 2, rank)
    emb, labels = _batch(2)
    lo, hi = (0, 5) if rank == 0 else (5, B)  # unequal per-rank batches
    checked = 0
    for name in ("cosface", "arcface", "sphereface", "curricularface"):
        for rate in (0.4, 0.1):
            torch.manual_seed(11)
            ref_full = build_head(name, D, C, scale=16.0)
            head = sh.ShardedMarginHead(name, D, C, world, scale=16.0)
            head.load_full_state_dict(ref_full.state_dict())
            head.sample_classes(rate, seed=9)
            head.train()
            head.start_step(4)
            mine = emb[lo:hi].clone().requires_grad_(True)
            loss = head.loss(mine, labels[lo:hi])
            loss.backward()
            sample = head.sample
            local = sample.index if sample.keep is None else sample.index[sample.keep]
            positives = {y for y in labels.tolist() if head.start <= y < head.end}
            assert len(local) == max(len(positives), math.ceil(rate * (head.end - head.start)))
            kept_parts = [None, None]
            dist.all_gather_object(kept_parts, (local + head.start).tolist())
            kept = kept_parts[0] + kept_parts[1]
            assert set(labels.tolist()) <= set(kept)

            ref = build_head(name, D, len(kept), scale=16.0).train()
            with torch.no_grad():
                ref.weight.copy_(ref_full.weight[kept])
            x_ref = emb.clone().requires_grad_(True)
            cols = torch.tensor([kept.index(y) for y in labels.tolist()])
            ref_loss = F.cross_entropy(ref(x_ref, cols), cols)
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine.grad, x_ref.grad[lo:hi], rtol=1e-4, atol=1e-6)
            rows_grad = sample.rows.grad if sample.keep is None else sample.rows.grad[sample.keep]
            offset = 0 if rank == 0 else len(kept_parts[0])
            torch.testing.assert_close(rows_grad, ref.weight.grad[offset : offset + len(local)], rtol=1e-4, atol=1e-6)
            if name == "curricularface":
                torch.testing.assert_close(head.local.t, ref.t)
            checked += 1
    # Both ranks finish their collectives before either exits: a rank leaving while gloo still
    # talks to it aborts the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    print(f"PFC-SHARDED-OK {checked}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1] == "sharded-reference":
        _sharded_reference_worker()
    else:
        raise SystemExit(f"unknown worker mode {sys.argv[1]!r}")


@pytest.mark.parametrize("name", ["adaface", "magface"])
def test_sampling_every_class_is_the_full_head_for_norm_reading_heads(name):
    """With every class drawn, the sampled loss and gradients are the full head's: the
    embedding norms (AdaFace's margin, MagFace's margin and its penalty g(a)) reach the head."""
    emb, labels = _batch(3)
    emb = (emb * 20).requires_grad_()  # norms inside MagFace's [l_a, u_a]
    full = build_head(name, D, C)
    sampled = SampledMarginHead(copy.deepcopy(full), (C - 0.5) / C, seed=0)  # ceil(rate C) = C
    sampled.start_step(0)
    want = full.loss(emb, labels)
    (g_want,) = torch.autograd.grad(want, emb)
    got = sampled.loss(emb, labels)
    (g_got,) = torch.autograd.grad(got, emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
