"""Items and batches: one sample -> {"image": (3, S, S) in [-1, 1], "label"?, "key"?} or a `BadItem` that names
it; `CollateImages` stacks the good ones and counts the bad ones, so a corrupt file costs one item, not a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vqgan.data import shards
from vqgan.data.decode import crop_pixels, decode_image, resized_pixels

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BadItem:
    """What the dataset returns in place of an image it could not read; the collate function drops it."""

    name: str  # the file path, or "<source> [<split>] row <i>" for images stored inside a dataset
    error: str


_warned: set[str] = set()  # per process: each worker warns about a bad file once


def unreadable(name: str, error: str, what: str = "sample") -> BadItem:
    """The BadItem for `name`, warned about once per process."""
    if name not in _warned:
        _warned.add(name)
        logger.warning("skipping unreadable %s %s: %s", what, name, error)
    return BadItem(name, error)


def keyed_item(pixels: torch.Tensor, name: str, seed: int, label: int | None, image_size: int, random_crop: bool,
               hflip: bool) -> dict[str, Any]:
    """A stream's item: the crop of `pixels` drawn from `seed`, its label and its name as "key"."""
    item = {"image": crop_pixels(pixels, image_size, random_crop, hflip, np.random.default_rng(seed)), "key": name}
    if label is not None:
        item["label"] = label
    return item


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
            return unreadable(name, f"no {self.image_key!r} member (the sample has {sorted(members)})")
        try:
            draft = self.resize if self.jpeg_draft else None
            pixels = resized_pixels(decode_image({"bytes": data}, draft), self.image_size, self.resize)
            label = None
            if self.label_key is not None:
                if self.label_key not in members:
                    return unreadable(name, f"no label member {self.label_key!r} (the sample has {sorted(members)})")
                label = shards.parse_label(members[self.label_key])
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...; a label may not be an int
            return unreadable(name, f"{type(err).__name__}: {err}")
        return keyed_item(pixels, name, seed, label, self.image_size, self.random_crop, self.hflip)


@dataclass(frozen=True)
class RowItem:
    """A streamed row -> {"image", "label"?, "key"} or a BadItem naming it."""

    image_size: int
    resize: int | None
    random_crop: bool
    hflip: bool
    image_column: str
    label_column: str | None
    jpeg_draft: bool = True

    def __call__(self, row: dict[str, Any], name: str, seed: int) -> dict[str, Any] | BadItem:
        cell = row[self.image_column]
        if cell.get("bytes") is None and cell.get("path"):
            name = cell["path"]
        try:
            pixels = resized_pixels(decode_image(cell, self.resize if self.jpeg_draft else None), self.image_size,
                                    self.resize)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
            return unreadable(name, f"{type(err).__name__}: {err}")
        label = int(row[self.label_column]) if self.label_column is not None else None
        return keyed_item(pixels, name, seed, label, self.image_size, self.random_crop, self.hflip)


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



@dataclass(frozen=True)
class CollateKeyed:
    """CollateImages plus batch["keys"]: the names (shard:key) of the samples kept, in batch order."""

    inner: CollateImages

    def __call__(self, items: list[dict[str, Any] | BadItem]) -> dict[str, Any]:
        batch = self.inner(items)
        batch["keys"] = [item["key"] for item in items if not isinstance(item, BadItem)]
        return batch
