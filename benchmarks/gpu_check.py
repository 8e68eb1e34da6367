"""One prepared GPU proof: everything facecli promises on a GPU, checked in one run of < 8 minutes.

    benchmarks/gpu_check.sh                          # on a machine with one GPU (see benchmarks/README.md)
    benchmarks/gpu_check.sh --device cpu --quick     # dry run on the CPU: tiny sizes, CUDA-only rows skipped
    benchmarks/gpu_check.sh --budget-s 300           # total time budget (default 420 s)
    benchmarks/gpu_check.sh --only evaluation,resume # rerun some sections (environment always runs)

Sections (each item records one or more rows, or one "skipped: why" row; an item that raises
records a "failed" row with the error and the run goes on; the JSON is rewritten after every
item, so even a run killed at its time limit leaves what it measured):

* ``environment``: GPU, driver, torch; the AMP dtype facecli picks and whether GradScaler is
  on; the measured bf16 matmul rate (the practical peak) and the datasheet peak;
* ``train_step``: synthetic-input train step (resnet50 at 112x112, and ``iresnet50`` when that
  backbone is registered) images/s and model FLOP utilisation, eager and ``torch.compile``
  (compile time, graph breaks, recompiles from ``torch._dynamo``'s counters);
* ``data_pipeline``: decoded images/s out of the DataLoader, CPU decoding with
  ``--workers auto`` and ``--decode gpu`` (nvJPEG) on 250x250 JPEGs, and how far the device
  decoder's pixels are from the CPU path's;
* ``end_to_end``: ``facecli train`` images/s on 250x250 JPEGs (``facecli synth --image-size
  250``) with 4, 8 and 15 CPU decoding workers and ``--decode gpu``, GPU utilisation sampled
  through NVML while it trains;
* ``host_syncs``: host synchronisations per training step (``torch.cuda.set_sync_debug_mode
  ("warn")``, warnings counted over 30 steps) and peak GPU memory;
* ``models_amp``: all five models for 20 steps under bf16 and under fp16 + GradScaler, with
  losses and gradients checked finite;
* ``evaluation``: ``eval-lfw`` on the synthetic LFW, once with the out-of-memory halving
  forced (``torch.cuda.set_per_process_memory_fraction``), and a bf16-vs-fp32 threshold;
* ``resume``: save, resume, continue: interrupted + resumed equals uninterrupted;
* ``multi_process``: two processes on the one GPU (gloo on CUDA tensors), plain and sharded
  CurricularFace head, ``t`` per rank.

Writes one JSON (``$OUT/gpu_check.json`` when ``OUT`` is set, else
``benchmarks/results/gpu_check.json``, or ``--json``) and prints a table per section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (also puts this checkout's facecli first on sys.path)

SECTIONS = ("environment", "train_step", "data_pipeline", "end_to_end", "host_syncs", "models_amp", "evaluation", "resume", "multi_process")
MODELS = ("sphereface", "cosface", "arcface", "curricularface", "facenet")

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOPS, matched
# in order against torch.cuda.get_device_name(). Anything else: pass --peak-tflops.
BF16_PEAK_TFLOPS = [
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bGH200\b", 989.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bH200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bA10G\b", None),  # not published by NVIDIA
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.0),  # with fp32 accumulation, as torch uses
]


# ============================================================================ the frame
class Check:
    """Runs items under a time budget; every outcome is a row, and the JSON is kept current."""

    def __init__(self, args, device, out: Path):
        self.args, self.device, self.out = args, device, out
        self.cuda = device.type == "cuda"
        self.quick = args.quick
        self.t0 = time.perf_counter()
        self.sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
        self.work = Path(tempfile.mkdtemp(prefix="facecli-gpu-check-"))
        self.data: dict[str, Path] = {}
        self.amp = None  # the AMP dtype facecli's trainer picks here (set by the environment item)
        self.matmul = self.peak = None  # measured matmul TFLOPS, datasheet bf16 peak (environment item)
        self.flops: dict[str, int] = {}  # FLOPs of one train step per backbone (eager rows)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def item(self, section: str, name: str, fn, need_s: float = 0.0, cuda_only: bool = False) -> None:
        """Run ``fn`` (returns a row dict or a list of them) and record what happened."""
        if self.args.only and section not in self.args.only and section != "environment":
            return
        if cuda_only and not self.cuda:
            rows = [{"item": name, "status": "skipped", "why": "CUDA only (this is a run on the CPU)"}]
        elif self.left() < need_s:
            rows = [{"item": name, "status": "skipped", "why": f"time budget: {self.left():.0f} s left, this needs ~{need_s:.0f} s"}]
        else:
            t0 = time.perf_counter()
            try:
                got = fn()
                rows = [{"item": name, "status": "ok", **r} for r in (got if isinstance(got, list) else [got])]
            except Skip as e:
                rows = [{"item": name, "status": "skipped", "why": str(e)}]
            except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
                rows = [{"item": name, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}",
                         "where": traceback.format_exc(limit=-3)[-1500:]}]
            for r in rows:
                r["seconds"] = round(time.perf_counter() - t0, 1)
        self.sections[section].extend(rows)
        for r in rows:
            C.say(f"[{section}] {name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("item", "where")))
        self.save()

    def save(self) -> None:
        C.write_results("gpu_check", {
            "benchmark": "gpu_check",
            "config": {k: v for k, v in vars(self.args).items() if k not in ("json", "child_rank")} | {"device": str(self.device)},
            "environment": C.environment(self.device),
            "sections": self.sections,
            "wall_seconds": round(time.perf_counter() - self.t0, 1),
        }, self.out)


class Skip(Exception):
    """Raised by an item that cannot run here; recorded as a 'skipped' row with its message."""


# ============================================================================ helpers
def amp_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def train_config(**kw):
    """A TrainConfig from the keywords it knows (dataclass or pydantic: the lead is rewriting it)."""
    from facecli.engine.config import TrainConfig

    known = set(getattr(TrainConfig, "model_fields", None) or TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in kw.items() if k in known})


def config_has(name: str) -> bool:
    from facecli.engine.config import TrainConfig

    return name in set(getattr(TrainConfig, "model_fields", None) or TrainConfig.__dataclass_fields__)


@contextlib.contextmanager
def forced_amp(dtype_name: str):
    """Make the trainer pick ``dtype_name`` ('bf16' or 'fp16'): through TrainConfig's ``amp_dtype``
    when it has one (yields the keyword), else by hiding bf16 support for fp16."""
    import torch

    if config_has("amp_dtype"):
        yield {"amp_dtype": dtype_name}
        return
    if dtype_name == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bf16")
        yield {}
        return
    original = torch.cuda.is_bf16_supported
    torch.cuda.is_bf16_supported = lambda *a, **k: False  # the trainer then picks fp16 + GradScaler
    try:
        yield {}
    finally:
        torch.cuda.is_bf16_supported = original


def base_config(check: Check, run_name: str, **kw):
    """The in-process runs' configuration: the small 112x112 set, no evaluation, no W&B."""
    cfg = dict(
        model="arcface", train_dir=str(check.data["small"]), backbone=check.args.backbone, image_size=check.args.image_size,
        epochs=2, batch_size=check.args.small_batch, workers=check.args.small_workers, device=str(check.device),
        checkpoints_dir=str(check.work / "runs"), run_name=run_name, eval=False, wandb=False, log_every=5, lr=0.01,
    )
    cfg.update(kw)
    return train_config(**cfg)


