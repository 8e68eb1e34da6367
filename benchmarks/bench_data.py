"""Data pipeline: decoded images/s out of the DataLoader, from a folder of 250x250 JPEGs.

    python benchmarks/bench_data.py                       # LFW (../shared/data/lfw) or synthetic 250x250 JPEGs
    python benchmarks/bench_data.py --folder DIR          # any root/<identity>/<image>.jpg tree
    python benchmarks/bench_data.py --quick

Two pipelines read the same files, side by side, round by round:

* ``naive``: ``Image.open(p).convert("RGB")`` -> ``transforms.Resize(112)`` -> ``ToTensor()``
  (float32) in a Dataset, through a DataLoader with its defaults (the first version of most
  training scripts);
* ``facecli``: the product's path: ``IdentityFolderDataset`` (``decode_image``: uint8,
  centre crop, resize) + ``collate_samples`` through a DataLoader configured like the trainer's
  (persistent workers, prefetch 4, pinned memory on CUDA). Its batches are uint8; the trainer
  normalises and flips them on its device (``normalize_batch``, ``flip_batch``), timed apart
  on ``--device`` and reported as a cost per image (negligible on a GPU).

"per worker" is the in-process rate (workers 0: one core decoding, nothing else), measured
with the two pipelines alternating batch by batch, so that both see the same machine load;
"total" is the rate with ``--workers N`` worker processes (DataLoaders alternate pass by pass).
Files are read once before timing so that the page cache, not the disk, serves them (decode
speed, not disk speed, is measured).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LFW_IMAGES = C.REPO.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"
SYNTH_CACHE = C.RESULTS / "cache" / "synth250"


def find_folder(folder: Path | None, quick: bool) -> Path:
    """The JPEG tree to read: --folder, else LFW's 250x250 images, else a synthetic 250x250 set."""
    if folder is not None:
        return folder
    if LFW_IMAGES.is_dir():
        return LFW_IMAGES
    root = SYNTH_CACHE
    train = root / "CASIA-webface"
    if not train.is_dir():
        from facecli.data.synth import generate_synthetic_set

        C.say(f"generating synthetic 250x250 JPEGs in {root} (once)...")
        generate_synthetic_set(root, identities=40 if quick else 200, test_identities=20, images_per_identity=10, image_size=250, seed=0)
    return train


