"""WebDataset tar shards (`data.source: "wds:PATTERN"`), split across processes and workers, resumed exactly.

A shard is a tar whose members are grouped into samples by key (`000042.jpg`, `000042.cls`: one
sample, webdataset's convention). We read them with webdataset's URL opener (local paths, http(s),
`pipe:` commands) but split and shuffle with our own deterministic scheme instead of webdataset's
pipeline, because its shuffles draw from stateful RNGs that no checkpoint holds, and Accelerate's
`IterableDatasetShard` reads every sample on every process.

The scheme: the number of samples of every shard is known at start (the `index.json` the shard tool
writes, or a header scan of local shards). Epoch e's sample sequence is the shards in a (seed, e)
order, concatenated. Process r of W takes the contiguous range [r*n, (r+1)*n) with n = N // W
(`ranks.rank_share`; the N % W left over are counted and reported, never silently lost: they differ
epoch to epoch because the shard order does). Its n samples make n // B batches; DataLoader worker
slot j % num_workers makes batch j from one contiguous block of the range. The slot deals the block's shards (spans) to
`interleave` lanes, reads the lanes at once and merges them in a random order (webdataset's RandomMix
over shard streams), then passes the merged samples through a shuffle buffer; both are seeded by
(seed, epoch, rank, slot). A batch is therefore a pure function of (seed, epoch, rank, batch index),
like the map-style sampler's, and a resumed run restarts each slot at its batch in the epoch: the
slot rereads the raw bytes of its block up to there (no decoding), never whole epochs.

The buffer and the lanes mix what a slot reads; they cannot mix classes that the slot never reads: a
slot holds 1 / (W * workers) of the data, so shards written in class order (an image folder's order)
give batches of few classes. `vqgan-make-shards` therefore writes rows in a seeded random order and
records it in index.json (`row_order`); a run on shards in source order warns at start.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqgan.data.ranks import rank_share
from vqgan.errors import DataError

PREFIX = "wds:"
INDEX_FILE = "index.json"
# Member extensions taken as the image when data.image_column is left at "image" (webdataset names).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")

# The interleaving rng's own seed part, apart from the shuffle buffer's (seed, epoch, rank, slot).
INTERLEAVE_STREAM = 1

logger = logging.getLogger(__name__)


def is_shard_source(source: str) -> bool:
    return source.startswith(PREFIX)


def _is_url(name: str) -> bool:
    return "://" in name or name.startswith("pipe:")


@dataclass(frozen=True)
class Span:
    """Samples [first, first + count) of shard number `shard` (its place in the sorted shard list)."""

    shard: int
    first: int
    count: int


# ----------------------------------------------------------------------------- finding and counting shards


def expand_pattern(source: str) -> list[str]:
    """"wds:PATTERN" -> the shard names: braces expanded ({000..099}), local globs resolved, sorted, checked."""
    pattern = source[len(PREFIX):] if is_shard_source(source) else source
    if not pattern:
        raise DataError("data.source 'wds:' names no shards: give a pattern, e.g. wds:/data/train-{0000..0099}.tar")
    names: list[str] = []
    missing: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if _is_url(part):
            names.append(part)
            continue
        path = str(Path(part).expanduser())
        found = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if Path(path).is_file() else [])
        if not found:
            missing.append(part)
        names.extend(found)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"data.source {source!r}: {len(missing)} shard(s) of the pattern do not exist: {shown}")
    if not names:
        raise FileNotFoundError(f"data.source {source!r} matches no shard")
    return sorted(dict.fromkeys(names))


def shard_file_name(name: str) -> str:
    """The shard's file name, as index.json lists it: "pipe:aws s3 cp s3://b/train-0000.tar -" -> "train-0000.tar"."""
    if name.startswith("pipe:"):
        found = re.findall(r"[^/\s]+\.tar\b", name)  # the last .tar named in the command
        return found[-1] if found else name
    return name.rsplit("/", 1)[-1]


def _index_location(names: list[str], index: str | None) -> str | None:
    if index:
        return index
    first = names[0]
    if first.startswith("pipe:"):
        return None  # a command, not a place: nothing can be "beside" it (data.shard_index names the index)
    if _is_url(first):
        return first.rsplit("/", 1)[0] + "/" + INDEX_FILE
    candidate = Path(first).parent / INDEX_FILE
    return str(candidate) if candidate.is_file() else None


def _index_json(location: str) -> dict[str, Any]:
    from webdataset.gopen import gopen

    try:
        with gopen(location) as stream:
            return json.loads(stream.read())
    except Exception as err:
        raise FileNotFoundError(f"could not read the shard index {location}: {type(err).__name__}: {err}") from err


