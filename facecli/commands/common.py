"""What every command shares: the one-line error guard, settings, progress bars, the model
and embedder a command starts from, and the evaluation options written once.

Commands import from here, never from :mod:`facecli.cli` (which only assembles the app).
An option used by several commands is one ``Annotated`` alias below: its flag and help are
written once, each command gives its own default in its signature.
"""

from __future__ import annotations

import functools
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.markup import escape

from facecli.errors import TrainingStopped, UserError
from facecli.hardware import DEVICE_HELP
from facecli.ui import console, err_console, progress, warn

state = {"debug": False}  # set by the root callback's --debug


class DetectorName(str, Enum):
    hog = "hog"
    mmod = "mmod"
    haar = "haar"


DETECTOR_HELP = "Face detector for --detect (and the face check): hog (dlib, default), mmod (dlib CNN: turned and small faces, slower) or haar (OpenCV baseline)."
LANDMARKS_HELP = ("5 landmarks per image (left eye, right eye, nose tip, left and right mouth corner, in the photo's pixels), "
                  "paths relative to the source folder: CSV lines `path,x1,y1,...,x5,y5`; or a CSV with named columns "
                  "source (or path), lm1_x,lm1_y,...,lm5_y, such as `align --detect`'s detections.csv (face 0 of each photo); "
                  "or JSON {\"path\": [[x, y], ...5]}.")
FACE_CHECK_HELP = ("Without --detect: skip photos in which the detector finds no face (default when the detect extra is installed), "
                   "so a photo of the sky is 'no face', not a person.")
WORKERS_HELP = ("Worker processes decoding images: a number (0: in this process) or auto "
                "(the CPUs this process may use, less one, at most 16).")

# The evaluation options, written once (each command sets its default in its signature).
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="Average each face's embedding with its mirror image's (as the model was evaluated); --no-flip halves the work.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass (default: 2048 on a GPU, 128 on a CPU; halved on out-of-memory).")]
Device = Annotated[Optional[str], typer.Option("--device", help=f"{DEVICE_HELP} (default: auto, the best available). ONNX models run on the CPU.")]
Workers = Annotated[str, typer.Option("--workers", help=WORKERS_HELP)]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (as in training).")]
Detector = Annotated[DetectorName, typer.Option("--detector", help=DETECTOR_HELP)]
FaceCheck = Annotated[bool, typer.Option("--face-check/--no-face-check", help=FACE_CHECK_HELP)]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the figures to this JSON file (any picture goes beside it).")]
Largest = Annotated[bool, typer.Option("--largest", help="With --detect: only the largest face of each photo.")]
MinQuality = Annotated[Optional[float], typer.Option("--min-quality", help="A face whose quality (its feature norm before L2 normalisation; MagFace/AdaFace train it) is below this gets no decision: 'low quality'.")]


def error_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> None:
    error_line(message)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn user errors into one line and an exit code; keep tracebacks for bugs (and --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if state["debug"]:
                traceback.print_exc()
            fail(str(e), getattr(e, "exit_code", 2))
        except TrainingStopped as e:
            if state["debug"]:
                traceback.print_exc()
            err_console.print(e.message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted.", 130)

    return wrapper


def settings():
    from facecli.settings import load_settings

    return load_settings(warn=warn)


def progress_factory(label: str, total: int):
    """A callable(advance) driving a rich bar; the bar closes when ``total`` is reached."""
    bar = progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=total)
    done = [0]

    def advance(n: int) -> None:
        bar.advance(task, n)
        done[0] += n
        if done[0] >= total:
            bar.stop()

    return advance


def log(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def check_positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}.")


def worker_count(spec: str) -> int:
    """--workers as a number of processes (``auto`` resolved for this machine)."""
    from facecli.data.workers import resolve_workers

    try:
        return resolve_workers(spec)
    except ValueError:
        raise UserError(f"--workers must be a non-negative integer or auto, got {spec!r}.") from None


def pick_device(name: str | None):
    from facecli.engine.device import resolve_device

    return resolve_device(name or "auto")


def embedder_for(checkpoint: Path, device: str | None, flip: bool, batch_size: int | None, workers: str, amp: bool = True):
    """(loaded model, its Embedder): what every evaluation command starts from."""
    from facecli.evaluation.embedding import Embedder
    from facecli.models import load_model

    check_positive(batch_size, "--batch-size")
    workers = worker_count(workers)
    dev = pick_device(device)
    fm = load_model(checkpoint, device=dev)
    return fm, Embedder(fm.net, fm.preprocess, fm.device_for(dev), flip, batch_size, workers, amp)


def lfw_for_eval(lfw_dir: Optional[Path], fm) -> Path:
    """--lfw-dir, else the checkpoint's own lfw_dir while it exists, else LFW under DATASET_PATH."""
    from facecli.data import lfw_for_evaluation

    saved = ((getattr(fm, "checkpoint", None) or {}).get("train_config") or {}).get("lfw_dir")
    return lfw_for_evaluation(lfw_dir, saved, settings().dataset_path)


def warn_if_bunched(threshold: float, scores=None) -> None:
    from facecli.engine.health import warn_if_bunched as check

    check(warn, threshold, scores)


def detector_for(detect: bool, name: DetectorName):
    """The detector to use, or None without --detect (images are then face crops)."""
    if not detect:
        return None
    from facecli.detect import make_detector

    return make_detector(name.value)


def face_check_for(detect: bool, check: bool, name: DetectorName):
    """The detector that checks photos used as given for a face, or None.

    None with --detect (the detector already decides) or --no-face-check; without the
    detect extra it is None too, and one warning says that nothing checks for a face.
    """
    if detect or not check:
        return None
    from facecli.detect import detector_installed, make_detector

    if not detector_installed(name.value):
        warn("no face check: the detect extra is not installed, so every photo is taken as a face, even one without any; "
             "install it (pip install 'facecli[detect]'), or pass --no-face-check to accept that.")
        return None
    return make_detector(name.value)


def check_min_quality(min_quality: float | None, model: str) -> None:
    """``--min-quality`` only as a finite number, and only where the model has a quality score."""
    import math

    if min_quality is None:
        return
    if not math.isfinite(min_quality):
        raise UserError(f"--min-quality must be a finite number, got {min_quality}.")
    require_quality_score(model, "--min-quality")


def require_quality_score(model: str, flag: str) -> None:
    """A one-line refusal of ``flag`` for a network without a quality score (FaceNet's unit outputs)."""
    from facecli.evaluation.quality import quality_problem

    problem = quality_problem(model)
    if problem:
        raise UserError(problem, hint=f"Drop {flag}, or use a margin-head model (MagFace and AdaFace train the norm as a quality score).")


def command_name() -> str:
    """How to type facecli again in a hint: ``facecli`` where it is on PATH, else the path that
    was run (``.venv/bin/facecli`` after ``./run.sh``), else ``python -m facecli``."""
    import os
    import shlex
    import shutil
    import sys

    if shutil.which("facecli"):
        return "facecli"
    ran = Path(sys.argv[0])
    if ran.name == "facecli" and ran.exists():
        relative = os.path.relpath(ran)
        return shlex.quote(str(ran) if relative.startswith("..") else relative)
    return f"{shlex.quote(sys.executable)} -m facecli"
