"""One interface over every source kind, and the one place that picks the kind: `source_of(config)`.

Training (`build_dataloader`), evaluation (`build_dataset(config, "eval")`), tokenization
(vqgan.prior.tokenize) and the shard tool (vqgan-make-shards) all ask a `Source` the same questions, so
which rows a split holds, which process reads which of them and how an item is decoded live in one
place per kind, and the split by rank in one function (vqgan.data.ranks.rank_share).
"""

from __future__ import annotations

from typing import Any, Protocol

import datasets
from torch.utils.data import DataLoader, Dataset

from vqgan.data import shards
from vqgan.data.config import SPLITS, DataConfig
from vqgan.data.mapstyle import ImageDataset, MapSource, epoch_loader
from vqgan.data.shard_source import ShardSource
from vqgan.data.streaming import StreamSource


class Source(Protocol):
    """A data source kind: the embedded photos / a hub dataset / a folder (MapSource), "wds:" shards
    (ShardSource) or a streamed hub dataset (StreamSource)."""

    config: DataConfig
    # DataLoader workers to read `rows` with (a stream decodes in threads of its own: 0).
    rows_workers: int

    def train_loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True) -> Any:
        """Training batches {"images", "labels"?, "num_skipped", "skipped", "keys"?}, positioned by (epoch, start):
        a DataLoader (`set_epoch` + skip; `accelerator.prepare` deals its batches to the processes), a
        shards.StreamLoader (`iterate(epoch, start)`) or a streaming.HubStream (`seek(epoch, batches)`); the two
        streams read this process's share themselves and yield whole batches only (drop_last is the DataLoader's)."""

    def dataset(self, split: str, seed: int = 0) -> ImageDataset:
        """The eval table ("eval": centre crops, every process all of it), or a map-style source's "train" rows."""

    def rows(self, split: str, seed: int, rank: int, world: int) -> Dataset:
        """Process `rank` of `world`'s (key, item) pairs of `split`, for tokenization: over all processes every
        row once; the key is the row's place in the split, so readers can put them in one order."""

    def source_table(self, split: str) -> datasets.Dataset:
        """The whole split, image cells undecoded ({"bytes", "path"}): what vqgan-make-shards writes out."""


def source_of(config: DataConfig) -> Source:
    """The Source of `config.source`: "wds:" shards, a streamed hub dataset, or a table."""
    if shards.is_shard_source(config.source):
        return ShardSource(config)
    if config.streaming:
        return StreamSource(config)
    return MapSource(config)


def build_dataset(config: DataConfig, split: str = "train", seed: int = 0) -> ImageDataset:
    """The "train" (random crops, flips) or "eval" (centre crops) dataset of `config`; checks it at start.

    A "wds:" or streamed source gives its eval split here (held-out samples or an eval pattern, read into
    memory); its training split is a stream (`build_dataloader`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return source_of(config).dataset(split, seed)


def build_dataloader(
    config: DataConfig,
    split: str = "train",
    batch_size: int = 8,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
) -> Any:
    """Loader of {"images": (B', 3, S, S) in [-1, 1], "labels": (B',) long, "num_skipped": int, ...} batches.

    B' <= batch_size: unreadable files are dropped (named in batch["skipped"], counted in batch["num_skipped"];
    sum it over the run to report). shuffle and drop_last default to True for "train", False for "eval".
    Call `loader.batch_sampler.sampler.set_epoch(epoch)` (or accelerate's `loader.set_epoch`) when resuming.
    """
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if train:
        return source_of(config).train_loader(batch_size, shuffle, seed, drop_last)
    return epoch_loader(build_dataset(config, split, seed=seed), config, batch_size, shuffle, seed, drop_last,
                        train=False)
