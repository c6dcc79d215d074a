"""Items and batches: one sample -> {"image": (3, S, S) in [-1, 1], "label"?, "key"?} or a `BadItem` that names
it; `CollateImages` stacks the good ones and counts the bad ones, so a corrupt file costs one item, not a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vqgan.data import shards
from vqgan.data.config import DataConfig
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


@dataclass(frozen=True)
class StreamItem:
    """How a stream's sample becomes an item: decoded, resized, cropped with the sample's seed (picklable).

    image_field / label_field: the shard member extensions (ShardItem) or the row's columns (RowItem).
    """

    image_size: int
    resize: int | None
    random_crop: bool
    hflip: bool
    image_field: str
    label_field: str | None
    jpeg_draft: bool = True

    @classmethod
    def of(cls, config: DataConfig, split: str) -> StreamItem:
        """The items of `split`: "train" random crops and flips as configured, "eval" centre crops."""
        train = split == "train"
        return cls(config.image_size, config.resize, config.random_crop and train, config.hflip and train,
                   config.image_column, config.label_column, config.jpeg_draft)

    def pixels(self, cell: dict[str, Any]) -> torch.Tensor:
        """(3, H', W') uint8, the shorter side resized; raises on a file PIL cannot read."""
        draft = self.resize if self.jpeg_draft else None
        return resized_pixels(decode_image(cell, draft), self.image_size, self.resize)

    def item(self, pixels: torch.Tensor, name: str, seed: int, label: int | None) -> dict[str, Any]:
        """{"image": the crop drawn from `seed`, "key": name, "label"?}."""
        crop = crop_pixels(pixels, self.image_size, self.random_crop, self.hflip, np.random.default_rng(seed))
        return {"image": crop, "key": name, **({"label": label} if label is not None else {})}


class ShardItem(StreamItem):
    """A shard sample's members -> {"image", "label"?, "key"} or a BadItem naming it."""

    def __call__(self, members: dict[str, bytes], name: str, seed: int) -> dict[str, Any] | BadItem:
        data = shards.image_member(members, self.image_field)
        if data is None:
            return unreadable(name, f"no {self.image_field!r} member (the sample has {sorted(members)})")
        try:
            pixels = self.pixels({"bytes": data})
            label = None
            if self.label_field is not None:
                if self.label_field not in members:
                    return unreadable(name, f"no label member {self.label_field!r} (the sample has {sorted(members)})")
                label = shards.parse_label(members[self.label_field])
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...; a label may not be an int
            return unreadable(name, f"{type(err).__name__}: {err}")
        return self.item(pixels, name, seed, label)


class RowItem(StreamItem):
    """A streamed row -> {"image", "label"?, "key"} or a BadItem naming it."""

    def __call__(self, row: dict[str, Any], name: str, seed: int) -> dict[str, Any] | BadItem:
        cell = row[self.image_field]
        if cell.get("bytes") is None and cell.get("path"):
            name = cell["path"]
        try:
            pixels = self.pixels(cell)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
            return unreadable(name, f"{type(err).__name__}: {err}")
        return self.item(pixels, name, seed, int(row[self.label_field]) if self.label_field is not None else None)


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
