"""Write an image source as WebDataset tar shards with an index: `vqgan-make-shards SOURCE OUT [options]`.

    vqgan-make-shards embedded runs/shards/train --resize 96 --format jpg --repeats 64 --shard-size 64
    vqgan-make-shards embedded runs/shards/eval --split eval --resize 96 --format jpg   # the quickstart on shards
    vqgan-make-shards /data/imagenet/train /data/shards/imagenet-train --shard-size 2000 --resize 288 \\
        --format jpg --label-column label --workers 16
    vqgan-make-shards cifar10 /data/shards/cifar10 --image-column img --label-column label

SOURCE is what `data.source` takes (embedded, a local image folder or a hub dataset name). The rows are
written in a random order drawn from `--shuffle-seed` (default 0), so that every shard holds a sample of
the whole source: an image folder lists its rows class by class, and a training worker, which reads a
small block of the shards, would otherwise see a few classes per batch. `--keep-order` writes them in
the source's order instead. Shard k holds rows order[k * shard_size : (k + 1) * shard_size] as samples
`ROW.EXT` (+ `ROW.cls`, the label as text), ROW being the row's number in the source; the same seed
gives the same shards. index.json records the order (`row_order`: "shuffled" or "source",
`shuffle_seed`). Shards are written in
parallel, each into a temporary file that is read back and checked (sample count, every image decoded)
before it is renamed into place; `index.json` (each shard's name and sample count, the total, the files
skipped as unreadable) is written last, so a folder with an index is complete. Train on it with
`data.source="wds:OUT/shard-{000000..NNNNNN}.tar"` (the command prints the exact pattern).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vqgan.data.config import DataConfig
from vqgan.data.decode import decode_image  # the same decode and RGB rules as training
from vqgan.data.shards import INDEX_FILE, sample_key
from vqgan.data.sources import source_of
from vqgan.errors import DataError
from vqgan.utils import atomic_write_text

FORMATS = ("keep", "jpg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# The default --shuffle-seed: shard sets written from the same source are the same unless asked otherwise.
DEFAULT_SHUFFLE_SEED = 0
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm"}


@dataclass(frozen=True)
class ShardOptions:
    out: str
    shard_size: int
    resize: int | None  # shorter side shrunk to this (never enlarged); None = pixels as they are
    format: str  # "keep": the source bytes untouched unless resized
    quality: int
    image_column: str
    label_column: str | None
    repeats: int = 1  # each source row written this many times (as rows r, r + n, r + 2n, ...)
    prefix: str = "shard"

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"


def encode_image(data: bytes, options: ShardOptions) -> tuple[bytes, str]:
    """Source image bytes -> (bytes to store, extension); decodes fully, so a corrupt file raises here."""
    with Image.open(io.BytesIO(data)) as probe:
        source_format = probe.format
    image = decode_image({"bytes": data})
    resized = options.resize is not None and min(image.size) > options.resize
    if options.format == "keep" and not resized and source_format in _EXTENSIONS:
        return data, _EXTENSIONS[source_format]
    if resized:
        scale = options.resize / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    ext = "png" if options.format == "keep" else options.format
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS[ext], **({"quality": options.quality} if ext in ("jpg", "webp") else {}))
    return buffer.getvalue(), ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same rows give the same bytes
    tar.addfile(info, io.BytesIO(data))


def verify_shard(path: Path, expected: int) -> None:
    """Read a written shard back: `expected` samples, each with one image that decodes; raises otherwise."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            parsed = sample_key(info.name)
            if parsed is not None:
                samples.setdefault(parsed[0], {})[parsed[1]] = tar.extractfile(info).read()
    if len(samples) != expected:
        raise RuntimeError(f"shard {path} holds {len(samples)} samples after writing, expected {expected}")
    for key, members in samples.items():
        images = [ext for ext in members if ext in _EXTENSIONS.values()]
        if len(images) != 1:
            raise RuntimeError(f"shard {path} sample {key} has members {sorted(members)}, expected one image")
        decode_image({"bytes": members[images[0]]})