def trainer_for(cfg, **kw):
    from facecli.engine.trainer import Trainer

    return Trainer(cfg, log=lambda m: None, warn=lambda m: C.say(f"  warning: {m}"), **kw)


def all_finite_grads(module) -> bool:
    import torch

    return all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)


def curricular_t(head) -> float | None:
    """CurricularFace's running t of a plain or sharded head (None for other heads)."""
    for h in (head, getattr(head, "local", None)):
        if h is not None and hasattr(h, "t"):
            return round(float(h.t), 6)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """Environment for facecli child processes: this checkout first on the path, one thread."""
    path = [str(C.REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def facecli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "facecli", *map(str, args)]


def train_help() -> str:
    return subprocess.run(facecli_cmd("train", "--help"), capture_output=True, text=True, env=child_env(COLUMNS="250"), timeout=120).stdout


# ============================================================================ data
def prepare_data(check: Check) -> dict:
    """The synthetic set at 250x250 (``facecli synth``), a hard-linked larger copy for end-to-end
    rates (decoding cost per file is the same; the page cache holds the distinct files)."""
    q = check.quick
    root = check.work / "synth250"
    t0 = time.perf_counter()
    proc = subprocess.run(
        facecli_cmd("synth", root, "--identities", 12 if q else 100, "--test-identities", 20 if q else 40,
                    "--images-per-identity", 6 if q else 20, "--image-size", 250),
        capture_output=True, text=True, env=child_env(), timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"facecli synth failed: {proc.stderr[-1000:]}")
    check.data["small"] = root / "CASIA-webface"
    check.data["lfw"] = root / "Labeled Faces in the Wild (LFW)"
    check.data["big"] = replicate(check.data["small"], check.work / "big", 2 if q else check.args.e2e_copies)
    n_big = sum(1 for _ in check.data["big"].rglob("*.jpg"))
    return {"synthetic_250px_images": sum(1 for _ in root.rglob("*.jpg")), "end_to_end_images": n_big,
            "generate_s": round(time.perf_counter() - t0, 1)}


def replicate(src: Path, dst: Path, copies: int) -> Path:
    """``copies`` x the identity folders of ``src`` under new names, files hard-linked (copied if links fail)."""
    for c in range(copies):
        for folder in sorted(p for p in src.iterdir() if p.is_dir()):
            out = dst / f"{c:03d}_{folder.name}"
            out.mkdir(parents=True, exist_ok=True)
            for f in folder.iterdir():
                try:
                    os.link(f, out / f.name)
                except OSError:
                    shutil.copyfile(f, out / f.name)
    return dst


# ============================================================================ environment
def environment_item(check: Check) -> dict:
    import torch

    from facecli.data.workers import resolve_workers, usable_cpus
    from facecli.hardware import amp_dtype

    check.amp = amp_dtype(check.device, True)
    row = {"device": torch.cuda.get_device_name(check.device) if check.cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "driver": driver_version(), "amp_dtype": amp_name(check.amp),
           "grad_scaler": check.amp == torch.float16, "usable_cpus": usable_cpus(), "workers_auto": resolve_workers("auto")}
    dtype = torch.bfloat16 if check.cuda else torch.float32
    row["matmul_tflops_measured"] = round(matmul_tflops(check.device, dtype, 8192 if check.cuda else 256, 3.0 if check.cuda else 0.3), 3)
    row["matmul_dtype"] = amp_name(dtype if check.cuda else None)
    row["bf16_peak_tflops_datasheet"] = check.args.peak_tflops or (datasheet_peak(row["device"]) if check.cuda else None)
    check.matmul = row["matmul_tflops_measured"]
    check.peak = row["bf16_peak_tflops_datasheet"]
    row.update(packages())
    return row


def packages() -> dict:
    """Every package facecli's pyproject.toml asks for (required, then extras), and the version
    this machine has: a recipe that works only by luck of the image shows up here."""
    import re
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    project = tomllib.loads((C.REPO / "pyproject.toml").read_text())["project"]
    wanted = [("required", r) for r in project["dependencies"]]
    wanted += [(extra, r) for extra, reqs in project.get("optional-dependencies", {}).items() if extra != "test" for r in reqs]
    have, missing = {}, []
    for group, req in wanted:
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
        try:
            have[name] = version(name)
        except PackageNotFoundError:
            have[name] = "missing"
            missing.append(name if group == "required" else f"{name} ({group})")
    return {"packages": have, "packages_missing": missing}


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - no NVML here: ask nvidia-smi, else say nothing
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            return None


def datasheet_peak(name: str) -> float | None:
    import re

    for pattern, value in BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return value
    return None


def matmul_tflops(device, dtype, n: int, seconds: float) -> float:
    """The rate of a large square matrix product on this device (what the card can really do)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    C.synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        reps += 10
        C.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ============================================================================ train step
STEP_BACKBONES = ("resnet50", "iresnet50")  # iresnet50 is measured when facecli registers it


def train_step_item(check: Check, backbone: str, compile_: bool) -> dict:
    """images/s and MFU of the trainer's step on a synthetic batch already on the device."""
    import torch

    from bench_train_step import Step, step_flops

    a = check.args
    from facecli.backbones import BACKBONES

    if backbone not in BACKBONES:
        raise Skip(f"no {backbone} backbone registered in facecli.backbones")
    backbone = "resnet18" if check.quick else backbone
    counters = dynamo_counters(reset=True) if compile_ else None
    step = Step(backbone, a.classes, a.step_batch, a.image_size, check.device, amp=check.amp, channels_last=check.cuda, compile=compile_)
    row = {"backbone": backbone, "mode": "compile" if compile_ else "eager", "batch": a.step_batch, "image_size": a.image_size,
           "amp": amp_name(check.amp)}
    if compile_:
        step()  # cold compile + first step
        row["compile_s"] = round(step.compile_seconds, 1)
    else:
        check.flops[backbone] = step_flops(step)  # counted on the eager model (the compiled one hides its ops)
    flops = check.flops.get(backbone) or step_flops(Step(backbone, a.classes, a.step_batch, a.image_size, check.device,
                                                         amp=check.amp, channels_last=check.cuda))
    per_step, steps = timed_steps(step, a.steps, 3 if check.cuda else 1, a.step_budget_s, check.device)
    achieved = flops / per_step / 1e12
    row.update(steps=steps, images_per_s=round(a.step_batch / per_step, 1), step_ms=round(1e3 * per_step, 2),
               step_tflop=round(flops / 1e12, 4), achieved_tflops=round(achieved, 2),
               mfu_vs_measured_matmul=f"{100 * achieved / check.matmul:.1f}%" if check.matmul else None,
               mfu_vs_datasheet=f"{100 * achieved / check.peak:.1f}%" if check.peak else None)
    if compile_:
        row.update(dynamo_counters(reset=False, before=counters))
        torch._dynamo.reset()
    del step
    if check.cuda:
        torch.cuda.empty_cache()
    return row


def dynamo_counters(reset: bool, before=None) -> dict:
    """Graph breaks, recompiles and graphs from torch._dynamo (cleared first when ``reset``)."""
    import torch._dynamo.utils as U

    if reset:
        U.counters.clear()
        getattr(U, "guard_failures", {}).clear()
        return {}
    return {"graph_breaks": int(sum(U.counters["graph_break"].values())),
            "recompiles": int(sum(len(v) for v in getattr(U, "guard_failures", {}).values())),
            "unique_graphs": int(U.counters["stats"].get("unique_graphs", 0)),
            "frames_compiled": int(U.counters["frames"].get("ok", 0))}


def timed_steps(step, steps: int, warmup: int, budget_s: float, device) -> tuple[float, int]:
    """Seconds per step over up to ``steps`` steps (fewer if ``budget_s`` runs out)."""
    for _ in range(warmup):
        step()
    C.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while n < steps:
        step()
        n += 1
        if n % 5 == 0 and time.perf_counter() - t0 > budget_s:
            break
    C.synchronize(device)
    return (time.perf_counter() - t0) / n, n


# ============================================================================ data pipeline
def loader_for(dataset, batch: int, workers: int, cuda: bool):
    """A DataLoader set up as the trainer's (persistent workers, prefetch 4, pinned memory on CUDA)."""
    from torch.utils.data import DataLoader

    from facecli.data.folders import collate_samples

    kw = dict(batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_samples, pin_memory=cuda, drop_last=True)
    if workers:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(dataset, **kw)


def pipeline_rate(check: Check, decode: str, workers: int) -> dict:
    """Decoded images/s delivered on the device (batches after the first 3, up to the time budget)."""
    from facecli.data.device_decode import to_device_batch
    from facecli.data.folders import IdentityFolderDataset
    from facecli.data.images import Preprocess

    pre = Preprocess(check.args.image_size)
    ds = IdentityFolderDataset(check.data["big"], pre, decode=decode, index_cache=check.work / "cache")
    loader = loader_for(ds, check.args.e2e_batch, workers, check.cuda)
    n, t0, batches = 0, None, 0
    for enc, y, bad in loader:
        x, y, bad = to_device_batch(enc, y, bad, pre, check.device)
        x = x.to(check.device, non_blocking=True)
        batches += 1
        if batches == 3:
            C.synchronize(check.device)
            t0 = time.perf_counter()
        elif batches > 3:
            n += x.shape[0]
            if time.perf_counter() - t0 > check.args.pipeline_budget_s:
                break
    C.synchronize(check.device)
    if t0 is None or n == 0:
        raise RuntimeError(f"only {batches} batches: the set is too small for a rate")
    return {"decode": decode, "workers": workers, "images_per_s": round(n / (time.perf_counter() - t0), 1), "images": n}


def decode_equivalence(check: Check) -> dict:
    """The device decoder's batch against the CPU path's, on the end-to-end set's files."""
    import torch

    from facecli.data.device_decode import Encoded, EncodedBatch, decode_batch
    from facecli.data.images import Preprocess, decode_image

    pre = Preprocess(check.args.image_size)
    files = sorted(check.data["small"].rglob("*.jpg"))[: 256]
    batch = EncodedBatch.collate([Encoded(f.read_bytes(), str(f)) for f in files])
    images, keep, bad = decode_batch(batch, pre, check.device)
    ref = torch.stack([decode_image(f, pre.image_size, pre.crop_fraction) for f in files])
    diff = (images.cpu().int() - ref.int()).abs().float()
    return {"device": str(check.device), "images": len(files), "decoded": int(keep.numel()), "bad": len(bad),
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 4),
            "pct_values_off_by_more_than_1": round(100 * float((diff > 1).float().mean()), 3)}


