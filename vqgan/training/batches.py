"""Resumable batch iteration: an endless stream of batches from a saved data position, across epochs."""

from __future__ import annotations

from typing import Any, Iterator

from accelerate import Accelerator
from accelerate.utils import gather_object

from vqgan.errors import DataError
from vqgan.training.state import TrainState


def resumable_batches(accelerator: Accelerator, loader, state: TrainState) -> Iterator[Any]:
    """Batches from position state.batches_seen on, epoch after epoch; counts each one in the state.

    Position p is epoch p // len(loader), offset p % len(loader). The sampler's order depends on
    (seed, epoch) only (`set_epoch`), so skipping `offset` batches of epoch e lands on the very batch
    an uninterrupted run drew there. A stream (vqgan.data.shards.StreamLoader) starts at that batch
    itself: `loader.iterate(epoch, offset)`, without drawing the batches before it.
    """
    check_stream_layout(loader, state)
    if hasattr(loader, "seek"):  # an endless stream that keeps its own position (vqgan.data.streaming)
        yield from _stream_batches(accelerator, loader, state)
        return
    if len(loader) == 0:
        raise ValueError("the training data yields no batch: fewer images than train.batch_size x processes?")
    while True:
        epoch, offset = divmod(state.batches_seen, len(loader))
        if hasattr(loader, "iterate"):
            batches = loader.iterate(epoch, offset)
        else:
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in batches:
            state.batches_seen += 1
            yield batch


def _stream_batches(accelerator: Accelerator, loader, state: TrainState) -> Iterator[Any]:
    """Batches of a stream from its saved (epoch, batch) position on this process (state.stream_positions)."""
    if state.stream_positions:
        rank, world = accelerator.process_index, accelerator.num_processes
        if len(state.stream_positions) != world:
            raise ValueError(f"the checkpoint holds stream positions of {len(state.stream_positions)} processes, this "
                             f"run has {world}: a streamed run resumes on as many processes as it was saved from")
        loader.seek(*state.stream_positions[rank])
    for batch in loader:
        state.batches_seen += 1
        yield batch


def check_stream_layout(loader, state: TrainState) -> None:
    """Refuse to resume a stream under settings that lay its epochs out otherwise (the saved position
    would land on other samples): the error names the changed setting, its saved and its new value."""
    layout = getattr(loader, "resume_layout", None)
    if not state.stream_layout or layout is None:
        return  # a fresh run, a map-style loader, or a checkpoint from before layouts were saved
    changed = [f"{key} {state.stream_layout.get(key)} -> {value}" for key, value in layout.items()
               if state.stream_layout.get(key) != value]
    if changed:
        raise DataError(f"the checkpoint's data stream was laid out otherwise ({'; '.join(changed)}): a streamed "
                        f"run resumes exactly only with the processes, train.batch_size, data.num_workers, "
                        f"data.shuffle_buffer and data it was saved with; restore them or start a new run_dir")


def record_stream_position(accelerator: Accelerator, loader, state: TrainState) -> None:
    """Put every process's stream position and the stream's layout into the state before a checkpoint
    (a collective for an endless stream; no-op for map-style loaders)."""
    if hasattr(loader, "seek"):
        state.stream_positions = [list(p) for p in gather_object([list(loader.position)])]
    if hasattr(loader, "resume_layout"):
        state.stream_layout = dict(loader.resume_layout)
