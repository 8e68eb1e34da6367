"""Fine-tuning on real faces: AT&T held-out people, from scratch versus from an LFW-trained network.

The protocol is ``benchmarks/att_faces.py``'s (imported from ``tests/test_att_faces.py``):
train on AT&T people s1-s30, report 10-fold accuracy on 900 pairs of the unseen people
s31-s40. The LFW checkpoint (``benchmarks/lfw_view1.py``: trained on LFW's peopleDevTrain
people, none of whom is an AT&T person) is a fair starting point. Rows:

* ``scratch``: ``facecli train cosface`` with the test's recipe at the source network's size
  (backbone, image size, embedding size: what ``--init-from`` needs to match);
* ``LFW as is``: the LFW checkpoint, not trained on AT&T at all;
* ``fine-tuned``: ``--init-from LFW`` (a new head for the 30 AT&T people), everything trained;
* ``fine-tuned, frozen first``: the same with ``--freeze-backbone-epochs N`` (head and
  embedding layer alone first).

    python benchmarks/finetune_att.py --source runs/lfw_view1/checkpoints/sphereface/<run>/latest.pt
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO
from att_faces import held_out_accuracy, parse_att_args, untrained_accuracy

sys.path.insert(0, str(REPO / "tests"))

import test_att_faces as att  # noqa: E402


def with_values(args: list[str], values: dict[str, object]) -> list[str]:
    """``args`` with the value after each named flag replaced (every flag is already there)."""
    out = list(args)
    for flag, value in values.items():
        out[out.index(flag) + 1] = str(value)
    return out


def recipe(source_config: dict, epochs: int) -> list[str]:
    """The AT&T test's flags with the source network's backbone, image size and embedding size."""
    return with_values(att.TRAIN_ARGS, {"--backbone": source_config["backbone"], "--image-size": source_config["image_size"],
                                        "--embedding-dim": source_config["embedding_dim"], "--epochs": epochs})


def train(name: str, extra: list[str], args: list[str], out: Path) -> tuple[Path, float]:
    people = out / "s1-s30.txt"
    if not people.exists():
        people.write_text("".join(f"{p}\n" for p in att.TRAIN_PEOPLE))
    cmd = [sys.executable, "-m", "facecli", "train", "cosface", "--train-dir", str(att.ATT_DIR), "--identities", str(people),
           "--checkpoints-dir", str(out / "ck"), "--run-name", name, *args, *extra]
    print("$ facecli", " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out / "ck" / "cosface" / name / "latest.pt", time.perf_counter() - start


def accuracy(checkpoint: Path) -> float:
    from facecli.models import load_model

    return held_out_accuracy(load_model(checkpoint, device="cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, required=True, help="an LFW-trained facecli checkpoint (benchmarks/lfw_view1.py)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--freeze-epochs", type=int, default=3)
    ap.add_argument("--finetune-lrs", default=None, help="comma-separated learning rates of the fine-tuned rows (default: the recipe's)")
    ap.add_argument("--skip-scratch", action="store_true", help="only the LFW and fine-tuned rows")
    args, threads = parse_att_args(ap, "finetune_att.json")
    import torch

    source_config = torch.load(args.source, weights_only=True)["train_config"]
    flags = recipe(source_config, args.epochs)
    lrs = [float(v) for v in args.finetune_lrs.split(",")] if args.finetune_lrs else [float(flags[flags.index("--lr") + 1])]
    runs = [("scratch", [], flags)] * (not args.skip_scratch)
    for lr in lrs:
        tune, tuned = ["--init-from", str(args.source)], with_values(flags, {"--lr": f"{lr:g}"})
        runs += [(f"fine-tuned, lr {lr:g}", tune, tuned),
                 (f"fine-tuned, lr {lr:g}, frozen first", tune + ["--freeze-backbone-epochs", str(args.freeze_epochs)], tuned)]
    rows = [{"row": "LFW as is", "accuracy": accuracy(args.source), "train_seconds": 0.0, "flags": []}]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra, row_flags) in enumerate(runs):
            checkpoint, seconds = train(f"run{i}", extra, row_flags, Path(tmp))
            rows.append({"row": name, "accuracy": accuracy(checkpoint), "train_seconds": seconds, "flags": extra + ["--lr", row_flags[row_flags.index("--lr") + 1]]})
            print(f"  {name}: {100 * rows[-1]['accuracy']:.2f}% ({seconds:.0f} s)", flush=True)
            if not extra:
                rows.append({"row": "untrained (scratch's first weights)", "accuracy": untrained_accuracy(checkpoint, Path(tmp)), "train_seconds": 0.0, "flags": []})
    out = {"machine": f"{platform.machine()}, {threads} thread(s)", "source": str(args.source), "recipe": flags, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print("| start | AT&T held-out accuracy | training s |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['row']} | {100 * r['accuracy']:.2f}% | {r['train_seconds']:.0f} |")
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
