"""Multi-process training: DDP under torchrun and the class-sharded margin head, 2 gloo processes on the CPU.

* The sharded head's loss and gradients equal the unsharded head's on the global batch
  (all four heads, an odd class count with a rank holding no target, unequal per-rank
  batches), and its checkpoint helpers gather/scatter weights and optimizer state exactly.
* ``torchrun --nproc_per_node=2 -m facecli train`` with ``--batch-size 8`` computes what one
  process with ``--batch-size 16`` computes (weights, head, momentum, logged losses), with
  BatchNorm synchronised over the gloo group; only rank 0 logs and writes; a run stopped
  mid-epoch continues with ``torchrun ... -m facecli resume`` to the same final state.
* ``--sharded-head`` under torchrun trains to the same state as the unsharded one-process
  run, and its checkpoint is an ordinary one (``facecli.load_model``, ``facecli eval-lfw``).

This file is also the workers' script: ``python tests/test_distributed.py MODE ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Tolerances. Two processes reduce in another order than one (gradient all-reduce, BatchNorm
# statistics, half-size convolutions), so after a few SGD steps weights differ by float
# rounding only: ~1e-6. Per-rank (unsynchronised) BatchNorm statistics of 8 instead of 16
# samples move them by ~1e-2, a wrong gradient scale or a wrong sample slice by more.
WEIGHT_ATOL = 2e-4
WEIGHT_RTOL = 1e-3


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
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"rank {len(outs)} failed:\n{out[-2000:]}\n{err[-6000:]}"
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


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    import torch

    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        if x.is_floating_point():
            torch.testing.assert_close(x, y, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m: f"{what} {k}: {m}")
        else:
            assert torch.equal(x, y), f"{what} {k}: {x} != {y}"


def _assert_same_training_state(ddp: dict, single: dict) -> None:
    import torch

    for key in ("epoch", "batch_in_epoch", "step", "steps_per_epoch"):
        assert ddp[key] == single[key], key
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    _assert_same_state(ddp["net_state"], single["net_state"], "net")
    _assert_same_state(ddp["head_state"], single["head_state"], "head")
    # a real update happened: the weights moved away from anything trivially equal
    assert ddp["head_state"]["weight"].abs().sum() > 0
    opt_a, opt_b = ddp["optimizer_state"], single["optimizer_state"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    for idx in opt_a["state"]:
        ma, mb = opt_a["state"][idx]["momentum_buffer"], opt_b["state"][idx]["momentum_buffer"]
        assert ma.shape == mb.shape, idx
        torch.testing.assert_close(ma, mb, atol=WEIGHT_ATOL * 10, rtol=WEIGHT_RTOL, msg=lambda m: f"momentum {idx}: {m}")
    assert abs(ddp["epoch_loss_sum"] - single["epoch_loss_sum"]) < 1e-3 * max(1.0, abs(single["epoch_loss_sum"]))


def _tiny(dataset: Path, checkpoints: Path, batch: int, epochs: int) -> list[str]:
    return [
        "--dataset-path", str(dataset), "--checkpoints-dir", str(checkpoints), "--run-name", "r",
        "--backbone", "resnet18", "--image-size", "32", "--embedding-dim", "32", "--batch-size", str(batch),
        "--epochs", str(epochs), "--workers", "0", "--lr", "0.02", "--scheduler", "constant", "--seed", "3",
        "--no-wandb", "--device", "cpu", "--no-eval",
    ]  # fmt: skip


# --------------------------------------------------------------------------- tests


def test_sharded_head_equals_unsharded_head():
    """Loss, embedding and weight gradients, CurricularFace's t, checkpoint gather/scatter and init."""
    outs = _two_workers("heads")
    for out in outs:
        assert "HEADS-OK 12" in out, out  # 4 heads x 3 batch/class layouts were compared