class NaiveFolder:
    """The usual first Dataset: PIL open, convert, torchvision Resize(112), ToTensor."""

    def __init__(self, paths, labels, size):
        import torchvision.transforms as T

        self.paths, self.labels = paths, labels
        self.transform = T.Compose([T.Resize(size), T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.open(self.paths[i]).convert("RGB")
        return self.transform(img), int(self.labels[i])


def parse_workers(text: str) -> list[int]:
    """``0,2,auto`` -> [0, 2, N]: each count once, ``auto`` resolved as facecli resolves it."""
    from facecli.data.workers import resolve_workers

    counts = [resolve_workers(w.strip()) for w in text.split(",") if w.strip()]
    return list(dict.fromkeys(counts))


def _one_thread(_):
    import torch

    torch.set_num_threads(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--folder", type=Path, default=None, help="root/<identity>/<image>.jpg (default: LFW 250x250, else synthetic)")
    p.add_argument("--images", type=int, default=None, help="images per timed pass (default 2000)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", default="0,2,auto",
                   help="comma-separated worker counts to measure (0 = in-process, per worker; auto = facecli's --workers auto)")
    p.add_argument("--decode-gpu", action="store_true", default=None,
                   help="also time --decode gpu: workers read bytes, the batch is decoded on --device (default: on with CUDA)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    n_images = args.images or (256 if args.quick else 2000)
    threads = C.set_threads(args.threads)

    import numpy as np
    from torch.utils.data import DataLoader

    from facecli.data.device_decode import to_device_batch
    from facecli.data.folders import IdentityFolderDataset, collate_samples
    from facecli.data.images import Preprocess, normalize_batch
    from facecli.data.workers import resolve_workers, usable_cpus
    from facecli.engine.step import flip_batch

    device = C.resolve_device(args.device)
    folder = find_folder(args.folder, args.quick)
    pre = Preprocess(args.image_size)
    dataset = IdentityFolderDataset(folder, pre)
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(len(dataset), size=min(n_images, len(dataset)), replace=False))
    paths = [dataset.paths[i] for i in subset]
    labels = [int(dataset.labels[i]) for i in subset]
    with_sizes = {}
    from PIL import Image

    for path in paths[:50]:
        with Image.open(path) as im:
            with_sizes[im.size] = with_sizes.get(im.size, 0) + 1
    for path in paths:  # warm the page cache
        Path(path).read_bytes()
    naive_ds = NaiveFolder(paths, labels, args.image_size)
    batches = [list(map(int, subset[i : i + args.batch])) for i in range(0, len(subset), args.batch)]
    worker_counts = parse_workers(args.workers)
    auto_workers = resolve_workers("auto")
    decode_gpu = device.type == "cuda" if args.decode_gpu is None else args.decode_gpu
    gpu_dataset = IdentityFolderDataset(folder, pre, decode="gpu") if decode_gpu else None
    C.say(
        f"data: {len(paths)} images from {folder} (sizes {dict(with_sizes)}), to {args.image_size}x{args.image_size}, "
        f"batch {args.batch}, workers {worker_counts} (auto = {auto_workers} on {usable_cpus()} usable CPUs); {rounds} rounds"
    )

    def in_process_rounds():
        """Seconds per pass of each pipeline, the two alternating batch by batch."""
        import time

        from torch.utils.data import default_collate

        out = {"naive w=0": [], "facecli w=0": []}
        for r in range(rounds + 1):  # round 0 is a warm-up
            spent = {"naive": 0.0, "facecli": 0.0}
            for b, idx in enumerate(batches):
                start = b * args.batch
                for kind in (("naive", "facecli") if (b + r) % 2 == 0 else ("facecli", "naive")):
                    t0 = time.perf_counter()
                    if kind == "naive":
                        default_collate([naive_ds[start + k] for k in range(len(idx))])
                    else:
                        collate_samples([dataset[i] for i in idx])
                    spent[kind] += time.perf_counter() - t0
            if r:
                out["naive w=0"].append(spent["naive"])
                out["facecli w=0"].append(spent["facecli"])
                C.say(f"  round {r}/{rounds}: in-process naive {spent['naive']:.2f} s, facecli {spent['facecli']:.2f} s")
        return out

    loaders = {}
    for w in worker_counts:
        if w == 0:
            continue
        naive_kwargs = dict(batch_size=args.batch, shuffle=False, num_workers=w)
        fc_kwargs = dict(batch_sampler=batches, num_workers=w, collate_fn=collate_samples, pin_memory=device.type == "cuda")
        if w > 0:
            fc_kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_one_thread)
        loaders[w] = (DataLoader(naive_ds, **naive_kwargs), DataLoader(dataset, **fc_kwargs),
                      DataLoader(gpu_dataset, **fc_kwargs) if decode_gpu else None)

    def run_naive(loader):
        def run():
            n = 0
            for x, _ in loader:
                n += x.shape[0]
            assert n == len(paths)

        return run

    def run_facecli(loader):
        def run():
            n = 0
            for x, y, bad in loader:
                n += x.shape[0]
            assert n == len(paths), (n, len(paths))

        return run

    def run_decode_on_device(loader):
        def run():
            n = 0
            for enc, y, bad in loader:
                x, y, bad = to_device_batch(enc, y, bad, pre, device)
                n += x.shape[0]
            C.synchronize(device)
            assert n == len(paths), (n, len(paths))

        return run

    def device_side_us_per_image() -> float:
        """The trainer's normalise + flip of a uint8 batch on ``device``, per image."""
        import time

        x8, _, _ = collate_samples([dataset[i] for i in batches[0]])
        x8 = x8.to(device)
        best = float("inf")
        for r in range(5):
            C.synchronize(device)
            t0 = time.perf_counter()
            for k in range(10):
                flip_batch(normalize_batch(x8, pre), 0, k, 0, x8.shape[0])
            C.synchronize(device)
            best = min(best, (time.perf_counter() - t0) / (10 * x8.shape[0]))
        return 1e6 * best

    variants = {}
    for w, (naive_loader, fc_loader, gpu_loader) in loaders.items():
        variants[f"naive w={w}"] = run_naive(naive_loader)
        variants[f"facecli w={w}"] = run_facecli(fc_loader)
        if gpu_loader is not None:
            variants[f"facecli --decode gpu w={w}"] = run_decode_on_device(gpu_loader)
    times = C.interleaved(variants, rounds, 1, warmup=1, device=device, log=C.say) if variants else {}
    if 0 in worker_counts:
        times.update(in_process_rounds())

    rows = []
    for w in worker_counts:
        for kind in ("naive", "facecli", "facecli --decode gpu"):
            name = f"{kind} w={w}"
            if name not in times:
                continue
            ips = len(paths) / C.median(times[name])
            row = {
                "pipeline": kind,
                "workers": w,
                "images_per_s": round(ips, 1),
                "images_per_s_per_worker": round(ips / max(w, 1), 1),
                "noise_pct": round(C.spread(times[name]), 1),
            }
            if kind != "naive":
                row["speedup_vs_naive"] = round(C.ratio_to(times, name, f"naive w={w}"), 3)
            rows.append(row)
    shown = [
        {**r, "speedup_vs_naive": f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "",
         "workers": "0 (in-process)" if r["workers"] == 0 else (f"{r['workers']} (auto)" if r["workers"] == auto_workers else r["workers"])}
        for r in rows
    ]
    C.say(
        "\n"
        + C.table(
            shown,
            [("pipeline", "pipeline"), ("workers", "workers"), ("images_per_s", "images/s"), ("images_per_s_per_worker", "per worker"),
             ("noise_pct", "+-%"), ("speedup_vs_naive", "facecli / naive")],
            title=f"Decoded images/s out of the DataLoader, {len(paths)} JPEGs {dict(with_sizes)} -> {args.image_size}px, {device}, {os.cpu_count()} CPUs",
        )
    )
    device_us = device_side_us_per_image()
    C.say(f"the trainer's normalise + flip of these uint8 batches on {device}: {device_us:.0f} us per image (not in the rows above)")
    out = C.write_results(
        "data",
        {
            "benchmark": "data",
            "config": {"folder": str(folder), "images": len(paths), "image_size": args.image_size, "batch": args.batch,
                       "workers": worker_counts, "auto_workers": auto_workers, "usable_cpus": usable_cpus(), "decode_gpu": decode_gpu, "rounds": rounds, "device": str(device), "threads": threads, "quick": args.quick,
                       "source_sizes_sample": {f"{w}x{h}": n for (w, h), n in with_sizes.items()}},
            "environment": C.environment(device),
            "rows": rows,
            "times_s": times,
            "device_normalize_flip_us_per_image": round(device_us, 1),
        },
        args.json,
    )
    C.say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
