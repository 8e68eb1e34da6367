"""Multi-process training: DDP under torchrun and the class-sharded margin head, 2 gloo processes on the CPU.

* The sharded head's loss and gradients equal the unsharded head's on the global batch
  (all four heads, an odd class count with a rank holding no target, unequal per-rank
  batches), and its checkpoint helpers gather/scatter weights and optimizer state exactly.
* ``torchrun --nproc_per_node=2 -m facecli train`` with ``--batch-size 36`` computes the step
  one process with ``--batch-size 72`` computes (weights, head, momentum, logged loss), with
  BatchNorm synchronised over the gloo group; only rank 0 logs and writes; a run stopped after
  an epoch continues with ``torchrun ... -m facecli resume`` to exactly the uninterrupted state.
* ``--sharded-head`` under torchrun computes the step of the unsharded one-process run,
  resumes exactly, and its checkpoint is an ordinary one (``facecli.load_model``, ``eval-lfw``).

This file is also the workers' script: ``python tests/test_distributed.py MODE ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Tolerances. Training this tiny float32 model is chaotic: a 1e-6 relative nudge of the weights
# grows ~20x per SGD step, so two processes (other reduction orders) and one process are
# compared after ONE step. Even then they differ by more than a few ulps, legitimately: the
# training-mode forward of this 32-px resnet18 (BatchNorm over 72 values at a 1x1 final map)
# carries ~3e-6 relative rounding into the embeddings, and the softmax at s=64 turns that into
# a ~8e-6 relative error of the whole gradient, the same in every layer. Measured on an AVX-512
# and on an AVX2 CPU, with 1 and 2 threads: one process in float32 is 7.7e-6 (relative L2 norm,
# per tensor) from the float64 gradient, two gloo processes 7.1e-6, and the two 6-7e-6 from each
# other. Element-wise tolerances cannot hold that: a small entry of a tensor whose large entries
# move by 2e-4 fails any rtol. So floating tensors are compared per tensor in the L2 norm
# (``_close_in_norm``): |a - b| <= ONE_STEP_RTOL |b| + ONE_STEP_ATOL sqrt(numel), 10x above the
# rounding measured, while per-rank instead of synchronised BatchNorm statistics, a missing or
# doubled gradient average, a wrong sample slice or wrong flips move the gradient by 1e-2 or more
# (relative). ONE_STEP_ATOL covers gradients that are zero in exact arithmetic (the bias of the
# BatchNorm before the embedding layer, which the last BatchNorm cancels: rounding noise ~3e-7).
# Two runs of the same number of processes are deterministic, so resumed and uninterrupted
# torchrun runs are compared exactly.
ONE_STEP_ATOL = 1e-6
ONE_STEP_RTOL = 1e-4


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("WANDB_MODE", "disabled")
    for key in ("DATASET_PATH", "CHECKPOINTS_DIR", "WANDB_API_KEY"):
        env.pop(key, None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_workers(mode: str, *args, timeout: int = 120) -> list[str]:
    """Run ``python this_file MODE ARGS`` as ranks 0 and 1 of a gloo group (no torchrun agent)."""
    env = _env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(HERE), mode, *map(str, args)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return _collect(procs, timeout, "rank")


def _collect(procs: list[subprocess.Popen], timeout: int, what: str) -> list[str]:
    """Each process's stdout once all have exited 0; a failure names the process and shows its output, and kills the rest."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"{what} {len(outs)} failed:\n{out[-2000:]}\n{err[-6000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _close_in_norm(a, b, what: str) -> None:
    """``a`` equals ``b`` up to float32 rounding of one training step, in the L2 norm (see Tolerances)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    diff, ref = (a.double() - b.double()).norm().item(), b.double().norm().item()
    allowed = ONE_STEP_RTOL * ref + ONE_STEP_ATOL * a.numel() ** 0.5
    assert diff <= allowed, f"{what}: |a - b| = {diff:.3e} > {allowed:.3e} (|b| = {ref:.3e}, relative {diff / max(ref, 1e-30):.2e})"


def _assert_same_state(a: dict, b: dict, what: str, exact: bool = False) -> None:
    import torch

    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        if x.is_floating_point() and not exact:
            _close_in_norm(x, y, f"{what} {k}")
        else:
            assert torch.equal(x, y), f"{what} {k} differs"


def _assert_same_training_state(a: dict, b: dict, exact: bool = False) -> None:
    for key in ("epoch", "batch_in_epoch", "step", "steps_per_epoch", "classes"):
        assert a[key] == b[key], key
    _assert_same_state(a["net_state"], b["net_state"], "net", exact)
    _assert_same_state(a["head_state"], b["head_state"], "head", exact)
    opt_a, opt_b = a["optimizer_state"], b["optimizer_state"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    _assert_same_state(
        {str(i): s["momentum_buffer"] for i, s in opt_a["state"].items()},
        {str(i): s["momentum_buffer"] for i, s in opt_b["state"].items()},
        "momentum",
        exact,
    )
    # the epoch's mean loss: the global batch's on every rank (rank 0's half would differ by %)
    assert a["min_loss"] is not None and abs(a["min_loss"] - b["min_loss"]) <= (0 if exact else 1e-5 * abs(b["min_loss"]))


def _tiny(dataset: Path, checkpoints: Path, run: str, batch: int, epochs: int) -> list[str]:
    # 72 images: a global batch of 72 makes every epoch one step, so epoch_NNN.pt is the state after step NNN.
    return [
        "--dataset-path", str(dataset), "--checkpoints-dir", str(checkpoints), "--run-name", run,
        "--backbone", "resnet18", "--image-size", "32", "--embedding-dim", "32", "--batch-size", str(batch),
        "--epochs", str(epochs), "--workers", "0", "--lr", "0.02", "--scheduler", "constant", "--seed", "3",
        "--no-wandb", "--device", "cpu", "--no-eval",
        # BatchNorm over the global batch: N processes then compute what one process computes
        # (per-process BatchNorm, the default, legitimately differs).
        "--sync-bn",
    ]  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _resume_copy(run: Path, epoch: int) -> Path:
    """A run directory holding what ``run`` held when it was stopped after ``epoch`` (its latest.pt then)."""
    import shutil

    stopped = run.with_name(run.name + "-stopped")
    stopped.mkdir()
    shutil.copyfile(run / f"epoch_{epoch:03d}.pt", stopped / "latest.pt")
    return stopped


# --------------------------------------------------------------------------- tests


def test_sharded_head_equals_unsharded_head():
    """Loss, embedding and weight gradients, CurricularFace's t, checkpoint gather/scatter and init."""
    outs = _two_workers("heads")
    for out in outs:
        assert "HEADS-OK 24" in out, out  # (7 heads + ElasticFace+) x 3 batch/class layouts were compared
        assert "DDP-STATS-OK 2" in out, out