def test_ddp_train_matches_one_process_and_resumes(synth_root, tmp_path):
    from conftest import cli

    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    result = cli("train", "arcface", *_tiny(synth_root, single_dir, 16, 2))
    assert result.exit_code == 0, result.output

    # Rank processes stop after 6 of the 8 steps (mid-epoch 2), as a signal would stop them ...
    first = _torchrun(HERE, "cli-stop-after", 6, "train", "arcface", *_tiny(synth_root, ddp_dir, 8, 2))
    run = ddp_dir / "arcface" / "r"
    stopped = _load(run / "latest.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (1, 2, 6)
    # ... epoch 1 was computed as by the one process (before any resume)
    _assert_same_training_state(_load(run / "epoch_001.pt"), _load(single_dir / "arcface" / "r" / "epoch_001.pt"))
    # ... and continue under torchrun with the real resume command.
    second = _torchrun("-m", "facecli", "resume", "arcface", "--run", "r", "--checkpoints-dir", ddp_dir)
    final = _load(run / "latest.pt")
    assert final["step"] == 8 and final["epoch"] == 2
    _assert_same_training_state(final, _load(single_dir / "arcface" / "r" / "latest.pt"))

    # Only rank 0 logs and writes.
    assert first.stdout.count("Training arcface") == 1 and first.stdout.count("epoch 1/2: mean loss") == 1, first.stdout
    assert second.stdout.count("Resuming arcface") == 1 and second.stdout.count("epoch 2/2: mean loss") == 1, second.stdout
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    single_rows = [json.loads(line) for line in (single_dir / "arcface" / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [(r.get("step"), "epoch_loss" in r) for r in rows]
    assert len(steps) == len(set(steps)), "a metric was written twice (a second rank wrote the run directory)"
    # The logged losses are those of the global batch (the ranks' mean), as in one process.
    epoch_losses = [r["epoch_loss"] for r in rows if "epoch_loss" in r]
    single_losses = [r["epoch_loss"] for r in single_rows if "epoch_loss" in r]
    assert len(epoch_losses) == 2
    assert epoch_losses == __import__("pytest").approx(single_losses, rel=1e-4)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["epoch_001.pt", "epoch_002.pt", "latest.pt", "min_loss.pt"]


def test_sharded_head_under_torchrun(synth_root, synth_lfw_dir, tmp_path):
    import torch

    import facecli
    from conftest import cli
    from facecli.losses import build_head

    single_dir, sharded_dir = tmp_path / "single", tmp_path / "sharded"
    result = cli("train", "curricularface", *_tiny(synth_root, single_dir, 16, 1))
    assert result.exit_code == 0, result.output
    _torchrun("-m", "facecli", "train", "curricularface", "--sharded-head", *_tiny(synth_root, sharded_dir, 8, 1))
    path = sharded_dir / "curricularface" / "r" / "latest.pt"
    ckpt = _load(path)

    # Sharding the 12 classes over 2 ranks trains exactly what one unsharded process trains.
    single = _load(single_dir / "curricularface" / "r" / "latest.pt")
    _assert_same_training_state(ckpt, single)
    assert float(ckpt["head_state"]["t"]) != 0.0  # CurricularFace's t was updated (and gathered)

    # The checkpoint is an ordinary one: the unsharded head, load_model and eval-lfw read it.
    head = build_head("curricularface", 32, 12, **ckpt["head"]["hparams"])
    head.load_state_dict(ckpt["head_state"])
    model = facecli.load_model(path)
    assert model.embedding_dim == 32 and model.model == "curricularface"
    with torch.no_grad():
        emb = model.net(torch.zeros(2, 3, 32, 32))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    result = cli("eval-lfw", path, "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    assert "ccuracy" in result.output


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
    for name in sorted(HEADS):
        for C, label_list, rows0 in layouts:
            torch.manual_seed(100 + C)
            labels = torch.tensor(label_list)
            ref = build_head(name, D, C)
            if name == "curricularface":
                ref.t.fill_(0.3)
            ref.train()
            start_state = {k: v.clone() for k, v in ref.state_dict().items()}
            # embeddings near their class (easy), random (hard negatives), one opposite (ArcFace's fallback)
            emb = 0.7 * torch.randn(len(labels), D)
            emb[::3] += 3 * F.normalize(ref.weight.detach()[labels[::3]], dim=1)
            emb[1] = -ref.weight.detach()[labels[1]]
            emb_ref = emb.clone().requires_grad_(True)
            loss_ref = F.cross_entropy(ref(emb_ref, labels), labels)
            loss_ref.backward()

            head = sh.ShardedMarginHead(name, D, C, world)
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
                build_head(name, D, C).load_state_dict(full)  # loadable by the unsharded head
            else:
                assert full is None and gathered is None
            blob = [gathered]
            dist.broadcast_object_list(blob, src=0)
            fresh = sh.ShardedMarginHead(name, D, C, world)
            fresh.load_full_state_dict(ref.state_dict())
            opt2 = torch.optim.SGD([fresh.weight], lr=0.1, momentum=0.9)
            fresh.scatter_optimizer_state(opt2, blob[0])
            assert torch.equal(fresh.weight.detach(), ref.weight.detach()[a:b])
            assert torch.equal(opt2.state[fresh.weight]["momentum_buffer"], blob[0]["state"][0]["momentum_buffer"][a:b])
            checked += 1

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


def _cli_stop_after_worker(steps: int, argv: list[str]) -> None:
    """Run the real CLI with every ``Trainer.run`` stopping after ``steps`` steps (its stop_after_steps)."""
    from facecli import cli
    from facecli.engine.trainer import Trainer

    run = Trainer.run
    Trainer.run = lambda self, stop_after_steps=None: run(self, stop_after_steps=steps)
    sys.argv = ["facecli", *argv]
    cli.main()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "heads":
        _heads_worker()
    elif mode == "cli-stop-after":
        _cli_stop_after_worker(int(sys.argv[2]), sys.argv[3:])
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