def read_index(location: str) -> dict[str, int]:
    """{shard file name: sample count} from an index.json written by the shard tool (a path or a URL)."""
    data = _index_json(location)
    try:
        return {Path(entry["name"]).name: int(entry["count"]) for entry in data["shards"]}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{location} is not a shard index (expected {{'shards': [{{'name', 'count'}}, ...]}})") from err


def index_row_order(names: list[str], index: str | None = None) -> dict[str, Any] | None:
    """The shard tool's record of the rows' order ({"row_order", "shuffle_seed"}; row_order None: an index
    from before the record) from the shard set's index.json; None when there is no index to read."""
    location = _index_location(names, index)
    if location is None:
        return None
    try:
        data = _index_json(location)
    except FileNotFoundError:  # read_index, which runs first, has already said what is wrong with it
        return None
    return {"row_order": data.get("row_order"), "shuffle_seed": data.get("shuffle_seed")}


def sample_key(member: str) -> tuple[str, str] | None:
    """"dir/000042.seg.png" -> ("dir/000042", "seg.png"): webdataset's key = the name up to its first dot."""
    folder, _, base = member.rpartition("/")
    if "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def count_samples(path: str) -> int:
    """Samples in a local shard from its tar headers alone (tarfile seeks over the data)."""
    keys, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                parsed = sample_key(info.name) if info.isreg() else None
                if parsed is not None and parsed[0] != last:
                    keys, last = keys + 1, parsed[0]
            end = tar.offset  # the end of the last member's data
    except (tarfile.TarError, OSError, EOFError) as err:
        raise RuntimeError(f"shard {path} is not a readable tar file: {type(err).__name__}: {err}") from err
    # NOTE: tarfile takes a cut-off header for the end of the archive; a whole tar ends in two zero blocks.
    if Path(path).stat().st_size - end < 2 * tarfile.BLOCKSIZE:
        raise RuntimeError(f"shard {path} is truncated after its sample {keys - 1} ({last}): it lacks the tar's "
                           f"end-of-archive blocks; rewrite it")
    return keys


def shard_counts(names: list[str], index: str | None = None) -> list[int]:
    """Sample count of each shard: from the index (if any), else counted from the headers of local shards."""
    location = _index_location(names, index)
    known = read_index(location) if location else {}
    counts = []
    for name in names:
        base = shard_file_name(name)
        if base in known:
            counts.append(known[base])
        elif name.startswith("pipe:") and not location:
            raise DataError(f"shard {name} is read by a command: set data.shard_index to the index.json with the "
                            f"shards' sample counts (vqgan-make-shards writes one; a path, URL or pipe: command)")
        elif _is_url(name):
            raise FileNotFoundError(
                f"shard {name} is not in an index ({location or 'none found'}): remote shards need an index.json "
                f"with their sample counts beside them (vqgan-make-shards writes one) or data.shard_index"
            )
        else:
            counts.append(count_samples(name))
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise DataError(f"{len(empty)} shard(s) hold no samples: {empty[:5]}")
    return counts


# ----------------------------------------------------------------------------- reading samples


