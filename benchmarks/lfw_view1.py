"""LFW View 1, "unrestricted, no outside data": train on the DevTrain people, test on DevTest pairs.

The recipe, with nothing but LFW itself:

1. train on the images of the 4,038 people of ``peopleDevTrain.txt`` (identity labels are
   used: the "unrestricted" setting; no pretrained weights, no other data set: "no outside
   data"). The 250x250 deep-funneled images get facecli's default centre crop (0.6);
2. choose the verification threshold on ``pairsDevTrain.txt`` (``facecli tune-threshold``);
3. report the accuracy of that threshold on the 1,000 pairs of ``pairsDevTest.txt``, whose
   500 people (1,711 in ``peopleDevTest.txt``) are disjoint from the training people.

No choice looks at DevTest: no ``--eval-every`` model selection, no end-of-training View 2
report (View 2 folds contain the training people). Many DevTrain people have a single
image; a classification head trains on them all the same.

Every step is a ``facecli`` command run as a subprocess, printed before it runs, so the
recipe can be replayed by hand. Results: a table on stdout and a JSON file.

    python benchmarks/lfw_view1.py          # the best recipe found on a 2-core CPU (README): SphereFace, resnet18, 96 px, 8 epochs
    python benchmarks/lfw_view1.py --model arcface --backbone resnet50 --image-size 112 --epochs 20 --device cuda
    python benchmarks/lfw_view1.py --quick  # minutes on a CPU: checks the recipe runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LFW = REPO.parent / "shared" / "data" / "lfw"
MODELS = ("sphereface", "cosface", "arcface", "curricularface", "facenet", "adaface", "magface", "elasticface")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW folder with lfw-deepfunneled/ and the protocol files (default: ../shared/data/lfw)")
    # Defaults: the best recipe within an hour of a 2-core CPU (README, "LFW View 1"): 84.2% in 16 min.
    p.add_argument("--model", choices=MODELS, default="sphereface")
    p.add_argument("--backbone", default="resnet18", help="any facecli backbone (resnet18/34/50/101, iresnet18/34/50/100, mobilefacenet)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: facecli's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (1 on the 2-core machine of the README; more on a bigger one)")
    p.add_argument("--max-identities", type=int, default=None, help="train on the N DevTrain people with the most images only (quick checks)")
    p.add_argument("--train-args", default="", help="more `facecli train` flags, as one quoted string (e.g. \"--optimizer adamw --no-amp\")")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lfw_view1", help="run folder (checkpoints, identity list, threshold JSON)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "lfw_view1.json", help="where to write the results")
    p.add_argument("--run-name", default=None, help="default: MODEL-BACKBONE-SIZEpx-EPOCHSep[-NNids]")
    p.add_argument("--quick", action="store_true", help="resnet18, 32 px, 1 epoch, 200 people, batch 64: checks the recipe, figures meaningless")
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.epochs, args.batch_size = "resnet18", 32, 1, 64
        args.max_identities = args.max_identities or 200
    for name in ("image_size", "epochs", "batch_size", "workers"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_identities is not None and args.max_identities < 2:
        p.error("--max-identities must be at least 2")
    return args


def read_people(path: Path) -> list[tuple[str, int]]:
    """``peopleDev*.txt``: a count line, then ``name<TAB>images`` per person."""
    lines = path.read_text(encoding="utf-8").split("\n")
    people = []
    for line in lines[1:]:
        fields = line.split()
        if fields:
            people.append((fields[0], int(fields[1])))
    announced = int(lines[0].strip())
    if announced != len(people):
        raise SystemExit(f"{path}: header announces {announced} people, found {len(people)}")
    return people


COMMANDS: list[str] = []


def facecli(*args: str) -> None:
    cmd = [sys.executable, "-m", "facecli", *args]
    COMMANDS.append("facecli " + " ".join(shlex.quote(a) for a in args))
    print("\n$ " + COMMANDS[-1], flush=True)
    done = subprocess.run(cmd, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"facecli {args[0]} failed with exit code {done.returncode}")


def check_lfw(lfw: Path) -> None:
    needed = [lfw / "lfw-deepfunneled", *(lfw / f for f in ("peopleDevTrain.txt", "peopleDevTest.txt", "pairsDevTrain.txt", "pairsDevTest.txt"))]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"LFW not found: missing {', '.join(missing)} (pass --lfw)")


def training_people(lfw: Path, max_identities: int | None) -> list[tuple[str, int]]:
    """DevTrain people (or the N with most images), checked disjoint from DevTest's."""
    train_people = read_people(lfw / "peopleDevTrain.txt")
    test_people = {name for name, _ in read_people(lfw / "peopleDevTest.txt")}
    overlap = {name for name, _ in train_people} & test_people
    if overlap:
        raise SystemExit(f"peopleDevTrain and peopleDevTest share {len(overlap)} people, e.g. {sorted(overlap)[:3]}")
    chosen = train_people
    if max_identities is not None:
        chosen = sorted(sorted(train_people, key=lambda p: (-p[1], p[0]))[:max_identities])
    n_images = sum(n for _, n in chosen)
    print(f"Training people: {len(chosen)} of {len(train_people)} in peopleDevTrain.txt ({n_images} images); "
          f"test people (peopleDevTest.txt): {len(test_people)}, none shared.")
    return chosen


