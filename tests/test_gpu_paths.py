"""The CUDA branches of a training step and of evaluation, run on a CPU-only machine.

The forward half of a step (batch preparation, network, head, loss, statistics, gradient
clipping) is traced under ``FakeTensorMode`` on device ``cuda``: tensors there carry shapes,
dtypes and devices but no data, and a CPU tensor meeting a CUDA one raises
``FakeTensorDeviceMismatchError``, as it would on a GPU. The backward and the fused optimizer
step cannot run under it here (they ask for a real CUDA context); they run on CPU tensors
below, with the same code. README ("Testing the GPU path on a CPU") says what stays unseen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import facecli.data.images as images_mod
from facecli.backbones import EmbeddingNet
from facecli.data.images import Preprocess
from facecli.engine.config import TrainConfig
from facecli.engine.distributed import World
from facecli.engine.step import DeviceStats, StepRunner
from facecli.engine.optim import Schedule, build_optimizer
from facecli.engine.setup import NetWithLoss, RunParts, _head, adacos_scale, set_warmup_scale
from facecli.losses import LOSSES

MODELS = ["sphereface", "cosface", "arcface", "curricularface", "facenet"]
SIZE, BATCH, CLASSES, DIM = 32, 8, 10, 32


@pytest.fixture
def fresh_affine(monkeypatch):
    """normalize_batch caches its constants per device: fake ones must not outlive their mode."""
    monkeypatch.setattr(images_mod, "_AFFINE", {})


@pytest.fixture
def one_process_group():
    """A world of one (gloo, in memory): what --sharded-head needs to be built."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield World(rank=0, world_size=1, local_rank=0, local_world_size=1, host_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _config(model: str, sharded: bool, **kw) -> TrainConfig:
    base = dict(model=model, backbone="resnet18", image_size=SIZE, batch_size=BATCH, embedding_dim=DIM, workers=0,
                channels_last=True, clip_grad_norm=5.0, margin_warmup_epochs=1.0, scale_warmup=True, sharded_head=sharded)
    return TrainConfig(**{**base, **kw})


def _channels_last(model: torch.nn.Module) -> None:
    """``model.to(memory_format=channels_last)`` as setup.build_parts does; fake parameters cannot be
    swapped by Module._apply, so the 4-D ones are replaced directly (same layout, same result)."""
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.ndim == 4:
                module._parameters[key] = torch.nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last))


