"""Streamed hub datasets (`data.streaming: true`): rows read as they arrive, never downloaded whole first.

A `datasets.IterableDataset` (`load_dataset(..., streaming=True)`) is split over processes with
`split_dataset_by_node` and shuffled with a (seed, epoch)-seeded shard order and buffer, so epoch e's
rows on process r are a pure function of (seed, e, r). Its length is not known without reading it,
and its ranks may hold a few rows more or less than each other, so the stream is endless: each
process moves to its next epoch when its own rows run out (a last partial batch is left out,
counted and logged), and no process ever waits for a batch another does not have.

Held-out eval rows and `max_images` are rows of the WHOLE stream (the first num_eval_images, the next
max_images), whatever the number of processes: `process_rows` then splits by example (process r of W
keeps rows r, r + W, ... of the stream left), because datasets' split by files, its choice when the
file count divides W, would apply a skip or take to each process's own files (W different eval sets).

Resume is exact without the buffer contents that `IterableDataset.state_dict()` cannot save: each
process's position is (epoch, whole batches drawn in it), kept in the checkpoint's train state
(`TrainState.stream_positions`, one per process). A resumed process rebuilds epoch e's order and
skips the rows already drawn, raw (images are decoded after the skip, in a thread pool here, so
DataLoader workers, which `datasets` would hand shards of their own, never change the order).

Batches are read and decoded by a prefetch thread, up to `prefetch` ahead of the training loop, so the
loop's thread does not wait on the stream; the position counts the batches the loop has taken, not those
made ahead, and an error in the thread is raised in the loop.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generator, Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from vqgan.data.config import DataConfig
from vqgan.data.items import CollateImages, CollateKeyed, RowItem
from vqgan.data.mapstyle import ImageDataset, stream_eval_dataset
from vqgan.data.ranks import process_state
from vqgan.data.shards import seed_of, to_device
from vqgan.data.tables import load_dataset_args
from vqgan.errors import DataError

logger = logging.getLogger(__name__)

# Batches the prefetch thread makes ahead of the training loop: enough to hide a slow read or decode,
# few enough that the decoded images held stay small (B x 3 x S x S floats each).
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class StreamRows:
    """Which rows of the whole stream of `split` make a run's train or eval data: [skip, skip + limit)."""

    split: str
    skip: int
    limit: int | None


def stream_rows(config: DataConfig, split: str) -> StreamRows:
    """The rows of the train or eval data of a streamed source; training and tokenization both use these."""
    held_out = config.num_eval_images if config.eval_split is None and config.num_eval_images else 0
    if split == "train":
        return StreamRows(config.split, held_out, config.max_images)
    if config.eval_split is None and config.num_eval_images is None:
        raise DataError(f"no eval data for {config.source!r}: set eval_split (e.g. 'test') or num_eval_images to "
                        f"hold out")
    return StreamRows(config.eval_split or config.split, 0, config.num_eval_images)


def process_rows(stream: datasets.IterableDataset, rows: StreamRows, *, rank: int, world: int,
                 shuffle_seed: int | None = None, shuffle_buffer: int = 1) -> datasets.IterableDataset:
    """Process `rank`'s share of rows [skip, skip + limit) of `stream`, shuffled if a seed is given.

    With a skip or a limit the split is by example (every process reads the stream, keeps every W-th
    row), so the rows skipped and taken are the same rows of the whole stream on every process.
    """
    if rows.skip:
        stream = stream.skip(rows.skip)  # the held-out eval rows come first
    if rows.limit is not None:
        stream = stream.take(rows.limit)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)  # shard order and buffer: seed + epoch
    if world == 1:
        return stream
    # NOTE: not "auto": with a file count that divides W it splits by files, and a skip/take created before
    # the split (split_when_sharding=True) would then skip and take per process, not of the whole stream.
    strategy = "examples" if rows.skip or rows.limit is not None else "auto"
    return split_dataset_by_node(stream, rank=rank, world_size=world, strategy=strategy)


