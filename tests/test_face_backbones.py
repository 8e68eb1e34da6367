"""The face backbones (IResNet-18/34/50/100 of ArcFace, MobileFaceNet): the published sizes and
FLOPs, the input/16 final map, the float32 embedding layer under autocast, training with every
model, checkpoints through load_model, eval-lfw, embed and resume, DDP with the sharded head,
torch.compile; and checkpoints of the torchvision ResNets written before them still load.

Sizes and FLOPs are counted on the meta device (no memory, no arithmetic), so even IResNet-100
at 112 px costs nothing; everything that runs does so at 32 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import facecli
from conftest import TINY_TRAIN_ARGS, cli, one_line_error
from facecli.backbones import BACKBONES, EmbeddingNet
from facecli.engine.checkpoint import load_checkpoint, save_checkpoint

FACE_BACKBONES = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"]
MODELS = ["sphereface", "cosface", "arcface", "curricularface", "facenet"]


@dataclass(frozen=True)
class Published:
    """Parameters and FLOPs (2 per multiply-add, as FlopCounterMode counts) at 112x112, and where they are published."""

    embedding_dim: int
    params: float | None
    gflops: float | None
    source: str


# OpenVINO Open Model Zoo converts insightface's MXNet models and lists "MParams" and "GFLOPs"
# (= 2 x GMACs). insightface's arcface_torch README lists "FLOPs" that are ptflops multiply-adds
# (r18 2.6, r50 6.3, r100 12.1), i.e. half of these. MobileFaceNet's paper: 0.99M parameters.
PUBLISHED = {
    "iresnet18": Published(512, None, 2 * 2.6e9, "arcface_torch README, r18: 2.6 G multiply-adds"),
    "iresnet34": Published(512, 34.129e6, 8.934e9, "OpenVINO face-recognition-resnet34-arcface (LResNet34E-IR)"),
    "iresnet50": Published(512, 43.576e6, 12.637e9, "OpenVINO face-recognition-resnet50-arcface (LResNet50E-IR)"),
    "iresnet100": Published(512, 65.131e6, 24.209e9, "OpenVINO face-recognition-resnet100-arcface (LResNet100E-IR)"),
    "mobilefacenet": Published(128, 0.99e6, 0.449e9, "Chen et al. 2018 (0.99M); OpenVINO face-recognition-mobilefacenet-arcface"),
}


def _meta_net(name: str, embedding_dim: int = 512, image_size: int = 112) -> EmbeddingNet:
    with torch.device("meta"):
        return EmbeddingNet(name, embedding_dim, image_size=image_size).eval()


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _flops(net: torch.nn.Module, image_size: int) -> int:
    with torch.device("meta"):
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def _iresnet_params(stages: tuple[int, ...], embedding_dim: int, side: int) -> int:
    """The parameter count of the published LResNetE-IR structure, by arithmetic (independent of the module code)."""
    bn, prelu = 2, 1  # per channel
    total = 3 * 64 * 9 + 64 * (bn + prelu)
    cin = 64
    for blocks, width in zip(stages, (64, 128, 256, 512)):
        for i in range(blocks):
            c = cin if i == 0 else width
            total += c * bn + c * width * 9 + width * (bn + prelu) + width * width * 9 + width * bn
            if i == 0:
                total += c * width + width * bn  # 1x1 stride-2 shortcut + BN
        cin = width
    return total + 512 * bn + 512 * side * side * embedding_dim + embedding_dim + embedding_dim * bn


# ----------------------------------------------------------------- structure
@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_parameters_and_flops_match_the_published_figures(name):
    pub = PUBLISHED[name]
    net = _meta_net(name, pub.embedding_dim)
    if pub.params is not None:
        assert _params(net) == pytest.approx(pub.params, rel=0.02), pub.source
    if pub.gflops is not None:
        assert _flops(net, 112) == pytest.approx(pub.gflops, rel=0.02), pub.source


@pytest.mark.parametrize("name", ["iresnet18", "iresnet34", "iresnet50", "iresnet100"])
@pytest.mark.parametrize("image_size, side", [(112, 7), (32, 2)])
def test_iresnet_is_the_published_structure_at_any_input(name, image_size, side):
    """Exactly the arithmetic count of stem + IR blocks + E output on the input/16 map."""
    net = _meta_net(name, 256, image_size)
    assert _params(net) == _iresnet_params(BACKBONES[name].stages, 256, side)
    fc = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(fc) == 1 and fc[0].in_features == 512 * side * side


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_output_shape_at_32_px_and_no_neck(name):
    torch.manual_seed(0)
    net = EmbeddingNet(name, 64, image_size=32).eval()
    with torch.no_grad():
        emb = net(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 64) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert not any(k.startswith("neck.") for k in net.state_dict())  # the backbone makes the embedding
    assert net.config() == {"backbone": name, "embedding_dim": 64, "normalize": False, "image_size": 32}
    # FaceNet: the same network, L2-normalised
    facenet = EmbeddingNet(name, 64, normalize=True, image_size=32).eval()
    with torch.no_grad():
        unit = facenet(torch.randn(3, 3, 32, 32))
    assert torch.allclose(unit.norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_embedding_layer_runs_in_float32_under_autocast(name):
    """Trunk in bf16, embedding layer (E / GDC output) on float32 features with autocast off, as insightface does."""
    net = EmbeddingNet(name, 32, image_size=32).train()
    seen: dict[str, torch.dtype] = {}
    net.backbone.trunk.register_forward_hook(lambda m, i, o: seen.update(trunk=o.dtype))
    fc = [m for m in net.backbone.output.modules() if isinstance(m, torch.nn.Linear)][0]
    fc.register_forward_hook(lambda m, i, o: seen.update(fc_in=i[0].dtype, fc_out=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(torch.randn(4, 3, 32, 32))
    assert seen == {"trunk": torch.bfloat16, "fc_in": torch.float32, "fc_out": torch.float32}
    assert emb.dtype == torch.float32


def test_embedding_batchnorm_scale_is_fixed_at_one():
    """insightface's fix_gamma: the last BatchNorm only shifts; the optimizer never sees its scale."""
    from facecli.engine.optim import build_optimizer

    net = EmbeddingNet("mobilefacenet", 16, image_size=32)
    last_bn = net.backbone.output[-1]
    assert isinstance(last_bn, torch.nn.BatchNorm1d) and not last_bn.weight.requires_grad and last_bn.bias.requires_grad
    optimized = {id(p) for g in build_optimizer("sgd", net.parameters(), 0.1).param_groups for p in g["params"]}
    assert id(last_bn.weight) not in optimized and id(last_bn.bias) in optimized


