"""Iterative parallel decoding for the MaskGIT prior (Chang et al. 2022, arXiv:2202.04200, Algorithm 1).

Each of `steps` steps predicts every masked position at once, draws a token for each through the same
temperature / top-k / top-p path as the autoregressive priors (sampling.sample_from_logits), then keeps
the most confident draws and masks the rest again, so that floor(gamma((t + 1) / T) * U) of the U
unknown positions stay masked after step t (mask_schedule.masked_counts). Confidence is the log
probability of the drawn token plus Gumbel noise scaled by choice_temperature * (1 - (t + 1) / T), as in
google-research/maskgit `libml/parallel_decode.py` (`mask_by_random_topk`). Tokens already fixed, given
or decoded, are never drawn again. All randomness comes from the caller's generator on its own device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from einops import rearrange
from torch import Tensor

from vqgan.prior.mask_schedule import masked_counts
from vqgan.prior.sampling import check_guidance, check_sampling_settings, guided_logits, labels_tensor, sample_from_logits

if TYPE_CHECKING:
    from vqgan.prior.maskgit import MaskGITPrior


@dataclass(frozen=True)
class DecodeStep:
    """The state after one decoding step: tokens (n, h, w) (masked slots hold 0) and mask (n, h, w), True = masked."""

    step: int
    tokens: Tensor
    mask: Tensor


def check_choice_temperature(choice_temperature: float) -> None:
    if not math.isfinite(choice_temperature) or choice_temperature < 0:
        raise ValueError(f"choice_temperature must be a finite number >= 0 (0 = keep the most probable draws), "
                         f"got {choice_temperature}")


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise (float64), drawn on the generator's device so a seed reproduces on any device."""
    source = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)
    tiny = torch.finfo(torch.float64).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))


@torch.inference_mode()
def maskgit_decode(
    model: MaskGITPrior,
    n: int,
    labels: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    steps: int = 12,
    schedule: str = "cosine",
    choice_temperature: float = 4.5,
    tokens: Tensor | None = None,
    known: Tensor | None = None,
) -> Iterator[DecodeStep]:
    """Yield the state after each of `steps` steps; the last has no masked position left.

    tokens (n, h, w) and known (n, h, w) bool optionally fix some positions (in-painting); by default
    every position starts masked. labels None = the null class; cfg_scale as for the GPT prior.
    """
    cfg = model.config
    check_sampling_settings(temperature, top_k, top_p, cfg.num_codes)
    check_choice_temperature(choice_temperature)
    device = next(model.parameters()).device
    labels = labels_tensor(labels, n, cfg.num_classes, device)
    guided = check_guidance(cfg.num_classes, cfg.class_dropout, labels, cfg_scale, section="maskgit")
    h, w = cfg.grid
    if (tokens is None) != (known is None):
        raise ValueError("give both tokens and known (the positions to keep), or neither")
    if tokens is None:
        tokens = torch.zeros(n, h, w, dtype=torch.long, device=device)
        known = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    if tokens.shape != (n, h, w) or known.shape != (n, h, w) or known.dtype != torch.bool:
        raise ValueError(f"tokens and known must be ({n}, {h}, {w}) (known bool), got {tuple(tokens.shape)} and "
                         f"{tuple(known.shape)} {known.dtype}")
    current = rearrange(tokens.to(device).masked_fill(~known.to(device), 0), "n h w -> n (h w)")  # (n, L)
    masked = rearrange(~known.to(device), "n h w -> n (h w)")                                   # (n, L)
    counts = masked_counts(schedule, masked.sum(1), steps).to(device)                            # (n, T)
    row_labels = labels
    if guided:  # rows [0, n) conditional, rows [n, 2n) the null class (Ho & Salimans 2022)
        row_labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)])
    positions = torch.arange(cfg.seq_len, device=device)
    was_training = model.training
    model.eval()
    try:
        for t in range(steps):
            rows = 2 if guided else 1
            grid_tokens = rearrange(current, "n (h w) -> n h w", h=h).repeat(rows, 1, 1)
            grid_mask = rearrange(masked, "n (h w) -> n h w", h=h).repeat(rows, 1, 1)
            logits = model(grid_tokens, row_labels, grid_mask)
            logits = rearrange(logits, "r k h w -> r (h w) k")                                 # (R, L, K)
            if guided:
                logits = guided_logits(logits, n, cfg_scale)                                    # (n, L, K)
            masked_logits = logits[masked]                                                      # (M, K)
            ids = sample_from_logits(masked_logits, temperature, top_k, top_p, generator)       # (M,)
            drawn = current.masked_scatter(masked, ids)
            # Confidence: the model's log probability of each draw (google-research/maskgit uses the
            # untempered, unfiltered softmax too); fixed tokens get +inf and are never masked again.
            log_probs = masked_logits.double().log_softmax(-1).gather(-1, ids[:, None])[:, 0]  # (M,)
            confidence = torch.full(masked.shape, math.inf, dtype=torch.float64, device=device)
            confidence[masked] = log_probs.nan_to_num(neginf=-1e300)
            noise_scale = choice_temperature * (1.0 - (t + 1) / steps)
            if noise_scale > 0:
                confidence = confidence + noise_scale * gumbel(tuple(confidence.shape), generator, device)
            # Mask the counts[:, t] least confident positions again (all of them still unknown: the
            # known ones rank last with +inf, and counts[:, t] < the number still masked).
            order = confidence.argsort(dim=1, stable=True)                                      # (n, L)
            remask = torch.zeros_like(masked).scatter(1, order, positions[None, :] < counts[:, t : t + 1])
            current = drawn.masked_fill(remask, 0)
            masked = remask
            yield DecodeStep(t, rearrange(current, "n (h w) -> n h w", h=h).clone(),
                             rearrange(masked, "n (h w) -> n h w", h=h).clone())
    finally:
        model.train(was_training)


def sample_maskgit(
    model: MaskGITPrior,
    n: int,
    labels: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    steps: int = 12,
    schedule: str = "cosine",
    choice_temperature: float = 4.5,
    tokens: Tensor | None = None,
    known: Tensor | None = None,
) -> Tensor:
    """n grids (n, h, w) by `steps` steps of parallel decoding (maskgit_decode's last state)."""
    last = None
    for last in maskgit_decode(model, n, labels, temperature, top_k, top_p, cfg_scale, generator, steps, schedule,
                               choice_temperature, tokens, known):
        pass
    return last.tokens