_TABLE: Any = None  # the source table, set once per writer process


def _init_writer(table: Any) -> None:
    global _TABLE
    _TABLE = table


def row_order(rows: int, shuffle_seed: int | None) -> np.ndarray:
    """The order the rows are written in: a permutation drawn from the seed, or the source's (None)."""
    if shuffle_seed is None:
        return np.arange(rows)
    return np.random.default_rng(shuffle_seed).permutation(rows)


def write_shard(index: int, rows: list[int], options: ShardOptions) -> dict[str, Any]:
    """Write shard `index` holding `rows` (of the source, repeats counted on) atomically and verified; -> its entry."""

    table = _TABLE
    final = Path(options.out) / options.shard_name(index)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        return _write_shard(table, rows, final, tmp, options)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted shard leaves no temporary file behind
        raise


def _write_shard(table: Any, rows: list[int], final: Path, tmp: Path, options: ShardOptions) -> dict[str, Any]:
    skipped, count = [], 0
    encoded: dict[int, tuple[bytes, str]] = {}  # with repeats: each source row encoded once a shard
    with tarfile.open(tmp, "w") as tar:
        for row in rows:
            record = table[row % len(table)]
            cell = record[options.image_column]
            name = cell.get("path") or f"row {row}"
            try:
                source_row = row % len(table)
                if source_row in encoded:
                    stored, ext = encoded[source_row]
                else:
                    data = cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()
                    stored, ext = encode_image(data, options)
                    if options.repeats > 1:  # a few photos repeated (the embedded ones): hold them encoded
                        encoded[source_row] = stored, ext
            except Exception as err:  # a corrupt source file: skipped, named in the index
                skipped.append(f"{name}: {type(err).__name__}: {err}")
                continue
            key = f"{row:09d}"
            _add(tar, f"{key}.{ext}", stored)
            if options.label_column is not None:
                _add(tar, f"{key}.cls", str(int(record[options.label_column])).encode())
            count += 1
    if count == 0:
        tmp.unlink()
        return {"name": final.name, "count": 0, "bytes": 0, "skipped": skipped}
    verify_shard(tmp, count)
    os.replace(tmp, final)
    return {"name": final.name, "count": count, "bytes": final.stat().st_size, "skipped": skipped}


def load_rows(source: str, split: str, image_column: str, label_column: str | None, cache_dir: str | None):
    """The source's split as a table whose image column holds undecoded {"bytes", "path"} cells."""
    config = DataConfig(source=source, split=split, image_column=image_column, label_column=label_column,
                        cache_dir=cache_dir)
    return source_of(config).source_table(split)