def test_ddp_train_matches_one_process_and_resumes(synth_root, tmp_path):
    from conftest import cli

    result = cli("train", "arcface", *_tiny(synth_root, tmp_path, "single", 72, 1))
    assert result.exit_code == 0, result.output
    single = tmp_path / "arcface" / "single"

    out = _torchrun("-m", "facecli", "train", "arcface", *_tiny(synth_root, tmp_path, "ddp", 36, 3)).stdout
    run = tmp_path / "arcface" / "ddp"
    # Two processes of 36 compute the step one process of 72 computes.
    ddp1 = _load(run / "epoch_001.pt")
    assert ddp1["world_size"] == 2 and ddp1["step"] == 1 and ddp1["train_config"]["batch_size"] == 36
    _assert_same_training_state(ddp1, _load(single / "latest.pt"))
    # The logged loss is the global batch's (the ranks' mean), not rank 0's half.
    first_loss = [r["loss"] for r in _metrics(run) if "loss" in r][0]
    assert first_loss == pytest.approx([r["loss"] for r in _metrics(single) if "loss" in r][0], rel=1e-5)

    # Only rank 0 logs and writes.
    assert out.count("Training arcface") == 1 and out.count("epoch 1/3: mean loss") == 1 and out.count("Done:") == 1, out
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert [(r["step"], r.get("epoch")) for r in _metrics(run) if "epoch_loss" in r] == [(1, 1), (2, 2), (3, 3)]

    # Stopped after epoch 1 and continued with `torchrun ... facecli resume`: the same run, exactly.
    stopped = _resume_copy(run, 1)
    out = _torchrun("-m", "facecli", "resume", "arcface", "--run-name", stopped.name, "--checkpoints-dir", tmp_path).stdout
    assert out.count("Resuming arcface") == 1 and out.count("epoch 3/3: mean loss") == 1, out
    _assert_same_training_state(_load(stopped / "latest.pt"), _load(run / "latest.pt"), exact=True)


