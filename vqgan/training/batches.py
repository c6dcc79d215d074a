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
    itself: `loader.iterate(epoch, offset)`, without drawing the batches before it. The position is
    checked first (`restore_position`), so a position the run cannot continue from fails here.
    """
    restore_position(accelerator, loader, state)
    if hasattr(loader, "seek"):  # an endless stream that keeps its own position (vqgan.data.streaming)
        return _stream_batches(accelerator, loader, state)
    return _map_batches(accelerator, loader, state)


def restore_position(accelerator: Accelerator | None, loader, state: TrainState) -> None:
    """Check a resumed data position against this run's layout (idempotent; call it right after loading the state).

    A stream saved under another layout is refused (`check_stream_layout`). A DataLoader position saved
    under another number of processes, batch size or epoch length is converted through the samples
    drawn (`convert_position`), or refused when it cannot be; the layout is then recorded in the state.
    """
    check_stream_layout(loader, state)
    if hasattr(loader, "seek"):
        return
    if len(loader) == 0:
        raise ValueError("the training data yields no batch: fewer images than train.batch_size x processes?")
    if hasattr(loader, "iterate"):  # vqgan.data.shards: its layout is the stream layout checked above
        return
    layout = map_layout(accelerator, loader)
    if state.data_layout and state.data_layout != layout:
        converted = convert_position(state.batches_seen, state.data_layout, layout)
        if accelerator is not None:
            accelerator.print(f"data position converted: {describe_change(state.data_layout, layout)}; batch "
                              f"{state.batches_seen} of the saved layout is batch {converted} of this one (the same "
                              "samples drawn)")
        state.batches_seen = converted
    state.data_layout = layout


def _map_batches(accelerator: Accelerator, loader, state: TrainState) -> Iterator[Any]:
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


def map_layout(accelerator: Accelerator | None, loader) -> dict[str, int]:
    """What batches_seen counts in on a DataLoader: {processes, batch_size (per process), batches_per_epoch}."""
    return {"processes": 1 if accelerator is None else accelerator.num_processes,
            "batch_size": loader.batch_sampler.batch_size,  # accelerate's BatchSamplerShard keeps the per-process one
            "batches_per_epoch": len(loader)}


def describe_change(saved: dict[str, int], current: dict[str, int]) -> str:
    names = {"processes": "processes", "batch_size": "train.batch_size", "batches_per_epoch": "batches per epoch"}
    return ", ".join(f"{names[k]} {saved.get(k)} -> {current[k]}" for k in names if saved.get(k) != current[k])


def convert_position(batches_seen: int, saved: dict[str, int], current: dict[str, int]) -> int:
    """A data position counted in the `saved` layout -> the same position counted in `current`.

    Accelerate deals an epoch's global batches round-robin, so after `offset` batches per process
    the first offset x batch_size x processes samples of the epoch's (seed, epoch) order are drawn,
    whatever the layout. That count is converted into batches of the new layout; when it is not a whole
    number of them the resume is refused (rounding would repeat or skip samples of the epoch silently).
    A position past the end of a shorter epoch (a smaller data set) starts the next epoch.
    """
    epoch, offset = divmod(batches_seen, saved["batches_per_epoch"])
    drawn = offset * saved["batch_size"] * saved["processes"]  # samples of this epoch, all processes
    global_batch = current["batch_size"] * current["processes"]
    new_offset, left = divmod(drawn, global_batch)
    if left:
        raise DataError(
            f"cannot resume the data position under this layout ({describe_change(saved, current)}): the checkpoint "
            f"drew {drawn} samples of epoch {epoch} ({offset} batches x {saved['batch_size']} x {saved['processes']} "
            f"processes), not a whole number of the new global batches of {current['batch_size']} x "
            f"{current['processes']} = {global_batch}. Resume with a batch size x processes that divides {drawn} "
            "(e.g. the saved ones), or from another checkpoint")
    if new_offset >= current["batches_per_epoch"]:
        epoch, new_offset = epoch + 1, 0
    return epoch * current["batches_per_epoch"] + new_offset


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