def read_samples(name: str, first: int, count: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index in shard, key, {extension: bytes}) of samples [first, first + count) of one shard, streamed.

    The samples before `first` are read past without keeping their bytes. A shard that ends early, or a
    tar that breaks mid-way, is an error naming the shard and the sample: the split would be wrong.
    """
    from webdataset.gopen import gopen

    index, key, members = -1, None, {}
    end = first + count
    try:
        stream = gopen(name)
    except Exception as err:
        raise FileNotFoundError(f"cannot open shard {name}: {type(err).__name__}: {err}") from err
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                parsed = sample_key(info.name) if info.isreg() else None
                if parsed is None:
                    continue
                if parsed[0] != key:
                    if index >= first and key is not None:
                        yield index, key, members
                    index, key, members = index + 1, parsed[0], {}
                    if index >= end:
                        return
                if index >= first:
                    members[parsed[1]] = tar.extractfile(info).read()
                tar.members = []  # a streamed tar otherwise keeps every header of the shard
    except (tarfile.TarError, OSError, EOFError) as err:
        if key is None:  # nothing came out of it: a failed download or command, or not a tar at all
            raise RuntimeError(f"cannot read shard {name}: {type(err).__name__}: {err}") from err
        raise RuntimeError(f"shard {name} is corrupt near sample {index} ({key}): {type(err).__name__}: {err}; "
                           f"rewrite it (vqgan-make-shards verifies every shard it writes)") from err
    if key is not None and first <= index < end:
        yield index, key, members
        index += 1
    if index < end:
        raise RuntimeError(f"shard {name} holds {max(index, 0)} samples, but the index counts {end} or more: "
                           f"the shard or its index.json is stale; rebuild the index")


def shuffled(items: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: each new item swaps out a random held one; a pure function of the rng's seed."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def deal(spans: list[Span], lanes: int) -> list[list[Span]]:
    """Spans dealt to `lanes` readers, span i to lane i % lanes (webdataset's split of a shard list by worker)."""
    return [spans[lane::lanes] for lane in range(min(lanes, len(spans)))]


def interleaved(sources: list[Iterator[Any]], counts: list[int], rng: np.random.Generator) -> Iterator[Any]:
    """The items of `sources` (holding `counts` items) merged in a random order: each next item comes from a
    source drawn with probability proportional to what it has left, so every merge is equally likely and
    the sources run out together; a pure function of the rng's seed (webdataset's RandomMix, weighted)."""
    left = np.array(counts, dtype=np.int64)
    for _ in range(int(left.sum())):
        lane = int(np.searchsorted(np.cumsum(left), rng.integers(left.sum()), side="right"))
        left[lane] -= 1
        yield next(sources[lane])


# ----------------------------------------------------------------------------- the split of an epoch


def take(spans: list[Span], start: int, count: int) -> list[Span]:
    """The spans covering samples [start, start + count) of the concatenation of `spans`."""
    out, offset = [], 0
    for span in spans:
        lo, hi = max(start, offset), min(start + count, offset + span.count)
        if lo < hi:
            out.append(Span(span.shard, span.first + lo - offset, hi - lo))
        offset += span.count
        if offset >= start + count:
            break
    return out


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0])


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch of `total` samples splits over `world` processes, batches of `batch_size`, `workers` slots."""

    total: int
    world: int
    batch_size: int
    workers: int

    def rank_samples(self, rank: int) -> range:
        """Process `rank`'s samples of the epoch sequence: the same number on every process (they step together)."""
        return rank_share(self.total, rank, self.world, equal=True)

    @property
    def per_rank(self) -> int:
        return len(self.rank_samples(0))

    @property
    def batches(self) -> int:  # per process per epoch
        return self.per_rank // self.batch_size

    @property
    def left_out(self) -> int:
        """Samples of each epoch that no process uses (the uneven tails), over all processes."""
        return self.total - self.world * self.batches * self.batch_size

    def slot_batches(self, slot: int) -> int:
        """Batches made by worker slot `slot`: batch j goes to slot j % workers."""
        return len(range(slot, self.batches, self.workers))

    def slot_range(self, rank: int, slot: int) -> tuple[int, int]:
        """(start, count) in the epoch sequence of the samples slot `slot` of process `rank` reads."""
        before = sum(self.slot_batches(s) for s in range(slot)) * self.batch_size
        return self.rank_samples(rank).start + before, self.slot_batches(slot) * self.batch_size


# ----------------------------------------------------------------------------- the dataset


