"""Exponential moving average of a model's weights (used for evaluation and export), with warm-up."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to hold the averaged weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay_at(updates_done: int, decay: float) -> float:
    """Decay of the EMA update after `updates_done` earlier updates: 0 first, then min(decay, (1+t)/(10+t)).

    The first update copies the model (so the EMA starts from the weights after step 1, k-means
    codebook included, not from the random init), and the warm-up of diffusers' EMAModel
    (`min(decay, (1 + t) / (10 + t))`) lets an early EMA track the live model: at decay 0.9999 a
    plain EMA would still be 37% initial weights after 10k steps.
    """
    if updates_done <= 0:
        return 0.0
    return min(decay, (1.0 + updates_done) / (10.0 + updates_done))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (codebooks, statistics) are copied.

    Buffers are copied rather than averaged: an EMA codebook or a usage counter is already a running
    statistic, and averaging integer counters would be meaningless.
    """
    model_params = dict(model.named_parameters())
    ema_params = [p for _, p in ema.named_parameters()]
    live_params = [model_params[name].detach() for name, _ in ema.named_parameters()]
    torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)  # one fused kernel, not one per tensor
    model_buffers = dict(model.named_buffers())
    ema_buffers = [b for _, b in ema.named_buffers()]
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, [model_buffers[name] for name, _ in ema.named_buffers()])
