"""Map-style data: a table in memory (the embedded photos, a hub dataset, a local parquet copy, an image folder,
or a stream's eval rows) as crops, sampled epoch by epoch.

Randomness is a pure function of (seed, epoch, index): the sampler yields keys `epoch * n + i` and the
dataset seeds each item's crop and flip from its key. Order and crops are therefore the same with 0 or 8
workers, and a resumed run that calls `set_epoch` and skips the consumed batches sees the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vqgan.data.config import DataConfig
from vqgan.data.decode import crop_pixels, decode_image, resized_pixels
from vqgan.data.items import BadItem, CollateImages, unreadable
from vqgan.data.ranks import rank_share
from vqgan.data.tables import (
    check_columns,
    check_crop_fits,
    embedded_dataset,
    load_split,
    require_rows,
    select_rows,
)
from vqgan.errors import DataError

Table = tuple[datasets.Dataset, str]  # rows and their description


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
            return unreadable(name, f"{type(err).__name__}: {err}", "image")
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



class KeyedRows(Dataset):
    """The rows `rows` of `dataset`, each returned with its row index: one process's share to tokenize."""

    def __init__(self, dataset: Dataset, rows: range) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        row = self.rows[i]
        return row, self.dataset[row]


def image_dataset(table: datasets.Dataset, description: str, config: DataConfig, split: str, seed: int) -> ImageDataset:
    """The crops of `table`'s rows for `split` ("train": random crops and flips, "eval": centre crops), checked."""
    require_rows(table, description)
    table = check_columns(table, config, description)
    train, embedded = split == "train", config.source == "embedded"
    # Eval of the embedded photos sees each whole photograph scaled to S, not a small crop of a large one.
    resize = config.resize if train or not embedded else (config.resize or config.image_size)
    if resize is None:
        check_crop_fits(table, config.image_column, config.image_size, description)
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


def stream_eval_dataset(config: DataConfig, split: str, seed: int, read_table: Callable[[DataConfig], Table],
                        what: str) -> ImageDataset:
    """A stream's eval rows, read into memory by `read_table` (columns "image", "label"?), as centre crops.

    Its training data is a stream, never a table: asked for "train", this says so (`what` names the stream).
    """
    if split == "train":
        raise ValueError(f"{config.source} is {what}: build its training data with build_dataloader")
    table, description = read_table(config)
    in_memory = dataclasses.replace(config, image_column="image", label_column="label" if config.label_column else None)
    return image_dataset(table, description, in_memory, split, seed)


def epoch_loader(dataset: ImageDataset, config: DataConfig, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, train: bool) -> DataLoader:
    """DataLoader of {"images", "labels"?, "num_skipped", "skipped"} batches of `dataset`, one epoch a pass."""
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


class MapSource:
    """A table source ("embedded", a hub dataset, a local parquet copy, an image folder): see `sources.Source`.

    Its training DataLoader serves every process; `accelerator.prepare` deals its batches to them.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.rows_workers = config.num_workers

    def _split_table(self, split: str) -> Table:
        config = self.config
        if config.source == "embedded":
            return embedded_dataset(split), f"embedded [{split}]"
        if split == "eval" and config.eval_split is None and config.num_eval_images is None:
            raise DataError(
                f"no eval data for {config.source!r}: set eval_split (e.g. 'test') or num_eval_images to hold out"
            )
        return load_split(config, config.split if split == "train" or config.eval_split is None else config.eval_split)

    def dataset(self, split: str, seed: int = 0) -> ImageDataset:
        table, description = self._split_table(split)
        require_rows(table, description)
        return image_dataset(select_rows(table, split, self.config, description), description, self.config, split, seed)

    def train_loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True) -> DataLoader:
        return epoch_loader(self.dataset("train", seed), self.config, batch_size, shuffle, seed, drop_last, train=True)

    def rows(self, split: str, seed: int, rank: int, world: int) -> KeyedRows:
        dataset = self.dataset(split, seed)
        return KeyedRows(dataset, rank_share(len(dataset), rank, world))

    def source_table(self, split: str) -> datasets.Dataset:
        config = self.config
        table = embedded_dataset(split) if config.source == "embedded" else load_split(config, split)[0]
        return check_columns(table, config, f"{config.source} [{split}]")
