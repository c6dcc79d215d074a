"""Images/s of the training data loader alone (no model), before and after the at-scale changes.

Generates a folder of JPEG photographs (crops of scikit-image's photos, rescaled to --width x
--height, so the decoder sees real image statistics; cached under benchmarks/.cache/), then times
whole epochs of the tokenizer's training loader over it:

  before       map-style folder, full-size JPEG decode, workers re-forked every epoch
  after        map-style folder, JPEG draft-mode decode (data.jpeg_draft), persistent workers
  shards       the same images as WebDataset shards (vqgan-make-shards), data.source=wds:..., draft decode

and the start-up time of each (building the dataset: the folder walk and index, or the shard count).
It prints a markdown table and writes it, with the machine described, to benchmarks/results/data.md.

`--class-mixing` measures instead how many distinct classes a batch of the shard loader holds, at
ImageNet's layout (1,281,167 rows of 1000 classes, 2,000 rows a shard, 8 processes x 12 workers, batch
32), beside uniform sampling. No image is written: the rows are numbers, laid into shards by the shard
tool's own `row_order` and read by the loader's own ShardStream (layout, interleaving, shuffle buffer),
so each batch holds the rows the real loader would give it. It replaces that section of data.md.

    .venv/bin/python benchmarks/data.py                         # 3000 1024x768 JPEGs, 4 workers, ~5 min
    .venv/bin/python benchmarks/data.py --resize 128 --image-size 128
    .venv/bin/python benchmarks/data.py --quick                 # a smoke test: 48 small JPEGs
    .venv/bin/python benchmarks/data.py --class-mixing          # ~1 min, one CPU core
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from benchmarks.common import describe_machine, source_commit  # noqa: E402
from vqgan.data import DataConfig, build_dataloader, embedded_dataset, shards  # noqa: E402
from vqgan.data.make_shards import DEFAULT_SHUFFLE_SEED, make_shards, row_order  # noqa: E402
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


# ----------------------------------------------------------------------------- classes per batch

MIXING_HEADING = "## Classes per batch"


def simulated_batches(counts: list[int], order: np.ndarray, *, world: int, workers: int, batch_size: int,
                      seed: int, shuffle_buffer: int, interleave: int, epoch: int = 0) -> Iterator[np.ndarray]:
    """(batches, batch_size) source rows of each process's batches of `epoch`, in the order it draws them.

    counts: samples per shard; order[p]: the source row at position p of the shards laid end to end (the
    shard tool's row_order). The rows come from the loader's own ShardStream, fed row numbers for samples.
    """
    spans = [shards.Span(i, 0, c) for i, c in enumerate(counts)]
    starts = np.cumsum([0, *counts])

    def read(span: shards.Span) -> Iterator[int]:
        first = starts[span.shard] + span.first
        return iter(order[first : first + span.count].tolist())

    for rank in range(world):
        stream = shards.ShardStream([""] * len(counts), spans, rank=rank, world=world, batch_size=batch_size,
                                    workers=workers, seed=seed, shuffle=True, shuffle_buffer=shuffle_buffer,
                                    interleave=interleave, make_item=None, collate=None)
        per_slot = [np.fromiter(stream.slot_records(epoch, slot, read), dtype=np.int64).reshape(-1, batch_size)
                    for slot in range(workers)]
        # batch j is slot j % workers' (j // workers)-th batch (the DataLoader's round robin over its workers)
        yield np.stack([per_slot[j % workers][j // workers] for j in range(stream.layout.batches)])


def distinct_per_batch(batches: np.ndarray) -> np.ndarray:
    """Distinct values in each row of a (batches, B) array."""
    ordered = np.sort(batches, axis=1)
    return 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)


def uniform_distinct(class_sizes: np.ndarray, draws: int) -> float:
    """Expected distinct classes in `draws` rows drawn uniformly without replacement (a map-style sampler)."""
    total = int(class_sizes.sum())
    # P(class c missed) = C(total - n_c, draws) / C(total, draws), as a product of `draws` ratios
    missed = [math.exp(sum(math.log((total - n - i) / (total - i)) for i in range(draws))) for n in class_sizes]
    return float(len(class_sizes) - sum(missed))


def class_mixing(args: argparse.Namespace) -> str:
    """The markdown section: mean distinct classes per batch, before and after, beside uniform sampling."""
    rows, classes = args.rows, args.classes
    row_class = np.arange(rows) * classes // rows  # the source in class order (an image folder)
    class_sizes = np.bincount(row_class, minlength=classes)
    counts = [min(args.shard_size, rows - start) for start in range(0, rows, args.shard_size)]
    layout = dict(world=args.processes, workers=args.workers, batch_size=args.batch_size, seed=0,
                  shuffle_buffer=DataConfig.shuffle_buffer)
    cases = (  # (name, shard tool's shuffle seed, data.shard_interleave)
        ("before: shards in source order, one shard at a time per worker", None, 1),
        (f"old shards (source order), the loader now ({DataConfig.shard_interleave} shards at once)", None,
         DataConfig.shard_interleave),
        (f"after: shuffled shards (the default), {DataConfig.shard_interleave} shards at once", DEFAULT_SHUFFLE_SEED,
         DataConfig.shard_interleave),
    )
    uniform = uniform_distinct(class_sizes, args.batch_size)
    lines = [f"{MIXING_HEADING} (simulated rows at ImageNet's layout)\n",
             f"{rows:,} rows of {classes} classes in class order (as an image folder lists them), shards of "
             f"{args.shard_size:,} rows written by `vqgan-make-shards` (its `row_order`), read by the shard loader "
             f"(`ShardStream.slot_records`: layout, interleaving, {DataConfig.shuffle_buffer}-sample shuffle buffer) "
             f"on {args.processes} processes x {args.workers} workers, batch {args.batch_size}, every batch of epoch 0. "
             f"Uniform: the expected distinct classes of {args.batch_size} rows drawn at random (a map-style "
             f"sampler). {source_commit().capitalize()}. Command: `python benchmarks/data.py --class-mixing`\n",
             "| shards and loader | distinct classes per batch (mean) | 5th percentile | vs uniform |",
             "|---|---:|---:|---:|"]
    for name, shuffle_seed, interleave in cases:
        start = time.perf_counter()
        order = row_order(rows, shuffle_seed)
        distinct = np.concatenate([distinct_per_batch(row_class[batches])
                                   for batches in simulated_batches(counts, order, interleave=interleave, **layout)])
        mean = float(distinct.mean())
        print(f"{name}: {mean:.2f} distinct classes per batch over {len(distinct)} batches "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        lines.append(f"| {name} | {mean:.2f} | {np.percentile(distinct, 5):.0f} | {mean / uniform:.1%} |")
    lines.append(f"| uniform sampling (expected) | {uniform:.2f} | | 100.0% |")
    return "\n".join(lines) + "\n"


def with_section(text: str, section: str) -> str:
    """`text` (a results file) with its class-mixing section replaced by `section` (or added at the end)."""
    kept = text.split("\n" + MIXING_HEADING, 1)[0].rstrip("\n")
    return (kept + "\n\n" if kept else "") + section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--class-mixing: 32)")
    parser.add_argument("--workers", type=int, default=None, help="default 4 (--class-mixing: 12 per process)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="48 640x480 JPEGs to 128px, 1 worker, 1 epoch (a smoke test)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "data.md")
    mixing = parser.add_argument_group("--class-mixing (simulated rows; --batch-size and --workers apply too)")
    mixing.add_argument("--class-mixing", action="store_true", help="measure distinct classes per batch instead")
    mixing.add_argument("--rows", type=int, default=1_281_167)
    mixing.add_argument("--classes", type=int, default=1000)
    mixing.add_argument("--shard-size", type=int, default=2000)
    mixing.add_argument("--processes", type=int, default=8)
    args = parser.parse_args(argv)
    if args.class_mixing:
        args.batch_size, args.workers = args.batch_size or 32, args.workers or 12
        section = class_mixing(args)
        print(section)
        earlier = args.output.read_text() if args.output.is_file() else ""
        atomic_write_text(args.output, with_section(earlier, section))
        return 0
    args.batch_size, args.workers = args.batch_size or 64, args.workers or 4
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
        f"Machine: {machine}.\n",
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
    earlier = args.output.read_text() if args.output.is_file() else ""
    mixing = earlier[earlier.index(MIXING_HEADING):] if MIXING_HEADING in earlier else ""
    atomic_write_text(args.output, table + ("\n" + mixing if mixing else ""))  # the class-mixing section kept
    return 0


if __name__ == "__main__":
    sys.exit(main())
