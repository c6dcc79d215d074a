"""Range checks of the token and class ids given to a prior, kept off the training step.

Reading a tensor's min/max back to the host stalls an accelerator's queue (four such reads per
forward cost the prior step its overlap). The priors check the ids they are given unless told not
to (`check_ids = False`): the training loop says so, because the token set and its labels were
range-checked once when they were opened (`vqgan.prior.data`, `train_prior.prepare_tokens`).
Sampling, scoring and a user's own calls keep the check and its clear error.
"""

from __future__ import annotations

from torch import Tensor


def check_id_range(ids: Tensor, stop: int, what: str, note: str = "") -> None:
    """Refuse ids outside [0, stop) with a message naming the range found (reads min/max: a host sync)."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= stop:
        raise ValueError(f"{what} ids must lie in [0, {stop}){note}, got [{low}, {high}]")
