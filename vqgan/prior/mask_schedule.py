"""MaskGIT mask schedules gamma(r): the fraction of a grid still masked at progress r in [0, 1].

Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", arXiv:2202.04200, section 3.3 and
google-research/maskgit `libml/mask_schedule.py`: gamma decreases from gamma(0) = 1 (all masked) to
gamma(1) = 0. Training draws r ~ U[0, 1) and masks ceil(gamma(r) * L) tokens; decoding with T steps
leaves floor(gamma((t + 1) / T) * U) of the U initially unknown tokens masked after step t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log(r: Tensor, total: Tensor) -> Tensor:
    return -torch.log2(r.clamp_min(1e-12)) / torch.log2(total.clamp_min(2))


def _exp(r: Tensor, total: Tensor) -> Tensor:
    return 1 - torch.exp2(-torch.log2(total.clamp_min(2)) * (1 - r))


# name -> gamma(r, total unknown): MaskGIT's "uniform" is linear and "pow<p>" is 1 - r^p.
MASK_SCHEDULES = {
    "cosine": lambda r, total: torch.cos(math.pi / 2 * r),
    "linear": lambda r, total: 1 - r,
    "square": lambda r, total: 1 - r**2,
    "cubic": lambda r, total: 1 - r**3,
    "sqrt": lambda r, total: 1 - r.sqrt(),
    "log": _log,
    "exp": _exp,
}


def check_mask_schedule(name: str) -> None:
    if name not in MASK_SCHEDULES:
        raise ValueError(f"unknown mask schedule {name!r}; choose from {sorted(MASK_SCHEDULES)}")


def mask_ratio(name: str, r: Tensor, total: Tensor | int) -> Tensor:
    """gamma(r) for progress r in [0, 1] and `total` maskable tokens (broadcast) -> masked fraction in [0, 1]."""
    check_mask_schedule(name)
    total = torch.as_tensor(total, dtype=torch.float64)
    return MASK_SCHEDULES[name](r.double(), total).clamp(0.0, 1.0)


def masked_counts(name: str, unknown: Tensor, steps: int) -> Tensor:
    """(B,) counts of unknown tokens -> (B, steps): tokens still masked after each decoding step.

    floor(gamma((t + 1) / T) * U) as in MaskGIT, then bounded so that every step reveals at least one
    token and the last step reveals the rest (counts strictly decrease to 0); needs U >= steps.
    """
    check_mask_schedule(name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    unknown = unknown.long().cpu()
    if unknown.numel() and int(unknown.min()) < steps:
        raise ValueError(f"steps={steps} but a grid has only {int(unknown.min())} masked positions to reveal: "
                         f"every step reveals at least one, so use steps <= {int(unknown.min())}")
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    total = unknown[:, None].double()                                                    # (B, 1)
    counts = torch.floor(mask_ratio(name, (t / steps)[None, :], total) * total).long()   # (B, T)
    left = unknown.clone()
    for i in range(steps):  # at least one reveal now, and at least one left for each later step
        counts[:, i] = counts[:, i].clamp(min=steps - 1 - i).minimum(left - 1)
        left = counts[:, i]
    return counts