def make_shards(source: str, out: str | Path, *, split: str = "train", shard_size: int = 1000,
                resize: int | None = None, format: str = "keep", quality: int = 95, image_column: str = "image",
                label_column: str | None = None, workers: int = 1, cache_dir: str | None = None,
                repeats: int = 1, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
                progress: bool = True) -> dict[str, Any]:
    """Write the shards and index.json of `source` [split] into `out`, rows in the order drawn from
    `shuffle_seed` (None: the source's order); -> the index."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1 sample, got {shard_size}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive number of pixels, got {resize}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: write shards into a new folder (stale shards would mix in)")
    out.mkdir(parents=True, exist_ok=True)
    table = load_rows(source, split, image_column, label_column, cache_dir)
    if len(table) == 0:
        raise DataError(f"{source} [{split}] has no rows")
    options = ShardOptions(str(out), shard_size, resize, format, quality, image_column, label_column, repeats)
    num_shards = -(-len(table) * repeats // shard_size)
    order = row_order(len(table) * repeats, shuffle_seed)
    rows_of = lambda index: order[index * shard_size : (index + 1) * shard_size].tolist()  # noqa: E731
    entries: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=num_shards, desc=f"shards of {source} [{split}]", unit="shard", disable=not progress)
    if workers <= 1:
        _init_writer(table)
        for index in range(num_shards):
            entries[index] = write_shard(index, rows_of(index), options)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_writer, initargs=(table,)) as pool:
            futures = {pool.submit(write_shard, index, rows_of(index), options): index for index in range(num_shards)}
            for future in as_completed(futures):
                entries[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    written = [entries[i] for i in range(num_shards) if entries[i]["count"] > 0]
    skipped = [name for i in range(num_shards) for name in entries[i].pop("skipped")]
    if not written:
        raise DataError(f"no image of {source} [{split}] could be read ({len(skipped)} unreadable)")
    index = {"shards": written, "total": sum(e["count"] for e in written), "source": source, "split": split,
             "repeats": repeats, "row_order": "source" if shuffle_seed is None else "shuffled",
             "shuffle_seed": shuffle_seed,
             "label_key": "cls" if label_column else None, "resize": resize, "format": format,
             "skipped": skipped, "pattern": shard_pattern(out, options, written)}
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2))
    return index


def shard_pattern(out: Path, options: ShardOptions, written: list[dict[str, Any]]) -> str:
    """The brace pattern naming the shards written, e.g. out/shard-{000000..000003}.tar."""
    if len(written) == 1:
        return str(out / written[0]["name"])
    first, last = written[0]["name"], written[-1]["name"]
    digits = lambda name: name[len(options.prefix) + 1 : -len(".tar")]  # noqa: E731
    if len(written) == int(digits(last)) - int(digits(first)) + 1:
        return str(out / f"{options.prefix}-{{{digits(first)}..{digits(last)}}}.tar")
    return str(out / f"{options.prefix}-*.tar")  # some shards came out empty (every file unreadable)


def main(argv: list[str] | None = None) -> int:
    from vqgan.errors import USER_ERRORS, run_command

    # FileExistsError: a non-empty output folder. Anything else (a RuntimeError included) is a bug: traceback.
    return run_command(_command, argv, (*USER_ERRORS, FileExistsError))


def _command(argv: list[str]) -> int:
    from vqgan.errors import CommandParser, add_debug_flag

    parser = CommandParser(prog="vqgan-make-shards", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    parser.add_argument("source", help="embedded, a local image folder, or a hub dataset name")
    parser.add_argument("out", help="folder to write the shards and index.json into (new or empty)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, default=None, help="shrink the shorter side to this many pixels")
    parser.add_argument("--format", default="keep", choices=FORMATS, help="re-encode the images (default: keep)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality when re-encoding")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default=None, help="integer labels to keep as each sample's .cls")
    parser.add_argument("--workers", type=int, default=1, help="shard writer processes")
    parser.add_argument("--repeats", type=int, default=1,
                        help="write each image this many times (a handful of photos: an epoch of useful length; "
                             "each copy gets its own random crops)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=DEFAULT_SHUFFLE_SEED,
                       help=f"seed of the random order the rows are written in (default {DEFAULT_SHUFFLE_SEED})")
    order.add_argument("--keep-order", action="store_true",
                       help="write the rows in the source's order (an image folder's: class by class); training "
                            "batches then hold few classes")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    index = make_shards(args.source, args.out, split=args.split, shard_size=args.shard_size, resize=args.resize,
                        format=args.format, quality=args.quality, image_column=args.image_column,
                        label_column=args.label_column, workers=args.workers, cache_dir=args.cache_dir,
                        repeats=args.repeats, shuffle_seed=None if args.keep_order else args.shuffle_seed,
                        progress=not args.no_progress)
    order = "in the source's order" if args.keep_order else f"in a random order (seed {args.shuffle_seed})"
    print(f"wrote {index['total']} samples {order} in {len(index['shards'])} shards to {args.out} "
          f"({len(index['skipped'])} unreadable files skipped)")
    print(f"train on them with: data.source=\"wds:{index['pattern']}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