def _runner(cfg: TrainConfig, world: World, device: torch.device) -> StepRunner:
    """The parts build_parts makes, minus the data (the same constructors and the same order)."""
    net = EmbeddingNet(cfg.backbone, cfg.embedding_dim, normalize=LOSSES[cfg.model].normalize_embeddings, image_size=cfg.image_size)
    if cfg.sharded_head:  # _head shards only in a world of several processes; this one has one
        from facecli.engine.sharded_head import ShardedMarginHead

        head = ShardedMarginHead(cfg.model, cfg.embedding_dim, CLASSES, world, **cfg.loss_hparams())
    else:
        head = _head(cfg, world, CLASSES)
    if cfg.scale_warmup and cfg.margin_warmup_epochs > 0:
        set_warmup_scale(head, adacos_scale(CLASSES))
    model = NetWithLoss(net, head)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"  # build_parts' rule
    if channels_last:
        _channels_last(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    schedule = Schedule(cfg.scheduler, cfg.lr, 10, 5, cfg.warmup_epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    parts = RunParts(Preprocess(image_size=SIZE), None, [], net, head, model, None, optimizer, schedule, scaler, 5, channels_last)
    return StepRunner(parts, model, cfg, world, device, None)


def _host_batch():
    """A batch as the loader hands it over: uint8 images and int64 labels on the host."""
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, device="cpu")
    labels = torch.arange(BATCH, device="cpu") % (BATCH // 2)
    return images, labels


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_training_forward_half_on_fake_cuda(model, sharded, request, fresh_affine):
    world = request.getfixturevalue("one_process_group") if sharded else World()
    if sharded and not LOSSES[model].shardable:
        pytest.skip(f"{model} has no sharded head")
    cfg = _config(model, sharded)
    with FakeTensorMode(), torch.device("cuda"):
        device = torch.device("cuda", 0)
        runner = _runner(cfg, world, device)
        assert runner.parts.channels_last and runner.parts.head.sharded == sharded
        images, labels = _host_batch()
        stats = DeviceStats(device)
        for step in (0, 7):  # inside the margin/scale warm-up, then past it
            loss, global_loss = runner.forward(images, labels, step, (BATCH,))
            assert loss.device == device and loss.shape == () and loss.dtype == torch.float32
            stats.add(global_loss, ~torch.isfinite(global_loss), step, BATCH)
        for p in runner.params:  # the backward cannot run here: gradients of the right shape stand in
            p.grad = torch.randn_like(p)
        runner._clip()
        assert all(p.grad.device == device for p in runner.params)


def test_fake_cuda_catches_a_cpu_tensor_in_the_step(fresh_affine, monkeypatch):
    """The guarantee the tests above rest on: a host tensor meeting a device one fails here."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with FakeTensorMode(), torch.device("cuda"):
        runner = _runner(_config("arcface", False), World(), torch.device("cuda", 0))
        images, labels = _host_batch()
        monkeypatch.setattr(runner, "device", torch.device("cpu"))  # labels left on the host
        with pytest.raises((FakeTensorDeviceMismatchError, RuntimeError), match="device"):
            runner.forward(images.to("cuda"), labels, 0, (BATCH,))


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # autocast off: no GPU under the fake
def test_evaluation_embedder_on_fake_cuda(fresh_affine, monkeypatch):
    from simgpu import SimulatedCuda

    from facecli.evaluation.embedding import _autocast_dtype, embed_batch

    with monkeypatch.context() as m:  # what evaluation asks autocast for on a (simulated) bf16 GPU
        SimulatedCuda(1).install(m)
        dtype = _autocast_dtype(torch.device("cuda", 0), True)
    assert dtype == torch.bfloat16
    with FakeTensorMode(), torch.device("cuda"):
        device = torch.device("cuda", 0)
        net = EmbeddingNet("resnet18", DIM, image_size=SIZE).eval()
        _channels_last(net)
        images, _ = _host_batch()
        with torch.inference_mode():
            z, chunk = embed_batch(net, images, Preprocess(image_size=SIZE), device, dtype, True, 3)
        assert z.device == device and tuple(z.shape) == (BATCH, DIM) and z.dtype == torch.float32 and chunk == 3


def test_evaluation_halving_covers_input_preparation(monkeypatch):
    """Out of memory while preparing the input (float copies, mirrors) halves the piece as well."""
    import facecli.evaluation.embedding as emb

    real = emb.normalize_batch
    seen = []

    def tight(images, preprocess):
        if images.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, input preparation)")
        seen.append(images.shape[0])
        return real(images, preprocess)

    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", DIM, image_size=SIZE).eval()
    images, _ = _host_batch()
    with torch.inference_mode():
        want, _ = emb.embed_batch(net, images, Preprocess(image_size=SIZE), torch.device("cpu"), None, True, BATCH)
        monkeypatch.setattr(emb, "normalize_batch", tight)
        got, chunk = emb.embed_batch(net, images, Preprocess(image_size=SIZE), torch.device("cpu"), None, True, BATCH)
    assert chunk == 2 and max(seen) == 2
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


# ------------------------------------------------ what the step asks autocast for


class _AutocastLog:
    """torch.autocast, recording each (device_type, dtype, enabled) asked for."""

    def __init__(self, monkeypatch):
        self.asked, real = [], torch.autocast

        def recording(device_type, dtype=None, enabled=True, cache_enabled=None):
            self.asked.append((device_type, dtype, enabled))
            return real(device_type, dtype=dtype, enabled=False)  # no autocast without a GPU anyway

        monkeypatch.setattr(torch, "autocast", recording)


@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_policy_on_a_simulated_gpu(sim_gpu, monkeypatch, bf16, want):
    from facecli.hardware import amp_dtype
    from facecli.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert amp_dtype(torch.device("cuda", 0)) == want
    assert amp_dtype(torch.device("cuda", 0), enabled=False) is None and amp_dtype(torch.device("cpu")) is None
    assert amp_dtype(torch.device("cuda", 0), choice="fp16") == torch.float16
    if not bf16:
        with pytest.raises(UserError, match="no native bf16"):
            amp_dtype(torch.device("cuda", 0), choice="bf16")


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
@pytest.mark.parametrize("model", ["arcface", "curricularface"])
def test_step_runs_under_autocast_and_the_margin_in_fp32(fresh_affine, monkeypatch, model):
    """The network under bf16 autocast on cuda; the head's margin arithmetic with autocast off."""
    log = _AutocastLog(monkeypatch)
    with FakeTensorMode(), torch.device("cuda"):
        device = torch.device("cuda", 0)
        runner = _runner(_config(model, False), World(), device)
        runner.amp = torch.bfloat16
        images, labels = _host_batch()
        runner.forward(images, labels, 0, (BATCH,))
    assert log.asked[0] == ("cuda", torch.bfloat16, True)
    assert ("cuda", None, False) in log.asked[1:]


# ------------------------------------------------ torch.compile: one graph per forward

EXPLAIN_MODELS = MODELS


@pytest.mark.parametrize("model", EXPLAIN_MODELS)
def test_training_forward_has_no_graph_breaks(model):
    """dynamo traces the whole training forward (network, head, loss) as one graph."""
    torch.manual_seed(0)
    cfg = _config(model, False, channels_last=False)
    runner = _runner(cfg, World(), torch.device("cpu"))
    runner._set_margin_weight(0)  # inside the warm-ups: the scale and margin are ramped tensors
    images, labels = _host_batch()
    x = runner._inputs(images, 0)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(runner.forward_module)(x, labels)
    finally:
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [str(b.reason) for b in explained.break_reasons]


# ------------------------------------------------ no Python number becomes a device tensor in the step


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("warmup", [False, True], ids=["published-recipe", "warm-ups"])
def test_step_builds_no_device_tensor_from_host_numbers(fresh_affine, monkeypatch, model, warmup):
    """torch.tensor / torch.as_tensor with a device inside a step copy from the host and, on a
    GPU, wait for it. A whole step (forward, backward, update, statistics) on CPU tensors, counted."""
    cfg = _config(model, False, channels_last=False, margin_warmup_epochs=1.0 if warmup else 0.0, scale_warmup=warmup)
    device = torch.device("cpu")
    runner = _runner(cfg, World(), device)
    stats = DeviceStats(device)
    images, labels = _host_batch()
    runner(images, labels, 0, (BATCH,))  # warm: caches (normalisation constants) fill once
    calls = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            if kwargs.get("device") is not None:
                calls.append((_name, kwargs["device"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    for step in (1, 2):
        loss, bad = runner(images, labels, step, (BATCH,))
        stats.add(loss, bad, step, BATCH)
    assert calls == []
    assert torch.isfinite(loss) and not bool(bad)
