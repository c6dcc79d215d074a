"""Resumable batch iteration: an endless stream of batches from a saved data position, across epochs."""

from __future__ import annotations

from typing import Any, Iterator

from accelerate import Accelerator

from vqgan.training.state import TrainState


def resumable_batches(accelerator: Accelerator, loader, state: TrainState) -> Iterator[Any]:
    """Batches from position state.batches_seen on, epoch after epoch; counts each one in the state.

    Position p is epoch p // len(loader), offset p % len(loader). The sampler's order depends on
    (seed, epoch) only (`set_epoch`), so skipping `offset` batches of epoch e lands on the very batch
    an uninterrupted run drew there. A stream (vqgan.data.shards.StreamLoader) starts at that batch
    itself: `loader.iterate(epoch, offset)`, without drawing the batches before it.
    """
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
