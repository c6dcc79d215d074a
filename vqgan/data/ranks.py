"""Which process this is, and the one rule that splits N items over the processes (and a process's items
over its DataLoader workers): contiguous blocks, every item once.

Training on shards needs every process to step in lockstep, so there each process takes the same
number of items, N // W, and the N % W left over are reported by the caller. Tokenization must encode
every row once, so there the blocks differ by at most one item. Two sources split by rules that are
not ours: a map-style DataLoader's batches are dealt by Accelerate (`accelerator.prepare`), and a
streamed hub dataset's rows by `datasets.distributed.split_dataset_by_node` (`streaming.process_rows`).
"""

from __future__ import annotations


def process_state():
    """Accelerate's process state (rank, world, device): the Accelerator's if one exists, else started here
    the way an Accelerator would (ACCELERATE_USE_CPU read too, so a CPU launch is seen as multi-process)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def rank_share(total: int, rank: int, world: int, *, equal: bool = False) -> range:
    """Items [start, stop) of `total` that process `rank` of `world` takes: contiguous blocks in rank order.

    equal=False: block sizes differ by at most one and cover every item once. equal=True: every block
    holds total // world items, so processes that step together get as many; the last total % world
    items are nobody's.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if equal:
        size = total // world
        return range(rank * size, (rank + 1) * size)
    return range(rank * total // world, (rank + 1) * total // world)