def test_compiles_without_graph_breaks_in_channels_last_with_autocast():
    for name in ("iresnet18", "mobilefacenet"):
        net = EmbeddingNet(name, 16, image_size=32).train().to(memory_format=torch.channels_last)
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
        x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = compiled(x)
        emb.float().square().sum().backward()
        assert emb.dtype == torch.float32 and all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_face_backbone_with_pretrained_is_one_error_line(synth_root, tmp_path):
    args = list(TINY_TRAIN_ARGS)
    args[args.index("resnet18")] = "iresnet18"
    line = one_line_error(cli("train", "arcface", "--dataset-path", synth_root, "--checkpoints-dir", tmp_path, *args, "--pretrained"))
    assert "iresnet18 has no ImageNet weights" in line and "--no-pretrained" in line


# ----------------------------------------------------------------- training, checkpoints, evaluation
def _train_args(backbone: str, **overrides: str) -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    args[args.index("resnet18")] = backbone
    for flag, value in overrides.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return args


@pytest.mark.parametrize("backbone", ["iresnet18", "mobilefacenet"])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_with_face_backbones(model, backbone, synth_root, tmp_path):
    result = cli("train", model, "--dataset-path", synth_root, "--checkpoints-dir", tmp_path, "--run-name", "r",
                 *_train_args(backbone), "--no-eval", "--log-every", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Done: 1 epoch(s), 4 steps" in result.output
    ck = load_checkpoint(tmp_path / model / "r" / "latest.pt", expect_model=model)
    dim = 128 if model == "facenet" else 512
    assert ck["net"] == {"backbone": backbone, "embedding_dim": dim, "normalize": model == "facenet", "image_size": 32}
    state = ck["net_state"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert not any(k.startswith("neck.") for k in state)
    # trained: BatchNorm statistics moved and every trainable tensor (and the head) has momentum
    assert all(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith("running_mean"))
    assert len(ck["optimizer_state"]["state"]) == sum(1 for _ in _trainable(backbone, dim)) + (model != "facenet")  # + head
    # the embedding BatchNorm's fixed scale stayed 1
    last = len(_meta_net(backbone, dim, 32).backbone.output) - 1
    assert torch.equal(state[f"backbone.output.{last}.weight"], torch.ones(dim))


def _trainable(backbone: str, dim: int):
    return (p for p in _meta_net(backbone, dim, 32).parameters() if p.requires_grad)


@pytest.mark.parametrize("backbone", ["iresnet18", "mobilefacenet"])
def test_checkpoint_round_trips_through_load_model_eval_lfw_and_embed(backbone, synth_root, synth_lfw_dir, tmp_path):
    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer

    cfg = TrainConfig(model="arcface", train_dir=str(synth_root / "CASIA-webface"), backbone=backbone, image_size=32, batch_size=16,
                      epochs=1, workers=0, lr=0.01, device="cpu", checkpoints_dir=str(tmp_path), run_name="r", eval=False,
                      wandb=False, dropout=0.2)  # fmt: skip
    trainer = Trainer(cfg, log=lambda _: None, warn=lambda _: None)
    trainer.run()
    path = tmp_path / "arcface" / "r" / "latest.pt"

    # load_model rebuilds exactly the trained network
    model = facecli.load_model(path)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.net(x), trainer.net.eval()(x))

    out = tmp_path / "lfw.json"
    r = cli("eval-lfw", path, "--lfw-dir", synth_lfw_dir, "--json", out, "--device", "cpu", "--workers", "0", "--batch-size", "64")
    assert r.exit_code == 0, r.output
    assert "AUC" in r.stdout and out.is_file()

    faces = sorted((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))[:4]
    r = cli("embed", path, *faces, "--out", tmp_path / "e.npz", "--device", "cpu")
    assert r.exit_code == 0, r.output
    emb = np.load(tmp_path / "e.npz")["embeddings"]
    assert emb.shape == (4, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_face_backbone_run_resumes_exactly(synth_root, tmp_path):
    """Stopped after epoch 1 and resumed: the weights of an uninterrupted run (dropout RNG, fixed BN scale, momentum)."""
    # a constant schedule: a cosine one over 1 epoch (run B's start) differs from one over 2
    # (no lr warm-up: it is clamped to the run's length; a margin warm-up of fixed length: the default, 30% of the epochs, differs between a 2-epoch and a 1-epoch run)
    common = ["--dataset-path", synth_root, "--checkpoints-dir", tmp_path, "--no-eval", "--dropout", "0.3", "--scheduler", "constant", "--margin-warmup-epochs", "1.5", "--warmup-epochs", "0"]
    assert cli("train", "cosface", "--run-name", "A", *common, *_train_args("iresnet18", epochs="2")).exit_code == 0
    assert cli("train", "cosface", "--run-name", "B", *common, *_train_args("iresnet18", epochs="1")).exit_code == 0
    r = cli("resume", "cosface", "--run", "B", "--epochs", "2", "--checkpoints-dir", tmp_path)
    assert r.exit_code == 0, r.output
    a, b = (load_checkpoint(tmp_path / "cosface" / run / "latest.pt") for run in ("A", "B"))
    assert (a["step"], b["step"]) == (8, 8)
    for k in a["net_state"]:
        assert torch.equal(a["net_state"][k], b["net_state"][k]), k


def test_ddp_with_sharded_head_equals_one_process(synth_root, tmp_path, monkeypatch):
    """2 gloo processes of 36 with --sharded-head compute the step of one process of 72 (BatchNorm synchronised in the GDC output too).

    Tolerance: test_distributed's 1e-4 presumes a step that float32 computes to ~1e-5, as
    resnet18's. Here all tensors but one agree to ~1e-5 too, but the stem convolution's
    gradient (a sum over every pixel of the batch, after a BatchNorm; norm ~180 at this
    initialisation) is float32-sensitive to ~1.5e-3 on its own: for IResNet-18, one process is
    8e-4 (median over tensors) from a float64 recomputation of the same step, two processes 1e-3.
    So 5e-3 here; a wrong average, slice or unsynchronised BatchNorm moves gradients by 1e-2 or more.
    """
    import test_distributed as td

    monkeypatch.setattr(td, "ONE_STEP_RTOL", 5e-3)

    def args(run: str, batch: int) -> list[str]:
        a = td._tiny(synth_root, tmp_path, run, batch, 1)
        a[a.index("resnet18")] = "mobilefacenet"
        return a

    result = cli("train", "arcface", *args("single", 72))
    assert result.exit_code == 0, result.output
    td._torchrun("-m", "facecli", "train", "arcface", "--sharded-head", *args("ddp", 36))
    ddp = td._load(tmp_path / "arcface" / "ddp" / "latest.pt")
    assert ddp["world_size"] == 2 and ddp["net"]["backbone"] == "mobilefacenet"
    td._assert_same_training_state(ddp, td._load(tmp_path / "arcface" / "single" / "latest.pt"))


# ----------------------------------------------------------------- checkpoints from before the face backbones
def test_old_format_resnet_checkpoint_still_loads(trained_checkpoint, synth_lfw_dir, tmp_path):
    """A resnet checkpoint whose `net` has no image_size (as every checkpoint written before) loads, evaluates and embeds."""
    ck = load_checkpoint(trained_checkpoint)
    # The state-dict keys are torchvision's under backbone.trunk. plus neck.*, as they always were.
    tv = {f"backbone.trunk.{k}" for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    neck = {f"neck.{i}.{p}" for i in (0, 3) for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(ck["net_state"]) == tv | neck | {"neck.2.weight"}

    old = dict(ck, net={k: v for k, v in ck["net"].items() if k != "image_size"})
    old_path = tmp_path / "old.pt"
    save_checkpoint(old, old_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(facecli.load_model(old_path).net(x), facecli.load_model(trained_checkpoint).net(x))
    r = cli("eval-lfw", old_path, "--lfw-dir", synth_lfw_dir, "--device", "cpu", "--workers", "0", "--batch-size", "64")
    assert r.exit_code == 0, r.output
    face = next((synth_lfw_dir / "lfw_funneled").rglob("*.jpg"))
    r = cli("embed", old_path, face, "--out", tmp_path / "e.npy", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "e.npy").shape == (1, 512)
