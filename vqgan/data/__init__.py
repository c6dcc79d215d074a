"""Image data for tokenizer training: decode what PIL can read, skip what it cannot, crop to (3, S, S).

Every item is a float tensor (3, S, S) in [-1, 1], the range inside the models. Map-style sources:
"embedded" (photographs that ship with scikit-image, so a fresh machine without network can train), a
HuggingFace hub dataset name ("cifar10"), or a local folder of images (read with the `imagefolder`
builder). Streams: "wds:PATTERN" WebDataset shards (vqgan.data.shards; written by
vqgan.data.make_shards) and, with `streaming: true`, hub datasets read as they arrive
(vqgan.data.streaming). Images are decoded here, not by `datasets`, so that one corrupt or truncated
file costs one item, counted and named in the batch, instead of killing an epoch.

Randomness is a pure function of (seed, epoch, index): the sampler yields keys `epoch * n + i` and the
dataset seeds each item's crop and flip from its key. Order and crops are therefore the same with 0 or 8
workers, and a resumed run that calls `set_epoch` and skips the consumed batches sees the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from torchvision.transforms.v2 import functional as TF

from vqgan.data import shards
from vqgan.errors import DataError
from vqgan.utils import atomic_write_text, images_to_model_range

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")

# RGB photographs in the scikit-image wheel itself (no pooch download), checked with skimage 0.26 offline.
# Left out: cat (the same pixels as chelsea), camera (grayscale), colorwheel and logo (not photographs).
EMBEDDED_PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle", "retina", "rocket",
)
# Whole photographs held out of training, so eval reconstructions are of images the model never saw.
EMBEDDED_EVAL = ("coffee", "rocket")

# How many file names the folder-format check reads at most (parquet or images).
FORMAT_SCAN_LIMIT = 200
# How many headers the crop-size check reads at most: enough to catch a misconfiguration, cheap on ImageNet.
SIZE_SCAN_LIMIT = 1000


@dataclass(frozen=True)
class DataConfig:
    # "embedded" | a HuggingFace hub dataset name ("cifar10") | a local folder of images (imagefolder) |
    # "wds:PATTERN" tar shards (brace patterns / globs of paths, URLs, pipe: commands).
    source: str = "embedded"
    # Split of the source used for training (for a folder: "train" unless it has train/test subfolders).
    split: str = "train"
    # Split of the source used for evaluation; None: hold `num_eval_images` rows out of `split` instead.
    eval_split: str | None = None
    # Column holding the images (cifar10 calls it "img").
    image_column: str = "image"
    # Column of integer class labels to return as batch["labels"] (a folder with class subfolders: "label").
    label_column: str | None = None
    # Side S of the square crops the model sees.
    image_size: int = 256
    # Resize the shorter side to this before cropping (taming-transformers: = image_size); None = native scale.
    resize: int | None = None
    # Training crops at a random position; False: centre crops. Eval always uses centre crops.
    random_crop: bool = True
    # Flip training crops left-right with probability 1/2. Eval never flips.
    hflip: bool = True
    # DataLoader worker processes; 0 decodes in the main process.
    num_workers: int = 0
    # Train on a fixed random subset of this many rows (the same subset every run; streams: the first
    # ones); None = all.
    max_images: int | None = None
    # Cap on eval images; with eval_split None, this many rows of `split` are held out for eval.
    num_eval_images: int | None = None
    # "embedded" only: random crops drawn per training photo per epoch, so an epoch has a useful length.
    embedded_repeats: int = 32
    # Where `datasets` caches hub downloads and imagefolder indexes; None = its default (~/.cache).
    cache_dir: str | None = None
    # Hub datasets (or a local parquet / image folder): read as a stream (datasets' IterableDataset), never
    # downloaded whole; eval rows are the first num_eval_images of eval_split (or held out of split).
    streaming: bool = False
    # Decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when `resize` is at most half their shorter side.
    jpeg_draft: bool = True
    # Streams ("wds:" shards, streaming): samples held in the shuffle buffer (raw bytes; 1 = no buffer).
    shuffle_buffer: int = 1000
    # "wds:PATTERN" sources: the index.json with each shard's sample count; None = the one beside the shards
    # (local shards without one are counted from their tar headers at start).
    shard_index: str | None = None
    # "wds:" sources: shards each DataLoader worker reads at once, their samples merged in a random order
    # before the shuffle buffer (1 = one shard after another).
    shard_interleave: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(
                f"resize={self.resize} is smaller than image_size={self.image_size}: a {self.image_size}-px crop "
                f"cannot fit in an image whose shorter side is {self.resize}"
            )
        for name in ("max_images", "num_eval_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or at least 1, got {value}")
        if self.embedded_repeats < 1:
            raise ValueError(f"embedded_repeats must be at least 1, got {self.embedded_repeats}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.streaming and (self.source == "embedded" or self.source.startswith("wds:")):
            raise ValueError(f"streaming: true is for hub datasets (and local parquet / image folders); "
                             f"{self.source!r} is {'a stream already' if self.source.startswith('wds:') else 'in memory'}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 = no buffer), got {self.shuffle_buffer}")
        if self.shard_interleave < 1:
            raise ValueError(f"shard_interleave must be at least 1 (1 = one shard at a time), got {self.shard_interleave}")


# ----------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16-bit and float data rescaled, not clipped."""
    mode = image.mode
    if mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit): 16-bit data, 65535 -> 255
        # NOTE: Pillow's own convert("L") clips these at 255, turning most 16-bit images white.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(values)
    if mode == "F":  # floats: [0, 1] data is scaled to [0, 255], anything else is taken as [0, 255]
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return _gray_to_rgb(values * 255.0 if values.max(initial=0.0) <= 1.0 else values)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in image.info:
        # White, not dropping alpha: pixels under alpha 0 hold arbitrary colours (often black or garbage),
        # and a transparent background is shown on white by nearly every viewer. P goes through RGBA so that
        # a palette's transparent index is honoured.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    return image.convert("RGB")  # RGB (a copy), 1, L, CMYK, YCbCr, LAB, HSV


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _open(image: dict[str, Any]) -> Image.Image:
    """Lazy PIL image from a `datasets.Image(decode=False)` cell ({"bytes", "path"}); reads only the header."""
    if image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if image.get("path"):
        return Image.open(image["path"])
    raise DataError(f"image cell has neither bytes nor a path: {image!r}")


