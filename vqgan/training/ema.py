"""Exponential moving average of a model's weights (used for evaluation and export)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to hold the averaged weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (codebooks, statistics) are copied.

    Buffers are copied rather than averaged: an EMA codebook or a usage counter is already a running
    statistic, and averaging integer counters would be meaningless.
    """
    model_params = dict(model.named_parameters())
    for name, ema_param in ema.named_parameters():
        ema_param.lerp_(model_params[name].detach().to(ema_param.dtype), 1.0 - decay)
    model_buffers = dict(model.named_buffers())
    for name, ema_buffer in ema.named_buffers():
        ema_buffer.copy_(model_buffers[name])
