"""A "wds:PATTERN" source (see `sources.Source`): its training stream split by rank (vqgan.data.shards), its
eval rows (held out of it, or an eval pattern) read into memory, and its rows for tokenization."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import datasets
from torch.utils.data import IterableDataset, get_worker_info

from vqgan.data import shards
from vqgan.data.config import DataConfig
from vqgan.data.items import CollateImages, CollateKeyed, ShardItem
from vqgan.data.mapstyle import ImageDataset, stream_eval_dataset
from vqgan.data.ranks import process_state, rank_share
from vqgan.errors import DataError

logger = logging.getLogger(__name__)


def shard_layout(config: DataConfig) -> tuple[list[str], list[shards.Span], list[shards.Span]]:
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
        names, spans, _ = shard_layout(config)
        description = f"{config.source} [first {config.num_eval_images} held out]"
    else:
        raise DataError(f"no eval data for {config.source!r}: set eval_split (a 'wds:PATTERN' of eval shards) or "
                         f"num_eval_images to hold out")
    return names, spans, description


def shard_eval_table(config: DataConfig) -> tuple[datasets.Dataset, str]:
    """The eval rows of a "wds:" source in memory (`shard_eval_spans`): columns "image" and "label"?."""
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


def warn_if_source_order(config: DataConfig, names: list[str]) -> None:
    """Warn when the shard tool wrote these shards in the source's order (an image folder: class by class)."""
    record = shards.index_row_order(names, config.shard_index)
    if record is None or record["row_order"] == "shuffled":
        return  # no index (shards from another tool: their order is unknown), or written shuffled
    state = "in source order" if record["row_order"] == "source" else "by a shard tool that kept the source's order"
    logger.warning("%s: the shards were written %s; a worker reads a 1/(processes x workers) block of them, so "
                   "with class-ordered sources (an image folder) each batch holds a few classes (BatchNorm, k-means "
                   "initialisation and entropy terms see them too). Rewrite them shuffled: vqgan-make-shards SOURCE "
                   "OUT (rows in a seeded random order by default, recorded in index.json)", config.source, state)


class ShardRows(IterableDataset):
    """(row, item) of samples `rows` of `spans`, split again over DataLoader workers; row: in the whole selection."""

    def __init__(self, names: list[str], spans: list[shards.Span], rows: range, seed: int,
                 make_item: ShardItem) -> None:
        self.names, self.spans, self.rows, self.seed, self.make_item = names, spans, rows, seed, make_item

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        share = rank_share(len(self.rows), worker, workers)
        row = self.rows.start + share.start
        for span in shards.take(self.spans, row, len(share)):
            for index, key, members in shards.read_samples(self.names[span.shard], span.first, span.count):
                name = f"{self.names[span.shard]}:{key}"
                yield row, self.make_item(members, name, shards.seed_of(self.seed, 0, span.shard, index))
                row += 1


class ShardSource:
    """WebDataset tar shards ("wds:PATTERN"): see `sources.Source` and vqgan.data.shards."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.rows_workers = config.num_workers

    def dataset(self, split: str, seed: int = 0) -> ImageDataset:
        return stream_eval_dataset(self.config, split, seed, shard_eval_table, "a stream of shards")

    def train_loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True) -> shards.StreamLoader:
        """This process's training stream (rank and world from Accelerate's state); its batches are all whole."""
        config, state = self.config, process_state()
        names, _, train = shard_layout(config)
        stream = shards.ShardStream(
            names, train, rank=state.process_index, world=state.num_processes, batch_size=batch_size,
            workers=config.num_workers, seed=seed, shuffle=shuffle, shuffle_buffer=config.shuffle_buffer,
            interleave=config.shard_interleave, make_item=ShardItem.of(config, "train"),
            collate=CollateKeyed(CollateImages(config.image_size, config.label_column is not None)),
        )
        layout = stream.layout
        if layout.batches == 0:
            raise DataError(f"{config.source}: {layout.total} training samples make no batch of {batch_size} on each "
                            f"of {layout.world} processes")
        if layout.left_out and state.is_main_process:
            logger.warning("%s: %d of %d samples per epoch are left out so that each of %d processes gets %d whole "
                           "batches of %d (which ones changes with each epoch's shard order)", config.source,
                           layout.left_out, layout.total, layout.world, layout.batches, batch_size)
        if state.is_main_process:
            warn_if_source_order(config, names)
        return shards.StreamLoader(stream, config.num_workers, device=state.device,
                                   pin_memory=state.device.type == "cuda")

    def rows(self, split: str, seed: int, rank: int, world: int) -> ShardRows:
        if split == "eval":  # the very rows training evaluates on
            names, spans, _ = shard_eval_spans(self.config)
        else:
            names, _, spans = shard_layout(self.config)
        total = sum(span.count for span in spans)
        return ShardRows(names, spans, rank_share(total, rank, world), seed, ShardItem.of(self.config, split))

    def source_table(self, split: str) -> datasets.Dataset:
        raise DataError(f"{self.config.source} is shards already: vqgan-make-shards reads embedded, a local image "
                        f"folder or a hub dataset")