def decode_image(image: dict[str, Any], min_short_side: int | None = None) -> Image.Image:
    """Fully decoded, upright RGB image; raises (OSError, ValueError, ...) on a corrupt or truncated file.

    min_short_side: the image is about to be resized so that its shorter side is this; a JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 scale whose shorter side still reaches it (libjpeg's DCT
    scaling, "draft" mode: a 4x smaller decode is several times faster), and the resize does the rest.
    """
    with _open(image) as pil:
        if min_short_side is not None and pil.format == "JPEG" and min(pil.size) > 2 * min_short_side:
            scale = min_short_side / min(pil.size)
            pil.draft("RGB", (math.ceil(pil.width * scale), math.ceil(pil.height * scale)))
        pil.load()  # NOTE: the decode happens here; truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
        return to_rgb(ImageOps.exif_transpose(pil))  # camera JPEGs store rotation as an EXIF tag


def resized_pixels(image: Image.Image, size: int, resize: int | None) -> torch.Tensor:
    """RGB image -> (3, H', W') uint8 with the shorter side resized (to `resize`, or up to `size` if smaller)."""
    pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8
    short = min(pixels.shape[-2:])
    # NOTE: with resize None an image smaller than the crop is scaled up to fit, not skipped: build_dataset
    # has already checked that some images are large enough, so these are rare stragglers.
    target = resize if resize is not None else (size if short < size else None)
    if target is not None and target != short:
        pixels = TF.resize(pixels, [target], antialias=True)  # shorter side -> target
    return pixels


