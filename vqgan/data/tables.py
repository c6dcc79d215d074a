"""Map-style tables: the embedded photos, a hub dataset, a local parquet copy or an image folder, loaded as
`datasets.Dataset`s of undecoded image cells; the node-local index pointer; hold-outs; start-up checks."""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from vqgan.data.config import EMBEDDED_EVAL, EMBEDDED_PHOTOS, FORMAT_SCAN_LIMIT, SIZE_SCAN_LIMIT, SPLITS, DataConfig
from vqgan.data.decode import open_image
from vqgan.data.ranks import process_state
from vqgan.errors import DataError
from vqgan.utils import atomic_write_text


@functools.lru_cache(maxsize=2)
def embedded_dataset(split: str = "train") -> datasets.Dataset:
    """scikit-image's photographs as a `datasets.Dataset` with "image" (PIL) and "name" columns; no network."""
    if split not in SPLITS:
        raise ValueError(f"embedded split must be one of {SPLITS}, got {split!r}")
    import skimage.data  # imported here: it is slow to import and only this source needs it

    names = [n for n in EMBEDDED_PHOTOS if (n in EMBEDDED_EVAL) == (split == "eval")]
    cells = []
    for name in names:
        pixels = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # lossless, fast to encode
        cells.append({"bytes": buffer.getvalue(), "path": f"skimage.data.{name}"})
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": cells, "name": names}, features=features)


def load_split(config: DataConfig, source_split: str) -> tuple[datasets.Dataset, str]:
    """One split of a hub dataset, of a local copy of one (a folder of parquet files) or of an image folder."""
    state = process_state()
    pointer = _index_pointer(config, source_split)
    args, kwargs = load_dataset_args(config)
    try:
        # The main process of each node downloads / walks and indexes the source into the cache; the others
        # wait, then open the cache's arrow files it names, instead of all walking the folder (minutes for
        # ImageNet on NFS) or hitting the hub at once.
        with state.local_main_process_first():
            table = None if state.is_local_main_process else _open_indexed(pointer)
            if table is None:
                table = datasets.load_dataset(*args, split=source_split, cache_dir=config.cache_dir, **kwargs)
                if state.is_local_main_process and state.num_processes > 1:
                    atomic_write_text(pointer, json.dumps([f["filename"] for f in table.cache_files]))
    except Exception as err:  # no network, unknown name or split: say which source and split failed
        raise DataError(
            f"could not load split {source_split!r} of {config.source!r}: {type(err).__name__}: {err}"
        ) from err
    return table, f"{config.source} [{source_split}]"


def _index_pointer(config: DataConfig, split: str) -> Path:
    """Node-local file where the node's main process names the arrow files it loaded (source, split, cache)."""
    import hashlib
    import tempfile

    key = json.dumps([str(Path(config.source).expanduser().absolute()) if Path(config.source).expanduser().exists()
                      else config.source, split, config.cache_dir])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vqgan-index-{os.getuid()}-{digest}.json"


def _open_indexed(pointer: Path) -> datasets.Dataset | None:
    """The table the node's main process just loaded, from its arrow files; None to load it here instead."""
    try:
        files = json.loads(pointer.read_text())
    except (OSError, ValueError):
        return None
    if not files or not all(Path(f).is_file() for f in files):
        return None  # held in memory there, or a cache elsewhere
    parts = [datasets.Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_dataset_args(config: DataConfig) -> tuple[tuple[str, ...], dict[str, Any]]:
    """`load_dataset` arguments for a hub name, a folder of parquet files or an image folder."""
    folder = Path(config.source).expanduser()
    args, kwargs = (config.source,), {}
    if folder.is_dir():
        suffixes = _first_suffixes(folder)
        if ".parquet" in suffixes:  # e.g. a snapshot of the cifar10 hub repository: read like the hub
            args = (str(folder),)
        elif suffixes & set(ImageFolder.EXTENSIONS):
            args, kwargs = ("imagefolder",), {"data_dir": str(folder)}
        else:
            raise DataError(
                f"image folder {folder} holds no image files (looked for .png, .jpg, .webp, ... recursively) "
                f"and no .parquet files"
            )
    elif config.source.startswith(("/", "./", "../", "~")):
        raise DataError(f"image folder {config.source!r} does not exist (a source that looks like a path must be one)")
    return args, kwargs


def _first_suffixes(folder: Path, limit: int = FORMAT_SCAN_LIMIT) -> set[str]:
    """Suffixes of the first `limit` files under `folder` (sorted walk): enough to tell parquet from images
    without listing a 1.28M-file tree on every process (NFS: minutes)."""
    suffixes: set[str] = set()
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            suffixes.add(Path(name).suffix.lower())
            seen += 1
            if seen >= limit:
                return suffixes
    return suffixes


def require_rows(table: datasets.Dataset, description: str) -> None:
    if len(table) == 0:
        raise DataError(f"{description} has no images")


def select_rows(table: datasets.Dataset, split: str, config: DataConfig, description: str) -> datasets.Dataset:
    """Hold out eval rows and apply max_images / num_eval_images with a fixed permutation (same every run)."""
    order = np.random.default_rng(0).permutation(len(table))  # fixed: the split must not move with the seed
    if config.source != "embedded" and config.eval_split is None and config.num_eval_images is not None:
        if config.num_eval_images >= len(table):
            raise DataError(
                f"num_eval_images={config.num_eval_images} held out of {description} would leave no training "
                f"images: it has only {len(table)} rows"
            )
        held_out, rest = order[: config.num_eval_images], order[config.num_eval_images :]
        order = held_out if split == "eval" else rest
    limit = config.num_eval_images if split == "eval" else config.max_images
    if limit is not None and limit < len(order):
        order = order[:limit]
    if len(order) == len(table):
        return table
    return table.select(np.sort(order))


def check_columns(table: datasets.Dataset, config: DataConfig, description: str) -> datasets.Dataset:
    columns = [config.image_column] + ([config.label_column] if config.label_column else [])
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{description} has no column {missing[0]!r}; its columns are {table.column_names}")
    table = table.select_columns(columns)
    try:  # decode=False: we decode in __getitem__, where a bad file can be skipped
        return table.cast_column(config.image_column, datasets.Image(decode=False))
    except Exception as err:
        feature = table.features[config.image_column]
        raise DataError(f"{description} column {config.image_column!r} holds {feature}, not images: {err}") from err


def check_crop_fits(table: datasets.Dataset, column: str, size: int, description: str) -> None:
    """Fail at start when no image is large enough for the crop; reads headers only, stops at the first fit."""
    largest, readable, first_error = 0, 0, None
    scanned = min(len(table), SIZE_SCAN_LIMIT)
    for row in range(scanned):
        try:
            with open_image(table[row][column]) as pil:  # PIL reads the header only until .load()
                short = min(pil.size)
        except Exception as err:
            first_error = first_error or f"row {row}: {type(err).__name__}: {err}"
            continue
        readable += 1
        if short >= size:
            return
        largest = max(largest, short)
    if readable == 0:
        raise DataError(f"none of the first {scanned} images of {description} could be read ({first_error})")
    raise DataError(
        f"image_size={size} is larger than every image of {description} scanned (largest shorter side: "
        f"{largest}px in {readable} readable of {scanned} scanned, of {len(table)}); set resize: {size} to scale "
        f"the shorter side up first, or lower image_size"
    )