def open_stream(config: DataConfig, split: str) -> tuple[datasets.IterableDataset, str]:
    """One split of `config.source` as an IterableDataset of {"image": {"bytes", "path"}, "label"?} rows."""
    args, kwargs = load_dataset_args(config)
    try:
        stream = datasets.load_dataset(*args, split=split, streaming=True, cache_dir=config.cache_dir, **kwargs)
    except Exception as err:
        raise DataError(f"could not stream split {split!r} of {config.source!r}: {type(err).__name__}: {err}") from err
    description = f"{config.source} [{split}, streamed]"
    columns = [config.image_column] + ([config.label_column] if config.label_column else [])
    names = stream.column_names or list(stream.features or {})
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{description} has no column {missing[0]!r}; its columns are {names}")
    stream = stream.select_columns(columns)
    stream = stream.cast_column(config.image_column, datasets.Image(decode=False))  # decoded by us: bad files skip
    return stream, description


def eval_rows(config: DataConfig) -> tuple[datasets.Dataset, str]:
    """The eval rows of a streamed source in memory: the first num_eval_images of eval_split or held out of split."""
    chosen = stream_rows(config, "eval")
    stream, description = open_stream(config, chosen.split)
    rows = list(process_rows(stream, chosen, rank=0, world=1))  # every process holds the whole eval set
    if not rows:
        raise DataError(f"{description} has no images")
    columns = {"image": [row[config.image_column] for row in rows]}
    features = {"image": datasets.Image(decode=False)}
    if config.label_column:
        columns["label"] = [int(row[config.label_column]) for row in rows]
        features["label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), description


class HubStream:
    """Endless batches of one process's share of a streamed dataset; `position` = [epoch, batches in it]."""

    def __init__(self, stream: datasets.IterableDataset, description: str, *, rank: int, world: int,
                 batch_size: int, seed: int, shuffle: bool, shuffle_buffer: int, rows: StreamRows,
                 make_item: RowItem, collate, threads: int, device: torch.device | str = "cpu",
                 prefetch: int = PREFETCH_BATCHES) -> None:
        self.stream = process_rows(stream, rows, rank=rank, world=world, shuffle_seed=seed if shuffle else None,
                                   shuffle_buffer=shuffle_buffer)
        # What the saved positions count in: a resume under other values would land on other rows.
        self.resume_layout = {"processes": world, "batch_size": batch_size, "shuffle": shuffle,
                              "shuffle_buffer": shuffle_buffer if shuffle else 1, "skip_rows": rows.skip,
                              "max_rows": rows.limit}
        self.description, self.rank, self.world = description, rank, world
        self.batch_size, self.seed, self.make_item, self.collate = batch_size, seed, make_item, collate
        self.threads, self.device, self.prefetch = max(1, threads), torch.device(device), prefetch
        self.position = [0, 0]
        self.left_out = 0  # rows of finished epochs that made no whole batch, this process

    def seek(self, epoch: int, batches: int) -> None:
        self.position = [int(epoch), int(batches)]

    def _rows(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(epoch)
        # NOTE: not IterableDataset.skip(): it applies before the split by node (the split happens at
        # iteration), so it would skip rows of every process. The rows skipped here are not decoded.
        return itertools.islice(iter(self.stream), skip, None)

    def _batches(self, position: list[int], left_out: int) -> Iterator[tuple[dict[str, Any], list[int], int]]:
        """(batch, position after it, rows left out so far) from `position` on: the prefetch thread's work."""
        with ThreadPoolExecutor(self.threads) as pool:
            while True:
                epoch, done = position
                rows = self._rows(epoch, done * self.batch_size)
                index = done * self.batch_size  # of the row in this process's epoch
                while len(chunk := list(itertools.islice(rows, self.batch_size))) == self.batch_size:
                    seeds = [seed_of(self.seed, epoch, self.rank, index + i) for i in range(len(chunk))]
                    names = [f"{self.description} rank {self.rank} epoch {epoch} row {index + i}" for i in range(len(chunk))]
                    items = list(pool.map(self.make_item, chunk, names, seeds))
                    index += len(chunk)
                    position = [epoch, position[1] + 1]
                    yield self.collate(items), position, left_out
                if position[1] == 0:
                    raise DataError(f"{self.description} gave process {self.rank} only {len(chunk)} rows in epoch "
                                    f"{epoch}, fewer than batch_size={self.batch_size}")
                left_out += len(chunk)
                position = [epoch + 1, 0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch, position, left_out in prefetched(self._batches(list(self.position), self.left_out), self.prefetch):
            if left_out > self.left_out:  # logged here, when the loop reaches the epoch's end, not when read ahead
                rows, epoch = left_out - self.left_out, position[0] - 1
                log = logger.warning if self.left_out == 0 else logger.info  # warned once, then noted
                log("%s: process %d left out the last %d rows of epoch %d (fewer than batch_size=%d; "
                    "%d left out so far)", self.description, self.rank, rows, epoch, self.batch_size, left_out)
            self.position, self.left_out = position, left_out
            yield to_device(batch, self.device)


def prefetched(items: Generator[Any, None, None], depth: int) -> Iterator[Any]:
    """The items of `items`, made by a thread up to `depth` ahead; its error is raised here, and it stops
    (closing `items`) when this iterator is closed or dropped."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue  # the loop is busy: look at `stop` again
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, who raises it
            put((None, err))
        finally:
            items.close()  # the generator's own cleanup (thread pool, open stream) runs in its thread

    thread = threading.Thread(target=produce, name="vqgan-stream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)  # NOTE: the thread ends at its next put; a batch being made is finished first


class StreamedRows(IterableDataset):
    """A streamed source's rows for one process (`process_rows`), keyed by their row in the whole stream.

    Decoded in a thread pool here, not in DataLoader workers: datasets would hand each worker files of its
    own, and a skip or take would then apply per worker (see the module notes).
    """

    def __init__(self, config: DataConfig, split: str, seed: int, rank: int, world: int) -> None:
        rows = stream_rows(config, split)  # the very rows training holds out (eval) or trains on
        stream, self.description = open_stream(config, rows.split)
        self.stream = process_rows(stream, rows, rank=rank, world=world)
        # Split by example (a hold-out or a cap), process r holds rows r, r + W, ...: the key is the row in the
        # whole stream. Split by files (datasets' choice when their count divides W) it is only unique, and
        # the token order then depends on the number of processes.
        self.by_example = world > 1 and (rows.skip > 0 or rows.limit is not None)
        self.rank, self.world, self.seed, self.threads = rank, world, seed, max(1, config.num_workers)
        self.make_item = RowItem.of(config, split)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        rows = iter(self.stream)
        with ThreadPoolExecutor(self.threads) as pool:
            i = 0
            while chunk := list(itertools.islice(rows, 8 * self.threads)):
                keys = [(i + j) * self.world + self.rank for j in range(len(chunk))]
                global_rows = self.by_example or self.world == 1
                names = [f"{self.description} row {k}" if global_rows
                         else f"{self.description} rank {self.rank} row {i + j}" for j, k in enumerate(keys)]
                yield from zip(keys, pool.map(self.make_item, chunk, names, [seed_of(self.seed, k) for k in keys]))
                i += len(chunk)


class StreamSource:
    """A hub dataset (or local parquet / image folder) read as a stream (`data.streaming: true`): see
    `sources.Source`. Its rows decode in threads of their own, so tokenization runs no DataLoader workers."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.rows_workers = 0

    def dataset(self, split: str, seed: int = 0) -> ImageDataset:
        return stream_eval_dataset(self.config, split, seed, eval_rows, "streamed")

    def train_loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = True) -> HubStream:
        """This process's endless training stream (rank, world from Accelerate's state); its batches are all whole."""
        config, state = self.config, process_state()
        rows = stream_rows(config, "train")
        stream, description = open_stream(config, rows.split)
        collate = CollateKeyed(CollateImages(config.image_size, config.label_column is not None))
        return HubStream(stream, description, rank=state.process_index, world=state.num_processes,
                         batch_size=batch_size, seed=seed, shuffle=shuffle, shuffle_buffer=config.shuffle_buffer,
                         rows=rows, make_item=RowItem.of(config, "train"), collate=collate,
                         threads=config.num_workers, device=state.device)

    def rows(self, split: str, seed: int, rank: int, world: int) -> StreamedRows:
        return StreamedRows(self.config, split, seed, rank, world)

    def source_table(self, split: str) -> datasets.Dataset:
        raise DataError(f"{self.config.source} is streamed: vqgan-make-shards reads the source without streaming")