class ShardStream(IterableDataset):
    """One process's batches of an epoch of shards: {"images", "labels"?, "num_skipped", "skipped", "keys"}.

    Set `epoch` and `start` (the batch to begin at) before each iteration; `len()` is the batches per epoch.
    """

    def __init__(self, names: list[str], spans: list[Span], *, rank: int, world: int, batch_size: int,
                 workers: int, seed: int, shuffle: bool, shuffle_buffer: int, interleave: int, make_item,
                 collate) -> None:
        self.names, self.spans = names, spans
        self.rank, self.seed, self.shuffle, self.shuffle_buffer = rank, seed, shuffle, shuffle_buffer
        self.interleave = interleave if shuffle else 1  # unshuffled: the shards' own order, one after another
        self.layout = EpochLayout(sum(s.count for s in spans), world, batch_size, max(1, workers))
        self.make_item, self.collate = make_item, collate
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.layout.batches

    def epoch_spans(self, epoch: int) -> list[Span]:
        if not self.shuffle:
            return self.spans
        order = np.random.default_rng(seed_of(self.seed, epoch)).permutation(len(self.spans))
        return [self.spans[i] for i in order]

    def slot_records(self, epoch: int, slot: int, read: Callable[[Span], Iterator[Any]]) -> Iterator[Any]:
        """The records of worker slot `slot` in epoch `epoch`, in the order its batches take them.

        `read(span)` gives a span's records (its samples, or in benchmarks/data.py their row numbers alone).
        """
        begin, count = self.layout.slot_range(self.rank, slot)
        spans = take(self.epoch_spans(epoch), begin, count)
        if self.interleave > 1:
            lanes = deal(spans, self.interleave)
            sources = [itertools.chain.from_iterable(read(span) for span in lane) for lane in lanes]
            rng = np.random.default_rng(seed_of(self.seed, epoch, self.rank, slot, INTERLEAVE_STREAM))
            records = interleaved(sources, [sum(span.count for span in lane) for lane in lanes], rng)
        else:
            records = itertools.chain.from_iterable(read(span) for span in spans)
        if self.shuffle and self.shuffle_buffer > 1:
            records = shuffled(records, self.shuffle_buffer, np.random.default_rng(seed_of(self.seed, epoch, self.rank, slot)))
        return records

    def _read(self, span: Span) -> Iterator[tuple[int, int, str, dict[str, bytes]]]:
        for index, key, members in read_samples(self.names[span.shard], span.first, span.count):
            yield span.shard, index, key, members

    def slot_batches(self, epoch: int, slot: int, start_batch: int) -> Iterator[dict[str, Any]]:
        """Batches start_batch, ... of worker slot `slot` in epoch `epoch`."""
        skip = start_batch * self.layout.batch_size
        batch: list[Any] = []
        for position, (shard, index, key, members) in enumerate(self.slot_records(epoch, slot, self._read)):
            if position < skip:
                continue  # consumed before the resume: read, never decoded
            name = f"{self.names[shard]}:{key}"
            batch.append(self.make_item(members, name, seed_of(self.seed, epoch, shard, index)))
            if len(batch) == self.layout.batch_size:
                yield self.collate(batch)
                batch = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.layout.workers:
            raise RuntimeError(f"ShardStream was laid out for {self.layout.workers} workers, runs under {workers}")
        # Resuming at batch `start`: DataLoader worker i serves slot (start + i) % workers, so the loader's
        # round robin over its workers yields batches start, start + 1, ... in order (see the module notes).
        slot = (self.start + worker) % workers
        done_in_slot = len(range(slot, self.start, workers))
        yield from self.slot_batches(self.epoch, slot, done_in_slot)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StreamLoader:
    """Loader of a ShardStream: iterate(epoch, start) for exact resume; batches land on `device`.

    Not passed through `accelerator.prepare` (which would re-split the stream across processes, or read it
    all on the main process and dispatch): the stream splits itself by rank.
    """

    def __init__(self, stream: ShardStream, num_workers: int, device: torch.device | str = "cpu",
                 pin_memory: bool = False) -> None:
        self.stream, self.num_workers, self.device, self.pin_memory = stream, num_workers, torch.device(device), pin_memory
        self.epoch = 0
        self.dataset = stream

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def resume_layout(self) -> dict[str, Any]:
        """What a saved position (batches drawn) counts in: a resume under other values lands on other samples."""
        stream, layout = self.stream, self.stream.layout
        return {"processes": layout.world, "batch_size": layout.batch_size, "workers": layout.workers,
                "shuffle": stream.shuffle, "shuffle_buffer": stream.shuffle_buffer if stream.shuffle else 1,
                "samples": layout.total,
                # NOTE: only when > 1, so that a checkpoint from before interleaving (which has no such key)
                # resumes with data.shard_interleave=1, the layout it was saved under, and is refused otherwise.
                **({"shard_interleave": stream.interleave} if stream.interleave > 1 else {})}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch `start` on (what an uninterrupted run drew there)."""
        self.stream.epoch, self.stream.start = epoch, start
        # NOTE: persistent workers would keep the epoch and start they were forked with; these are new each pass.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            yield to_device(batch, self.device)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iterate(epoch)


def held_out_spans(counts: list[int], holdout: int) -> tuple[list[Span], list[Span]]:
    """(first `holdout` samples of the sorted shards, the rest): eval rows never trained on."""
    every = [Span(i, 0, c) for i, c in enumerate(counts)]
    total = sum(counts)
    if holdout >= total:
        raise DataError(f"num_eval_images={holdout} held out of {total} shard samples would leave none to train on")
    return take(every, 0, holdout), take(every, holdout, total - holdout)


def read_spans(names: list[str], spans: list[Span]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(name, members) of every sample of `spans`, in order (the eval rows, loaded into memory)."""
    for span in spans:
        for _, key, members in read_samples(names[span.shard], span.first, span.count):
            yield f"{names[span.shard]}:{key}", members


def image_member(members: dict[str, bytes], image_key: str) -> bytes | None:
    """The image bytes of a sample: the member named `image_key`, or with "image" the first image extension."""
    if image_key != "image" or "image" in members:
        return members.get(image_key)
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None


def parse_label(data: bytes) -> int:
    return int(data.decode("utf-8").strip())