def train_command(args, lfw: Path, identities: Path, checkpoints: Path, run_name: str) -> list[str]:
    train = [
        "train", args.model, "--train-dir", str(lfw / "lfw-deepfunneled"), "--identities", str(identities), "--lfw-dir", str(lfw),
        "--backbone", args.backbone, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--device", args.device, "--workers", str(args.workers), "--checkpoints-dir", str(checkpoints),
        "--run-name", run_name, "--no-eval", "--no-wandb",
    ]
    if args.lr is not None:
        train += ["--lr", str(args.lr)]
    if args.warmup_epochs is not None:
        train += ["--warmup-epochs", str(args.warmup_epochs)]
    return train + shlex.split(args.train_args)


def main(argv=None) -> dict:
    args = parse_args(argv)
    lfw = args.lfw.expanduser().resolve()
    check_lfw(lfw)
    chosen = training_people(lfw, args.max_identities)
    run_name = args.run_name or (
        f"{args.model}-{args.backbone}-{args.image_size}px-{args.epochs}ep" + (f"-{len(chosen)}ids" if args.max_identities else "")
    )
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    identities = out / f"{run_name}.identities.txt"
    identities.write_text("".join(f"{name}\n" for name, _ in chosen), encoding="utf-8")
    checkpoints = out / "checkpoints"
    run_dir = checkpoints / args.model / run_name
    if (run_dir / "latest.pt").exists():
        raise SystemExit(f"{run_dir} already holds a run: pass another --run-name or remove it")

    t0 = time.perf_counter()
    facecli(*train_command(args, lfw, identities, checkpoints, run_name))
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    facecli(
        "tune-threshold", str(run_dir / "latest.pt"), "--lfw-dir", str(lfw), "--device", args.device,
        "--workers", str(min(args.workers, 4)), "--save", "--json", str(run_dir / "view1.json"),
    )
    timing = {"train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - t1, 1)}
    result = collect_result(args, run_dir, len(chosen), timing)
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.json}")
    return result


def collect_result(args, run_dir: Path, n_identities: int, timing: dict) -> dict:
    """The run's recipe, figures and commands, read back from what the commands wrote."""
    view1 = json.loads((run_dir / "view1.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_losses = [m["epoch_loss"] for m in metrics if "epoch_loss" in m]
    return {
        "benchmark": "LFW View 1, unrestricted with no outside data",
        "protocol": "train on peopleDevTrain.txt people; threshold on pairsDevTrain.txt; accuracy on pairsDevTest.txt",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "crop_fraction": config["preprocess"]["crop_fraction"] or "auto (0.6 for the 250x250 images)",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": config["config"]["lr"],
        "seed": args.seed,
        "device": config["device"],
        "amp": config["amp_dtype"],
        "train_identities": n_identities,
        "train_images": config["images"],
        "steps": max((int(m.get("step", 0)) for m in metrics), default=0),
        "final_epoch_loss": epoch_losses[-1] if epoch_losses else None,
        "threshold": view1["threshold"],
        "dev_train_accuracy": view1["train_accuracy"],
        "dev_test_accuracy": view1["test_accuracy"],
        "dev_train_pairs": view1["train_pairs"],
        "dev_test_pairs": view1["test_pairs"],
        **timing,
        "checkpoint": str(run_dir / "latest.pt"),
        "commands": list(COMMANDS),
        "quick": args.quick,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="LFW View 1, unrestricted, no outside data" + (" (--quick: figures meaningless)" if r["quick"] else ""), show_header=False)
    t.add_column("")
    t.add_column("")
    rows = [
        ("model", f"{r['model']}, {r['backbone']}, {r['image_size']}px, crop {r['crop_fraction']}"),
        ("training", f"{r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']:g}, {r['steps']} steps, {r['device']} {r['amp']}"),
        ("training people / images", f"{r['train_identities']:,} / {r['train_images']:,} (peopleDevTrain.txt)"),
        ("threshold (pairsDevTrain.txt)", f"{r['threshold']:.4f}: {100 * r['dev_train_accuracy']:.2f}% of {r['dev_train_pairs']} pairs"),
        ("accuracy (pairsDevTest.txt)", f"{100 * r['dev_test_accuracy']:.2f}% of {r['dev_test_pairs']} pairs"),
        ("time", f"training {r['train_seconds'] / 60:.1f} min, evaluation {r['eval_seconds'] / 60:.1f} min"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


if __name__ == "__main__":
    main()