def crop_pixels(pixels: torch.Tensor, size: int, random_crop: bool, hflip: bool, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float in [-1, 1]: random or centre crop, maybe flip."""
    height, width = pixels.shape[-2:]
    if random_crop:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        pixels = TF.crop(pixels, top, left, size, size)
    else:
        pixels = TF.center_crop(pixels, [size, size])
    if hflip and rng.random() < 0.5:
        pixels = TF.horizontal_flip(pixels)
    return images_to_model_range(TF.to_dtype(pixels, torch.float32, scale=True))  # (3, S, S) in [-1, 1]


def crop_to_tensor(
    image: Image.Image, size: int, resize: int | None, random_crop: bool, hflip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """RGB image -> (3, size, size) float in [-1, 1]: resize the shorter side, crop, maybe flip."""
    return crop_pixels(resized_pixels(image, size, resize), size, random_crop, hflip, rng)


# ----------------------------------------------------------------------------- dataset, sampler, collate


@dataclass(frozen=True)
class BadItem:
    """What the dataset returns in place of an image it could not read; the collate function drops it."""

    name: str  # the file path, or "<source> [<split>] row <i>" for images stored inside a dataset
    error: str


_warned: set[str] = set()  # per process: each worker warns about a bad file once


class ImageDataset(Dataset):
    """Map-style dataset of {"image": (3, S, S) in [-1, 1], "label": int}; a key k >= len means epoch k // len."""

    def __init__(
        self,
        table: datasets.Dataset,
        description: str,
        image_size: int,
        resize: int | None,
        random_crop: bool,
        hflip: bool,
        image_column: str = "image",
        label_column: str | None = None,
        repeats: int = 1,
        seed: int = 0,
        jpeg_draft: bool = True,
    ) -> None:
        self.table, self.description = table, description
        self.jpeg_draft = jpeg_draft
        self.image_size, self.resize, self.random_crop, self.hflip = image_size, resize, random_crop, hflip
        self.image_column, self.label_column = image_column, label_column
        self.repeats, self.seed = repeats, seed
        # Many crops of few images (the embedded photos): decode and resize each image once, not once per
        # crop (decoding a 512px PNG costs ~20x the crop). Each worker process fills its own copy.
        self._resized_cache: dict[int, torch.Tensor] | None = {} if repeats > 1 and len(table) <= 256 else None

    def __len__(self) -> int:
        return len(self.table) * self.repeats

    def __repr__(self) -> str:
        repeats = f" x {self.repeats} crops" if self.repeats > 1 else ""
        crop = "random" if self.random_crop else "centre"
        return (
            f"ImageDataset({self.description}: {len(self.table)} images{repeats} = {len(self)} samples, "
            f"resize={self.resize}, {crop} {self.image_size}px crops, hflip={self.hflip}, (3, S, S) in [-1, 1])"
        )

    def _name(self, cell: dict[str, Any], row: int) -> str:
        """The file's path, or where in the table an image stored as bytes sits."""
        if cell.get("bytes") is None and cell.get("path"):
            return cell["path"]
        return f"{self.description} row {row}" + (f" ({cell['path']})" if cell.get("path") else "")

    def __getitem__(self, key: int) -> dict[str, Any] | BadItem:
        row = (key % len(self)) % len(self.table)
        record = self.table[row]
        cell = record[self.image_column]
        name = self._name(cell, row)
        cached = self._resized_cache.get(row) if self._resized_cache is not None else None
        try:
            pixels = cached if cached is not None else resized_pixels(
                decode_image(cell, self.resize if self.jpeg_draft else None), self.image_size, self.resize)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
            if name not in _warned:
                _warned.add(name)
                logger.warning("skipping unreadable image %s: %s: %s", name, type(err).__name__, err)
            return BadItem(name, f"{type(err).__name__}: {err}")
        rng = np.random.default_rng((self.seed, key))  # the crop depends on (seed, epoch, row) only
        if self._resized_cache is not None:
            self._resized_cache[row] = pixels
        item = {"image": crop_pixels(pixels, self.image_size, self.random_crop, self.hflip, rng)}
        if self.label_column is not None:
            item["label"] = int(record[self.label_column])
        return item


class EpochSampler(Sampler[int]):
    """Yields keys epoch * n + i in a (seed, epoch)-determined order; each pass moves to the next epoch."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        # accelerate's DataLoaderShard calls this with its epoch counter before every pass.
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # a plain DataLoader gets a new epoch every pass
        if self.shuffle:
            seed = int(np.random.SeedSequence((self.seed, epoch)).generate_state(1, dtype=np.uint64)[0])
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.size)
        return iter((order + epoch * self.size).tolist())


@dataclass(frozen=True)
class CollateImages:
    """Stacks the good items and counts the bad ones: {"images", "labels"?, "num_skipped", "skipped"}."""

    image_size: int
    with_labels: bool

    def __call__(self, items: list[dict[str, Any] | BadItem]) -> dict[str, Any]:
        good = [item for item in items if not isinstance(item, BadItem)]
        skipped = [item.name for item in items if isinstance(item, BadItem)]
        if good:
            images = torch.stack([item["image"] for item in good])  # (B', 3, S, S)
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size)
        batch = {"images": images, "num_skipped": len(skipped), "skipped": skipped}
        if self.with_labels:
            batch["labels"] = torch.tensor([item["label"] for item in good], dtype=torch.long)  # (B',)
        return batch


# ----------------------------------------------------------------------------- sources


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


def process_state():
    """Accelerate's process state (rank, world, device): the Accelerator's if one exists, else started here
    the way an Accelerator would (ACCELERATE_USE_CPU read too, so a CPU launch is seen as multi-process)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _load_source(config: DataConfig, source_split: str) -> tuple[datasets.Dataset, str]:
    """One split of a hub dataset, of a local copy of one (a folder of parquet files) or of an image folder."""
    state = process_state()
    pointer = _index_pointer(config, source_split)
    args, kwargs = _source_args(config)
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


def _source_args(config: DataConfig) -> tuple[tuple[str, ...], dict[str, Any]]:
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


def _subset(table: datasets.Dataset, split: str, config: DataConfig, description: str) -> datasets.Dataset:
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


def _check_columns(table: datasets.Dataset, config: DataConfig, description: str) -> datasets.Dataset:
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


def _check_crop_fits(table: datasets.Dataset, column: str, size: int, description: str) -> None:
    """Fail at start when no image is large enough for the crop; reads headers only, stops at the first fit."""
    largest, readable, first_error = 0, 0, None
    scanned = min(len(table), SIZE_SCAN_LIMIT)
    for row in range(scanned):
        try:
            with _open(table[row][column]) as pil:  # PIL reads the header only until .load()
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


# ----------------------------------------------------------------------------- public entry points


def build_dataset(config: DataConfig, split: str = "train", seed: int = 0) -> ImageDataset:
    """The "train" (random crops, flips) or "eval" (centre crops) dataset of `config`; checks it at start.

    A "wds:" source gives its eval split here (held-out samples or an eval pattern, read into memory);
    its training split is a stream (`build_dataloader`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    embedded = config.source == "embedded"
    if shards.is_shard_source(config.source):
        if split == "train":
            raise ValueError(f"{config.source} is a stream of shards: build its training data with build_dataloader")
        table, description = _shard_eval_table(config)
    elif config.streaming:
        if split == "train":
            raise ValueError(f"{config.source} is streamed: build its training data with build_dataloader")
        from vqgan.data.streaming import eval_rows

        table, description = eval_rows(config)
    elif embedded:
        table, description = embedded_dataset(split), f"embedded [{split}]"
    else:
        source_split = config.split if split == "train" or config.eval_split is None else config.eval_split
        if split == "eval" and config.eval_split is None and config.num_eval_images is None:
            raise DataError(
                f"no eval data for {config.source!r}: set eval_split (e.g. 'test') or num_eval_images to hold out"
            )
        table, description = _load_source(config, source_split)
    if len(table) == 0:
        raise DataError(f"{description} has no images")
    if shards.is_shard_source(config.source) or config.streaming:  # already the eval rows: {"image", "label"?}
        config = dataclasses.replace(config, image_column="image", label_column="label" if config.label_column else None)
    else:
        table = _subset(table, split, config, description)
    table = _check_columns(table, config, description)
    train = split == "train"
    # Eval of the embedded photos sees each whole photograph scaled to S, not a small crop of a large one.
    resize = config.resize if train or not embedded else (config.resize or config.image_size)
    if resize is None:
        _check_crop_fits(table, config.image_column, config.image_size, description)
    return ImageDataset(
        table,
        description,
        image_size=config.image_size,
        resize=resize,
        random_crop=config.random_crop and train,
        hflip=config.hflip and train,
        image_column=config.image_column,
        label_column=config.label_column,
        repeats=config.embedded_repeats if embedded and train else 1,
        seed=seed,
        jpeg_draft=config.jpeg_draft,
    )


def build_dataloader(
    config: DataConfig,
    split: str = "train",
    batch_size: int = 8,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """Map-style DataLoader of {"images": (B', 3, S, S) in [-1, 1], "labels": (B',) long, "num_skipped": int, ...}.

    B' <= batch_size: unreadable files are dropped (named in batch["skipped"], counted in batch["num_skipped"];
    sum it over the run to report). shuffle and drop_last default to True for "train", False for "eval".
    Call `loader.batch_sampler.sampler.set_epoch(epoch)` (or accelerate's `loader.set_epoch`) when resuming.
    """
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    if train and shards.is_shard_source(config.source):
        return build_shard_loader(config, batch_size, shuffle, seed)
    if train and config.streaming:
        from vqgan.data.streaming import build_hub_stream

        collate = CollateKeyed(CollateImages(config.image_size, config.label_column is not None))
        return build_hub_stream(config, batch_size, shuffle, seed, collate)
    dataset = build_dataset(config, split, seed=seed)
    drop_last = train if drop_last is None else drop_last
    if drop_last and len(dataset) < batch_size:
        raise DataError(f"{dataset.description} has {len(dataset)} samples, fewer than batch_size={batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle, seed),
        num_workers=config.num_workers,
        collate_fn=CollateImages(config.image_size, config.label_column is not None),
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU can be non-blocking
        # Workers live across epochs (no re-fork and re-import each epoch); the sampler, which holds the
        # epoch, runs in the main process, so they never see a stale epoch.
        persistent_workers=config.num_workers > 0 and train,
        # Only seeds the workers' global RNGs, which nothing here draws from; crops come from the item keys.
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------- WebDataset shards


def _shard_layout(config: DataConfig) -> tuple[list[str], list[shards.Span], list[shards.Span]]:
    """(shard names, held-out eval spans, training spans) of a "wds:" source; max_images caps the training ones."""
    names = shards.expand_pattern(config.source)
    counts = shards.shard_counts(names, config.shard_index)
    if config.eval_split is None and config.num_eval_images is not None:
        held_out, train = shards.held_out_spans(counts, config.num_eval_images)
    else:
        held_out, train = [], [shards.Span(i, 0, c) for i, c in enumerate(counts)]
    if config.max_images is not None:
        train = shards.take(train, 0, config.max_images)
    return names, held_out, train


def shard_eval_spans(config: DataConfig) -> tuple[list[str], list[shards.Span], str]:
    """(shard names, spans, description) of a "wds:" source's eval rows: num_eval_images held out of it, or
    the first num_eval_images (all if None) of the eval_split pattern. Training's eval and tokenization use it."""
    if config.eval_split is not None:
        if not shards.is_shard_source(config.eval_split):
            raise DataError(f"eval_split of a shard source must be a 'wds:PATTERN' of eval shards, got "
                             f"{config.eval_split!r} (or leave it None and set num_eval_images to hold rows out)")
        names = shards.expand_pattern(config.eval_split)
        counts = shards.shard_counts(names)
        every = [shards.Span(i, 0, c) for i, c in enumerate(counts)]
        spans = shards.take(every, 0, config.num_eval_images or sum(counts))
        description = f"{config.eval_split} [eval]"
    elif config.num_eval_images is not None:
        names, spans, _ = _shard_layout(config)
        description = f"{config.source} [first {config.num_eval_images} held out]"
    else:
        raise DataError(f"no eval data for {config.source!r}: set eval_split (a 'wds:PATTERN' of eval shards) or "
                         f"num_eval_images to hold out")
    return names, spans, description


def _shard_eval_table(config: DataConfig) -> tuple[datasets.Dataset, str]:
    """The eval rows of a "wds:" source in memory (`shard_eval_spans`)."""
    names, spans, description = shard_eval_spans(config)
    images, labels = [], []
    for name, members in shards.read_spans(names, spans):
        data = shards.image_member(members, config.image_column)
        if data is None:
            raise DataError(f"eval sample {name} has no {config.image_column!r} member (it has {sorted(members)})")
        images.append({"bytes": data, "path": name})
        if config.label_column:
            if config.label_column not in members:
                raise DataError(f"eval sample {name} has no label member {config.label_column!r} ({sorted(members)})")
            labels.append(shards.parse_label(members[config.label_column]))
    columns: dict[str, Any] = {"image": images}
    features = {"image": datasets.Image(decode=False)}
    if config.label_column:
        columns["label"], features["label"] = labels, datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), description


