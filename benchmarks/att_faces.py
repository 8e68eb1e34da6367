"""AT&T (ORL) faces, held-out people, per backbone: the README's AT&T table.

The protocol and the recipe are those of ``tests/test_att_faces.py`` (imported from it, so
the two cannot drift): CosFace trained on people s1-s30 with the test's flags, 10-fold
accuracy on 900 pairs of the unseen people s31-s40; the same network untrained and
eigenfaces (PCA, k=40) as baselines. Only ``--backbone`` (and the seed) change.

    python benchmarks/att_faces.py --backbones resnet18,iresnet18,mobilefacenet --seeds 0,1
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

from _common import REPO, RESULTS, set_threads

sys.path.insert(0, str(REPO / "tests"))

import test_att_faces as att  # noqa: E402


def train(backbone: str, seed: int, out: Path) -> Path:
    """``facecli train cosface`` with the test's flags, the backbone and seed replaced; the checkpoint."""
    people = out / "s1-s30.txt"
    people.write_text("".join(f"{p}\n" for p in att.TRAIN_PEOPLE))
    args = list(att.TRAIN_ARGS)
    args[args.index("--backbone") + 1] = backbone
    args[args.index("--seed") + 1] = str(seed)
    cmd = [sys.executable, "-m", "facecli", "train", "cosface", "--train-dir", str(att.ATT_DIR), "--identities", str(people),
           "--checkpoints-dir", str(out / "ck"), "--run-name", "att", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out / "ck" / "cosface" / "att" / "latest.pt"


def untrained_accuracy(checkpoint: Path, tmp: Path) -> float:
    """Held-out accuracy of the run's network before its first step (what its configuration builds)."""
    import torch

    from facecli.engine.config import TrainConfig
    from facecli.engine.trainer import Trainer
    from facecli.evaluation import verify

    saved = torch.load(checkpoint, weights_only=True)["train_config"]
    untrained = Trainer(TrainConfig.from_dict(saved, checkpoints_dir=str(tmp / "untrained")))
    untrained.tracker.close()
    paths, ia, ib, issame = att.held_out_pairs()
    return verify(att.network_scores(untrained.net, untrained.preprocess, paths, ia, ib), issame).accuracy


def held_out_accuracy(model) -> float:
    """10-fold accuracy of a loaded model (``facecli.load_model``) on the held-out people's 900 pairs."""
    from facecli.evaluation import verify

    paths, ia, ib, issame = att.held_out_pairs()
    return verify(att.network_scores(model.net, model.preprocess, paths, ia, ib), issame).accuracy


def measure(backbone: str, seed: int) -> dict:
    from facecli.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        checkpoint = train(backbone, seed, Path(tmp))
        seconds = time.perf_counter() - start
        trained = load_model(checkpoint, device="cpu")
        acc = held_out_accuracy(trained)
        acc0 = untrained_accuracy(checkpoint, Path(tmp))
    params = sum(p.numel() for p in trained.net.parameters())
    row = {"backbone": backbone, "seed": seed, "trained": acc, "untrained": acc0, "train_seconds": seconds, "parameters": params}
    print(f"  {backbone} seed {seed}: trained {100 * acc:.2f}%, untrained {100 * acc0:.2f}% ({seconds:.0f} s)", flush=True)
    return row


def table(rows: list[dict], eigenfaces: float) -> str:
    lines = ["| backbone | parameters | trained, per seed | untrained, per seed | training s (mean) |", "| --- | ---: | --- | --- | ---: |"]
    for b in dict.fromkeys(r["backbone"] for r in rows):
        rs = [r for r in rows if r["backbone"] == b]
        fmt = lambda key: ", ".join(f"{100 * r[key]:.2f}" for r in rs)  # noqa: E731
        lines.append(f"| {b} | {rs[0]['parameters'] / 1e6:.1f}M | {fmt('trained')} | {fmt('untrained')} | {sum(r['train_seconds'] for r in rs) / len(rs):.0f} |")
    lines.append(f"| eigenfaces (k={att.PCA_COMPONENTS}) | | {100 * eigenfaces:.2f} | | |")
    return "\n".join(lines)


def parse_att_args(ap: argparse.ArgumentParser, json_name: str) -> tuple[argparse.Namespace, int]:
    """Add ``--threads`` and ``--json``, parse, stop unless the AT&T faces are there, set the threads: every AT&T benchmark's start."""
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS / json_name)
    args = ap.parse_args()
    if not att.ATT_DIR.exists():
        sys.exit(f"{att.ATT_DIR} not found: this benchmark needs ../shared/data/att_faces.")
    return args, set_threads(args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="resnet18,iresnet18,mobilefacenet")
    ap.add_argument("--seeds", default="0,1")
    args, threads = parse_att_args(ap, "att_faces.json")
    from facecli.evaluation import verify

    paths, ia, ib, issame = att.held_out_pairs()
    eigen = verify(att.eigenface_scores(paths, ia, ib), issame).accuracy
    rows = [measure(b, int(s)) for b in args.backbones.split(",") for s in args.seeds.split(",")]
    out = {"machine": f"{platform.machine()}, {threads} thread(s)", "eigenfaces": eigen, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(table(rows, eigen))
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
