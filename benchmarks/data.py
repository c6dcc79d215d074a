"""Images/s of the training data loader alone (no model), before and after the at-scale changes.

Generates a folder of JPEG photographs (crops of scikit-image's photos, rescaled to --width x
--height, so the decoder sees real image statistics; cached under benchmarks/.cache/), then times
whole epochs of the tokenizer's training loader over it:

  before       map-style folder, full-size JPEG decode, workers re-forked every epoch
  after        map-style folder, JPEG draft-mode decode (data.jpeg_draft), persistent workers
  shards       the same images as WebDataset shards (vqgan-make-shards), data.source=wds:..., draft decode

and the start-up time of each (building the dataset: the folder walk and index, or the shard count).
It prints a markdown table and writes it, with the machine described, to benchmarks/results/data.md.

    .venv/bin/python benchmarks/data.py                         # 3000 1024x768 JPEGs, 4 workers, ~5 min
    .venv/bin/python benchmarks/data.py --resize 128 --image-size 128
    .venv/bin/python benchmarks/data.py --quick                 # a smoke test: 48 small JPEGs
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import describe_machine  # noqa: E402
from vqgan.data import DataConfig, build_dataloader, embedded_dataset  # noqa: E402
from vqgan.data.make_shards import make_shards  # noqa: E402
from vqgan.utils import atomic_write_text  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def make_jpegs(folder: Path, count: int, width: int, height: int) -> Path:
    """`count` JPEGs of width x height: random crops of the embedded photos, rescaled (kept between runs)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    cells = embedded_dataset("train").cast_column("image", datasets.Image(decode=False))["image"]
    photos = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in cells]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((width, height), Image.Resampling.BILINEAR)
        sub = folder / f"class_{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i:06d}.jpg", quality=90)
    done.write_text("ok")
    return folder


def epochs_per_s(loader, epochs: int) -> tuple[float, int]:
    """(images/s, images) over `epochs` passes, each started with set_epoch / iterate like the engine does."""
    images = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        batches = loader.iterate(epoch) if hasattr(loader, "iterate") else (loader.batch_sampler.sampler.set_epoch(epoch) or loader)
        for batch in batches:
            images += batch["images"].shape[0]
    return images / (time.perf_counter() - start), images


def without_persistent_workers(loader: DataLoader) -> DataLoader:
    """The same loader as before this change: workers forked anew each epoch."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.batch_sampler.sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                      persistent_workers=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="48 640x480 JPEGs to 128px, 1 worker, 1 epoch (a smoke test)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "data.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.width, args.height, args.workers, args.epochs, args.batch_size = 48, 640, 480, 1, 1, 16
        args.image_size, args.resize = 64, 128  # 480 > 2 x 128: the draft path runs
        args.output = args.output.with_name("data_quick.md")
    folder = make_jpegs(CACHE / f"jpegs-{args.images}-{args.width}x{args.height}", args.images, args.width, args.height)
    shards_dir = CACHE / f"shards-{args.images}-{args.width}x{args.height}"
    if not (shards_dir / "index.json").is_file():
        shutil.rmtree(shards_dir, ignore_errors=True)
        make_shards(str(folder), shards_dir, shard_size=max(1, args.images // 16), label_column="label",
                    workers=max(1, args.workers), cache_dir=str(CACHE / "hf"), progress=False)
    pattern = "wds:" + json.loads((shards_dir / "index.json").read_text())["pattern"]

    base = DataConfig(source=str(folder), image_size=args.image_size, resize=args.resize, num_workers=args.workers,
                      label_column="label", cache_dir=str(CACHE / "hf"))
    cases = {
        "before": dataclasses.replace(base, jpeg_draft=False),
        "after": base,
        "shards": dataclasses.replace(base, source=pattern, label_column="cls", cache_dir=None),
    }
    rows = []
    for name, config in cases.items():
        start = time.perf_counter()
        loader = build_dataloader(config, "train", batch_size=args.batch_size, seed=0)
        startup = time.perf_counter() - start
        if name == "before":
            loader = without_persistent_workers(loader)
        rate, images = epochs_per_s(loader, args.epochs)
        rows.append((name, startup, rate, images))
        print(f"{name}: start-up {startup:.2f} s, {rate:.1f} images/s over {images} images", flush=True)

    machine = describe_machine(torch.device("cpu"))
    lines = [
        f"# Data loader throughput (loader alone, no model)\n",
        f"Machine: {machine}\n",
        f"{args.images} JPEGs of {args.width}x{args.height} (quality 90), resize {args.resize}, {args.image_size}px "
        f"random crops, batch {args.batch_size}, {args.workers} workers, {args.epochs} epochs. Command: "
        f"`python benchmarks/data.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
        "| loader | start-up (s) | images/s | vs before |",
        "|---|---:|---:|---:|",
    ]
    before = rows[0][2]
    for name, startup, rate, _ in rows:
        lines.append(f"| {name} | {startup:.2f} | {rate:.1f} | {rate / before:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