@dataclass(frozen=True)
class ShardItem:
    """A shard sample's members -> {"image", "label"?, "key"} or a BadItem naming it (picklable for workers)."""

    image_size: int
    resize: int | None
    random_crop: bool
    hflip: bool
    image_key: str
    label_key: str | None
    jpeg_draft: bool = True

    def __call__(self, members: dict[str, bytes], name: str, seed: int) -> dict[str, Any] | BadItem:
        data = shards.image_member(members, self.image_key)
        if data is None:
            return _bad(name, f"no {self.image_key!r} member (the sample has {sorted(members)})")
        try:
            draft = self.resize if self.jpeg_draft else None
            pixels = resized_pixels(decode_image({"bytes": data}, draft), self.image_size, self.resize)
            label = None
            if self.label_key is not None:
                if self.label_key not in members:
                    return _bad(name, f"no label member {self.label_key!r} (the sample has {sorted(members)})")
                label = shards.parse_label(members[self.label_key])
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...; a label may not be an int
            return _bad(name, f"{type(err).__name__}: {err}")
        item = {"image": crop_pixels(pixels, self.image_size, self.random_crop, self.hflip, np.random.default_rng(seed)),
                "key": name}
        if label is not None:
            item["label"] = label
        return item


def _bad(name: str, error: str) -> BadItem:
    if name not in _warned:
        _warned.add(name)
        logger.warning("skipping unreadable sample %s: %s", name, error)
    return BadItem(name, error)