# ============================================================================ end to end
class UtilisationSampler:
    """GPU utilisation (%) sampled through NVML on a thread, with timestamps."""

    def __init__(self, device, period: float = 0.2):
        self.device, self.period, self.samples = device, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), float(torch.cuda.utilization(self.device))))
            except Exception:  # noqa: BLE001 - no NVML (pynvml missing): no samples, said in the row
                return
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def mean_between(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None


def end_to_end_item(check: Check, workers: int, decode: str) -> dict:
    """``facecli train`` on the 250x250 JPEGs: images/s from metrics.jsonl, GPU busy % meanwhile."""
    a = check.args
    if decode == "gpu" and "--decode" not in train_help():
        raise Skip("`facecli train` has no --decode flag yet (the device decoder is in facecli.data.device_decode; see the wiring notes)")
    run = f"e2e-{decode}-{workers}"
    args = ["train", "arcface", "--train-dir", check.data["big"], "--checkpoints-dir", check.work / "runs", "--run-name", run,
            "--backbone", "resnet18" if check.quick else "resnet50", "--image-size", a.image_size, "--batch-size", a.e2e_batch,
            "--epochs", 1, "--workers", workers, "--log-every", a.e2e_log_every, "--no-eval", "--no-wandb", "--device", str(check.device),
            "--lr", 0.01]
    if decode == "gpu":
        args += ["--decode", "gpu"]
    with UtilisationSampler(check.device) if check.cuda else contextlib.nullcontext() as sampler:
        proc = subprocess.run(facecli_cmd(*args), capture_output=True, text=True, env=child_env(FACECLI_CACHE_DIR=str(check.work / "cache")),
                              timeout=max(60, check.left()))
    if proc.returncode != 0:
        raise RuntimeError(f"facecli train exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
    windows = [json.loads(line) for line in (check.work / "runs" / "arcface" / run / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if w.get("images_per_sec")]
    rates = sorted(w["images_per_sec"] for w in windows[1:]) or [windows[0]["images_per_sec"]]
    row = {"decode": decode, "workers": workers, "images_per_s_median": round(rates[len(rates) // 2], 1), "windows": len(rates),
           "steps": len(windows) * a.e2e_log_every}
    if sampler is not None:
        row["gpu_util_pct_mean"] = sampler.mean_between(windows[0]["time"], windows[-1]["time"]) if windows else None
        row["gpu_util_samples"] = len(sampler.samples)
    shutil.rmtree(check.work / "runs" / "arcface" / run, ignore_errors=True)
    return row


# ============================================================================ host syncs
def host_sync_item(check: Check, model: str) -> dict:
    """Host synchronisations inside StepRunner's step (forward, backward, update), counted with
    torch.cuda.set_sync_debug_mode over steps 3..12 of a real run: only the step is watched, so
    the loop's logging reads and the checkpoint's copies are not counted against it."""
    import torch

    from facecli.engine.step import StepRunner

    first, steps = 3, 12
    trainer = trainer_for(base_config(check, f"syncs-{model}", model=model))
    calls, caught = [0], []
    original = StepRunner.__call__

    def watched(runner, *a, **k):
        calls[0] += 1
        if calls[0] <= first:
            return original(runner, *a, **k)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return original(runner, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    torch.cuda.reset_peak_memory_stats(check.device)
    StepRunner.__call__ = watched
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run(stop_after_steps=steps)
    finally:
        StepRunner.__call__ = original
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    counted = max(0, calls[0] - first)
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return {"model": model, "steps_counted": counted, "syncs_per_step": round(len(syncs) / max(1, counted), 2),
            "where": ", ".join(where[:8]), "peak_memory_gib": round(torch.cuda.max_memory_allocated(check.device) / 2**30, 2)}


# ============================================================================ models x AMP
def model_amp_item(check: Check, model: str, dtype_name: str) -> dict:
    """20 steps of ``model`` under ``dtype_name``: losses and gradients finite."""
    steps = 2 if check.quick else 20
    with forced_amp(dtype_name) if check.cuda else contextlib.nullcontext({}) as extra:
        trainer = trainer_for(base_config(check, f"amp-{model}-{dtype_name}", model=model, epochs=1 if check.quick else 2, **extra))
        picked = amp_name(trainer.amp_dtype)
        if check.cuda and picked != dtype_name:
            raise RuntimeError(f"asked for {dtype_name}, the trainer picked {picked}")
        result = trainer.run(stop_after_steps=steps)
    import math

    row = {"model": model, "amp": picked, "grad_scaler": trainer.parts.scaler.is_enabled(), "steps": result.steps,
           "last_loss": None if result.last_loss is None else round(result.last_loss, 4),
           "loss_finite": result.last_loss is not None and math.isfinite(result.last_loss), "grads_finite": all_finite_grads(trainer.parts.model)}
    if trainer.parts.scaler.is_enabled():
        row["scaler_scale"] = float(trainer.parts.scaler.get_scale())
    if model == "arcface" and dtype_name == (amp_name(check.amp)):
        check.data["checkpoint"] = trainer.run_dir / "latest.pt"
    if not (row["loss_finite"] and row["grads_finite"]):
        raise RuntimeError(f"non-finite loss or gradients: {row}")
    return row


# ============================================================================ evaluation
def lfw_sets(check: Check):
    from facecli.data.lfw import find_image_root, read_pairs
    from facecli.evaluation.runner import lfw_pair_file

    lfw = check.data["lfw"]
    root = find_image_root(lfw)
    return {name: read_pairs(lfw_pair_file(lfw, name), root) for name in ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt")}


def eval_model(check: Check):
    """The arcface checkpoint models_amp trained (trained here when that section did not run)."""
    import facecli

    if "checkpoint" not in check.data:
        model_amp_item(check, "arcface", amp_name(check.amp))
    return facecli.load_model(check.data["checkpoint"], device=check.device)


@contextlib.contextmanager
def recorded_chunks():
    """Records the chunk sizes evaluation's forward passes settle on (after out-of-memory halving)."""
    from facecli.evaluation import embedding

    chunks: list[int] = []
    original = embedding.embed_batch

    def recording(*a, **k):
        z, chunk = original(*a, **k)
        chunks.append(chunk)
        return z, chunk

    embedding.embed_batch = recording
    try:
        yield chunks
    finally:
        embedding.embed_batch = original


def eval_item(check: Check) -> dict:
    from facecli.data.workers import resolve_workers
    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.runner import evaluate_pair_set

    fm = eval_model(check)
    with recorded_chunks() as chunks:
        ev = evaluate_pair_set(Embedder(fm.net, fm.preprocess, check.device, workers=resolve_workers("auto")), lfw_sets(check)["pairs.txt"])
    check.data["scores"] = ev.scores
    return {"pairs": len(ev.scores), "accuracy": round(ev.report.accuracy, 4), "auc": round(ev.report.auc, 4),
            "forward_passes": ev.forward_passes, "seconds_eval": round(ev.seconds, 2), "chunk": max(chunks) if chunks else None}


def eval_oom_item(check: Check) -> dict:
    """The same evaluation with the GPU memory capped so that the first batch cannot fit."""
    import numpy as np
    import torch

    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.runner import evaluate_pair_set

    fm = eval_model(check)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(check.device).total_memory
    allowed = torch.cuda.memory_allocated(check.device) + check.args.oom_headroom_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), check.device)
    try:
        with recorded_chunks() as chunks:
            ev = evaluate_pair_set(Embedder(fm.net, fm.preprocess, check.device, workers=4), lfw_sets(check)["pairs.txt"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, check.device)
        torch.cuda.empty_cache()
    halved = bool(chunks) and min(chunks) < 2048  # images per piece (twice that through the network, with flips)
    if not halved:
        raise RuntimeError(f"the memory cap did not force a smaller chunk (chunks {sorted(set(chunks))})")
    same = check.data.get("scores")
    return {"memory_cap_gib": round(allowed / 2**30, 2), "chunk_settled": min(chunks), "accuracy": round(ev.report.accuracy, 4),
            "max_score_diff_vs_uncapped": None if same is None else float(np.abs(ev.scores - same).max())}


def eval_precision_item(check: Check) -> dict:
    """View 1 threshold with bf16 autocast (the default on CUDA) and in fp32 (``--no-amp``)."""
    from facecli.evaluation.embedding import Embedder
    from facecli.evaluation.runner import tune_threshold

    fm = eval_model(check)
    sets = lfw_sets(check)
    choices = {
        name: tune_threshold(Embedder(fm.net, fm.preprocess, check.device, workers=4, amp=amp), sets["pairsDevTrain.txt"], sets["pairsDevTest.txt"])
        for name, amp in (("amp", True), ("fp32", False))
    }
    a, b = choices["amp"], choices["fp32"]
    from facecli.hardware import amp_dtype

    return {"amp": amp_name(amp_dtype(check.device, True)), "threshold_amp": round(a.threshold, 5), "threshold_fp32": round(b.threshold, 5),
            "threshold_diff": round(abs(a.threshold - b.threshold), 5), "dev_test_acc_amp": round(a.test_accuracy, 4),
            "dev_test_acc_fp32": round(b.test_accuracy, 4), "dev_train_acc_amp": round(a.train_accuracy, 4),
            "dev_train_acc_fp32": round(b.train_accuracy, 4)}


# ============================================================================ resume
def resume_item(check: Check) -> dict:
    """Train 2 epochs straight; train 1.5, stop, resume to 2; then continue to 3: same weights?"""
    from facecli.engine.runs import prepare_resume

    runs = check.work / "runs"
    straight = trainer_for(base_config(check, "straight"))
    straight.run()
    part = trainer_for(base_config(check, "stopped"))
    half = part.steps_per_epoch * 3 // 2
    part.run(stop_after_steps=half)
    path, cfg, ckpt = prepare_resume(runs, "arcface", "stopped", "latest", {"device": str(check.device)})
    resumed = trainer_for(cfg, resume_from=path, resume_checkpoint=ckpt)
    resumed_from = resumed.step
    resumed.run()
    diff = max_weight_diff(straight, resumed)
    path, cfg, ckpt = prepare_resume(runs, "arcface", "stopped", "latest", {"device": str(check.device), "epochs": 3})
    more = trainer_for(cfg, resume_from=path, resume_checkpoint=ckpt)
    more.run()
    row = {"steps_straight": straight.step, "stopped_at": half, "resumed_at": resumed_from, "steps_resumed": resumed.step,
           "max_abs_weight_diff": diff, "exact": diff == 0.0, "continued_to_epoch": more.state.epoch, "steps_continued": more.step}
    if resumed_from != half or resumed.step != straight.step or more.step != straight.step + straight.steps_per_epoch:
        raise RuntimeError(f"positions do not add up: {row}")
    return row


def max_weight_diff(a, b) -> float:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point())


# ============================================================================ two processes
def multi_process_item(check: Check, sharded: bool) -> list[dict]:
    """Two ranks on the one device (gloo), CurricularFace, a few steps; ``t`` and loss per rank.

    Both ranks get LOCAL_RANK 0: with one GPU each must use cuda:0 (the trainer maps a local
    rank to its GPU), and NCCL refuses two ranks on one GPU, hence FACECLI_DIST_BACKEND=gloo.
    """
    spec = {"model": "curricularface", "sharded_head": sharded, "steps": 2 if check.quick else 6,
            "run_name": f"ddp-{'sharded' if sharded else 'plain'}"}
    port = free_port()
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), FACECLI_DIST_BACKEND="gloo", FACECLI_CACHE_DIR=str(check.work / "cache"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-rank", json.dumps(spec), "--device", str(check.device),
               "--work", str(check.work), *(["--quick"] if check.quick else [])]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(60, check.left()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"rank {rank} exited {p.returncode}: {err[-800:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    same_t = len({r["t"] for r in results}) == 1
    return [{"head": "sharded" if sharded else "plain", **r, "t_equal_on_ranks": same_t} for r in results]


def child_rank_main(args) -> int:
    """One rank of :func:`multi_process_item` (run by the parent with torchrun-style variables)."""
    import torch

    spec = json.loads(args.child_rank)
    device = C.resolve_device(args.device)
    check = argparse.Namespace(data={"small": Path(args.work) / "synth250" / "CASIA-webface"}, work=Path(args.work), device=device,
                               args=args)
    cfg = base_config(check, spec["run_name"], model=spec["model"], sharded_head=spec["sharded_head"])
    trainer = trainer_for(cfg)
    result = trainer.run(stop_after_steps=spec["steps"])
    row = {"rank": trainer.world.rank, "device": str(trainer.device), "steps": result.steps, "t": curricular_t(trainer.parts.head),
           "last_loss": None if result.last_loss is None else round(result.last_loss, 5)}
    print("RESULT " + json.dumps(row), flush=True)
    from facecli.engine import distributed as dist_utils

    dist_utils.shutdown(trainer.world)
    del torch
    return 0


# ============================================================================ the plan
def plan(check: Check) -> None:
    """Every item, in priority order; rough seconds each needs on an H200 machine decide what the budget skips."""
    q = check.quick
    s = (lambda x: 2 if q else x)  # rough seconds each item needs on an H200 machine
    check.item("environment", "environment", lambda: environment_item(check))
    check.item("environment", "synthetic data", lambda: prepare_data(check), need_s=s(40))
    if "small" not in check.data:
        return
    for backbone in STEP_BACKBONES:
        check.item("train_step", f"{backbone} eager", lambda b=backbone: train_step_item(check, b, False), need_s=s(25))
    # One compile row early, while the budget has room for it (last, it was always dropped);
    # the other backbones' compile rows go last and run if time is left.
    compile_item(check, STEP_BACKBONES[0])
    check.item("data_pipeline", "device decoder vs CPU path", lambda: decode_equivalence(check), need_s=s(10))
    check.item("data_pipeline", "CPU decode, --workers auto", lambda: pipeline_rate(check, "cpu", auto_workers()), need_s=s(25))
    check.item("data_pipeline", f"--decode gpu, {1 if q else 4} workers", lambda: pipeline_rate(check, "gpu", 1 if q else 4), need_s=s(25))
    for w in ([1] if q else [4, 8, 15]):
        check.item("end_to_end", f"facecli train, {w} CPU decoding workers", lambda w=w: end_to_end_item(check, w, "cpu"), need_s=s(45))
    check.item("end_to_end", "facecli train --decode gpu", lambda: end_to_end_item(check, 1 if q else 4, "gpu"), need_s=s(45),
               cuda_only=True)
    for model in MODELS:
        check.item("host_syncs", f"host syncs per step, {model}", lambda m=model: host_sync_item(check, m), need_s=s(10), cuda_only=True)
    dtypes = ["bf16", "fp16"] if check.cuda else ["fp32"]
    if not check.cuda:
        check.item("models_amp", "bf16 and fp16 + GradScaler", lambda: None, cuda_only=True)
    for dtype in dtypes:
        for model in MODELS:
            check.item("models_amp", f"{model} {dtype}", lambda m=model, d=dtype: model_amp_item(check, m, d), need_s=s(8))
    check.item("evaluation", "eval-lfw", lambda: eval_item(check), need_s=s(15))
    check.item("evaluation", "eval-lfw, out-of-memory halving forced", lambda: eval_oom_item(check), need_s=s(15), cuda_only=True)
    check.item("evaluation", "View 1 threshold, bf16 vs fp32", lambda: eval_precision_item(check), need_s=s(15), cuda_only=True)
    check.item("resume", "save, resume, continue", lambda: resume_item(check), need_s=s(30))
    for sharded in (False, True):
        name = f"2 processes, {'sharded' if sharded else 'plain'} CurricularFace head"
        check.item("multi_process", name, lambda sh=sharded: multi_process_item(check, sh), need_s=s(40))
    for backbone in STEP_BACKBONES[1:]:
        compile_item(check, backbone)


def compile_item(check: Check, backbone: str) -> None:
    check.item("train_step", f"{backbone} --compile", lambda: train_step_item(check, backbone, True), need_s=2 if check.quick else 120,
               cuda_only=not check.args.compile_on_cpu)


def auto_workers() -> int:
    from facecli.data.workers import resolve_workers

    return max(1, resolve_workers("auto"))


def print_tables(check: Check) -> None:
    for section, rows in check.sections.items():
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "where"))
        C.say("\n" + C.table(rows, [(k, k) for k in keys], title=f"== {section}"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--budget-s", type=float, default=420.0, help="total time budget; items that would overrun are skipped")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (overrides the table)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also run the --compile rows on the CPU (slow)")
    p.add_argument("--only", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=None,
                   help=f"run these sections only (comma-separated; environment always runs): {', '.join(SECTIONS)}")
    p.add_argument("--child-rank", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.only or []) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    q = args.quick
    args.backbone = "resnet18" if q else "resnet50"
    args.image_size = 32 if q else 112
    args.classes = 500 if q else 10_575
    args.step_batch = 8 if q else 256
    args.steps = 3 if q else 60
    args.step_budget_s = 5.0 if q else 15.0
    args.small_batch = 8 if q else 64
    args.small_workers = 0 if q else 8
    args.e2e_batch = 8 if q else 256
    args.e2e_copies = 25  # 2,000 distinct files x 25 = 50,000 images per end-to-end epoch
    args.e2e_log_every = 2 if q else 10
    args.pipeline_budget_s = 2.0 if q else 8.0
    args.oom_headroom_gib = 0.5  # above what the model holds: far below a 4,096-image forward pass
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_rank:
        return child_rank_main(args)
    C.set_threads(args.threads)
    device = C.resolve_device(args.device)
    if device.type != "cuda" and not args.quick:
        C.say("No CUDA device: this check is for a GPU. Use --device cpu --quick for a dry run of the script itself.")
        return 2
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    check = Check(args, device, out)
    C.say(f"GPU check on {device} ({'dry run, tiny sizes' if args.quick else 'full'}); budget {args.budget_s:.0f} s; work in {check.work}")
    try:
        plan(check)
    finally:
        print_tables(check)
        check.save()
        shutil.rmtree(check.work, ignore_errors=True)
    failed = sum(r["status"] == "failed" for rows in check.sections.values() for r in rows)
    C.say(f"\n{failed} failed item(s); {time.perf_counter() - check.t0:.0f} s in all; JSON: {out or C.RESULTS / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
