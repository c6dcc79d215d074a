"""Randomness derived from the data position, so a resumed run draws exactly what an uninterrupted one did.

Restoring the global RNG from a checkpoint is fragile: anything that draws between the save and the
next step (building a model to export, an evaluation pass, a DataLoader iterator, a library call)
shifts every later draw, and a resumed run never replays those draws. Seeding each window from
(seed, data position, rank) makes a window's draws a function of where it is in the run alone
(JAX's fold_in idea): dropout, class dropout, k-means seeding and dead-code restarts.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def window_seed(seed: int, position: int, rank: int) -> int:
    """A 63-bit seed for the window that starts at data position `position` on process `rank`."""
    return int(np.random.SeedSequence((seed, position, rank)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def seed_window(seed: int, position: int, rank: int) -> None:
    """Seed torch (every device), numpy's and Python's global RNGs for one window. No host sync."""
    value = window_seed(seed, position, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