def test_sharded_head_under_torchrun(synth_root, synth_lfw_dir, tmp_path):
    import torch

    import facecli
    from conftest import cli
    from facecli.losses import build_head

    result = cli("train", "curricularface", *_tiny(synth_root, tmp_path, "single", 72, 1))
    assert result.exit_code == 0, result.output
    _torchrun("-m", "facecli", "train", "curricularface", "--sharded-head", *_tiny(synth_root, tmp_path, "sharded", 36, 2))
    run = tmp_path / "curricularface" / "sharded"

    # Sharding the 12 classes over 2 ranks computes the step one unsharded process computes
    # (weights, full-shape head momentum, CurricularFace's t).
    first = _load(run / "epoch_001.pt")
    single = _load(tmp_path / "curricularface" / "single" / "latest.pt")
    _assert_same_training_state(first, single)
    assert float(first["head_state"]["t"]) != 0.0

    # A sharded run resumes (each rank takes its rows of weights and momentum back) exactly.
    stopped = _resume_copy(run, 1)
    _torchrun("-m", "facecli", "resume", "curricularface", "--run-name", stopped.name, "--checkpoints-dir", tmp_path)
    path = stopped / "latest.pt"
    final = _load(path)
    assert final["step"] == 2
    _assert_same_training_state(final, _load(run / "latest.pt"), exact=True)

    # The checkpoint is an ordinary one: the unsharded head, load_model and eval-lfw read it.
    head = build_head("curricularface", 32, 12, **final["head"]["hparams"])
    head.load_state_dict(final["head_state"])
    model = facecli.load_model(path)
    assert model.embedding_dim == 32 and model.model == "curricularface"
    with torch.no_grad():
        emb = model.net(torch.zeros(2, 3, 32, 32))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    result = cli("eval-lfw", path, "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    assert "ccuracy" in result.output


def test_sharded_adaface_under_torchrun_equals_one_process(synth_root, tmp_path):
    """A head that reads the norms trains through the CLI with --sharded-head: the step, and
    AdaFace's running statistics, are those of the one-process run on the global batch."""
    from conftest import cli

    result = cli("train", "adaface", *_tiny(synth_root, tmp_path, "single", 72, 1))
    assert result.exit_code == 0, result.output
    _torchrun("-m", "facecli", "train", "adaface", "--sharded-head", *_tiny(synth_root, tmp_path, "sharded", 36, 1))
    sharded = _load(tmp_path / "adaface" / "sharded" / "latest.pt")
    single = _load(tmp_path / "adaface" / "single" / "latest.pt")
    _assert_same_training_state(sharded, single)
    assert sharded["world_size"] == 2 and float(sharded["head_state"]["batch_mean"]) != 20.0


# --------------------------------------------------------------------------- workers


def _heads_worker() -> None:
    """Rank body of test_sharded_head_equals_unsharded_head (RANK/WORLD_SIZE from the environment)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import facecli.engine.sharded_head as sh
    from facecli.engine.distributed import World
    from facecli.losses import HEADS, build_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    world = World(rank, ws, rank)
    D = 8
    # (classes, global labels, rows of rank 0): an even split; an odd class count whose rank 1
    # (classes 4..6) holds no target; unequal per-rank batches.
    layouts = [
        (10, [0, 9, 3, 5, 5, 1, 8, 2, 7, 4, 6, 0], 6),
        (7, [0, 1, 2, 3, 3, 2, 1, 0, 1, 3], 5),
        (9, [8, 0, 4, 5, 1, 7, 2, 6, 3], 6),
    ]
    checked = 0
    for name, hp in [(n, {}) for n in sorted(HEADS)] + [("elasticface", {"sort": 1.0})]:
        for C, label_list, rows0 in layouts:
            torch.manual_seed(100 + C)
            labels = torch.tensor(label_list)
            ref = build_head(name, D, C, **hp)
            if name == "curricularface":
                ref.t.fill_(0.3)
            ref.train()
            start_state = {k: v.clone() for k, v in ref.state_dict().items()}
            # embeddings near their class (easy), random (hard negatives), one nearly opposite (ArcFace's fallback)
            emb = 0.7 * torch.randn(len(labels), D)
            emb[::3] += 3 * F.normalize(ref.weight.detach()[labels[::3]], dim=1)
            emb[1] = -ref.weight.detach()[labels[1]] + 0.002 * torch.randn(D)  # not exactly -1: no clamp kink
            if ref.needs_embedding_norm:  # norms on both sides of AdaFace's mean, inside MagFace's [10, 110]
                emb = emb * torch.linspace(5.0, 40.0, len(labels))[:, None]
            emb_ref = emb.clone().requires_grad_(True)
            loss_ref = ref.loss(emb_ref, labels)  # the cross-entropy, plus MagFace's g
            loss_ref.backward()

            head = sh.ShardedMarginHead(name, D, C, world, **hp)
            head.load_full_state_dict(start_state)
            head.train()
            lo, hi = (0, rows0) if rank == 0 else (rows0, len(labels))
            mine = emb[lo:hi].clone().requires_grad_(True)
            loss = head.loss(mine, labels[lo:hi])
            loss.backward()
            tag = f"{name} C={C} rank={rank}"
            torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{tag} loss: {m}")
            torch.testing.assert_close(mine.grad, emb_ref.grad[lo:hi], atol=1e-5, rtol=1e-4, msg=lambda m: f"{tag} emb grad: {m}")
            a, b = sh.shard_range(C, rank, ws)
            torch.testing.assert_close(head.weight.grad, ref.weight.grad[a:b], atol=1e-5, rtol=1e-4, msg=lambda m: f"{tag} weight grad: {m}")
            if name == "curricularface":
                torch.testing.assert_close(head.local.t, ref.t, msg=lambda m: f"{tag} t: {m}")
            if name == "adaface":  # the statistics of the gathered (global) batch on every rank
                torch.testing.assert_close(head.local.batch_mean, ref.batch_mean, msg=lambda m: f"{tag} mean: {m}")
                torch.testing.assert_close(head.local.batch_std, ref.batch_std, msg=lambda m: f"{tag} std: {m}")

            # Checkpoint helpers: one SGD step with momentum on both, then gather / scatter.
            opt_ref = torch.optim.SGD([ref.weight], lr=0.1, momentum=0.9)
            opt = torch.optim.SGD([head.weight], lr=0.1, momentum=0.9)
            opt_ref.step()
            opt.step()
            full = head.full_state_dict()
            gathered = head.gather_optimizer_state(opt)
            if rank == 0:
                ref_sd = ref.state_dict()
                assert full.keys() == ref_sd.keys(), tag
                for k in ref_sd:
                    torch.testing.assert_close(full[k], ref_sd[k], atol=1e-6, rtol=1e-4, msg=lambda m: f"{tag} state {k}: {m}")
                torch.testing.assert_close(
                    gathered["state"][0]["momentum_buffer"], opt_ref.state_dict()["state"][0]["momentum_buffer"], atol=1e-5, rtol=1e-4
                )
                build_head(name, D, C, **hp).load_state_dict(full)  # loadable by the unsharded head
            else:
                assert full is None and gathered is None
            blob = [gathered]
            dist.broadcast_object_list(blob, src=0)
            fresh = sh.ShardedMarginHead(name, D, C, world, **hp)
            fresh.load_full_state_dict(ref.state_dict())
            opt2 = torch.optim.SGD([fresh.weight], lr=0.1, momentum=0.9)
            fresh.scatter_optimizer_state(opt2, blob[0])
            assert torch.equal(fresh.weight.detach(), ref.weight.detach()[a:b])
            assert torch.equal(opt2.state[fresh.weight]["momentum_buffer"], blob[0]["state"][0]["momentum_buffer"][a:b])
            checked += 1

    # Under DDP (loss replicated, unequal batches), the batch statistics follow the global batch.
    from facecli.engine.distributed import sum_over_ranks

    stats_checked = 0
    for name in ("adaface", "curricularface"):
        torch.manual_seed(7)
        labels = torch.tensor([0, 3, 1, 2, 4, 0, 1])
        emb = torch.randn(len(labels), D) * torch.linspace(5.0, 40.0, len(labels))[:, None]
        ref = build_head(name, D, 5).train()
        replica = build_head(name, D, 5).train()
        replica.load_state_dict(ref.state_dict())
        replica.follow_global_batch(sum_over_ranks)
        for _ in range(2):
            ref.loss(emb, labels)
            lo, hi = (0, 3) if rank == 0 else (3, len(labels))
            replica.loss(emb[lo:hi], labels[lo:hi])
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(replica.state_dict()[key], value, msg=lambda m: f"DDP {name} {key}: {m}")
        stats_checked += 1
    print(f"DDP-STATS-OK {stats_checked}")

    # Initialisation: the shards of a small head are the rows the unsharded head draws from the
    # same seed; a huge head's rows do not depend on the number of ranks either.
    torch.manual_seed(5)
    full = build_head("arcface", D, 11).weight.detach()
    after = torch.rand(1)
    torch.manual_seed(5)
    head = sh.ShardedMarginHead("arcface", D, 11, world)
    a, b = sh.shard_range(11, rank, ws)
    assert torch.equal(head.weight.detach(), full[a:b]) and torch.equal(torch.rand(1), after)
    sh.EXACT_INIT_MAX_ELEMENTS, sh._INIT_BLOCK_ROWS = 0, 4
    torch.manual_seed(6)
    whole = sh.ShardedMarginHead("arcface", D, 11, World(0, 1, 0)).weight.detach()
    torch.manual_seed(6)
    part = sh.ShardedMarginHead("arcface", D, 11, world).weight.detach()
    assert torch.equal(part, whole[a:b]) and len({tuple(r.tolist()) for r in whole}) == 11
    dist.barrier()
    dist.destroy_process_group()
    print(f"HEADS-OK {checked}")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "heads":
        _heads_worker()
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