@dataclass(frozen=True)
class CollateKeyed:
    """CollateImages plus batch["keys"]: the names (shard:key) of the samples kept, in batch order."""

    inner: CollateImages

    def __call__(self, items: list[dict[str, Any] | BadItem]) -> dict[str, Any]:
        batch = self.inner(items)
        batch["keys"] = [item["key"] for item in items if not isinstance(item, BadItem)]
        return batch


def _warn_if_source_order(config: DataConfig, names: list[str]) -> None:
    """Warn when the shard tool wrote these shards in the source's order (an image folder: class by class)."""
    record = shards.index_row_order(names, config.shard_index)
    if record is None or record["row_order"] == "shuffled":
        return  # no index (shards from another tool: their order is unknown), or written shuffled
    state = "in source order" if record["row_order"] == "source" else "by a shard tool that kept the source's order"
    logger.warning("%s: the shards were written %s; a worker reads a 1/(processes x workers) block of them, so "
                   "with class-ordered sources (an image folder) each batch holds a few classes (BatchNorm, k-means "
                   "initialisation and entropy terms see them too). Rewrite them shuffled: vqgan-make-shards SOURCE "
                   "OUT (rows in a seeded random order by default, recorded in index.json)", config.source, state)


def build_shard_loader(config: DataConfig, batch_size: int, shuffle: bool, seed: int) -> shards.StreamLoader:
    """This process's training stream of a "wds:" source (rank and world from Accelerate's state)."""
    state = process_state()
    names, _, train = _shard_layout(config)
    make_item = ShardItem(config.image_size, config.resize, config.random_crop, config.hflip, config.image_column,
                          config.label_column, config.jpeg_draft)
    stream = shards.ShardStream(
        names, train, rank=state.process_index, world=state.num_processes, batch_size=batch_size,
        workers=config.num_workers, seed=seed, shuffle=shuffle, shuffle_buffer=config.shuffle_buffer,
        interleave=config.shard_interleave, make_item=make_item, collate=CollateKeyed(CollateImages(config.image_size, config.label_column is not None)),
    )
    layout = stream.layout
    if layout.batches == 0:
        raise DataError(f"{config.source}: {layout.total} training samples make no batch of {batch_size} on each of "
                         f"{layout.world} processes")
    if layout.left_out and state.is_main_process:
        logger.warning("%s: %d of %d samples per epoch are left out so that each of %d processes gets %d whole "
                       "batches of %d (which ones changes with each epoch's shard order)", config.source,
                       layout.left_out, layout.total, layout.world, layout.batches, batch_size)
    if state.is_main_process:
        _warn_if_source_order(config, names)
    return shards.StreamLoader(stream, config.num_workers, device=state.device,
                               pin_memory=state.device.type == "cuda")
