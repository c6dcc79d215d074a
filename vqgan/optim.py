"""Optimizer and learning-rate schedule settings shared by the tokenizer and prior training loops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

# Modules whose `.weight` multiplies the input (a matrix or a conv kernel): the only weights that decay.
# Everything else stays undecayed: biases, GroupNorm/LayerNorm/BatchNorm scales, nn.Embedding tables, the
# VQ codebook (VectorQuantizer.weight, affine_scale/shift) and bare nn.Parameters such as positional
# embeddings. Decay would pull codes and norm gains towards 0 for no regularising benefit.
DECAYED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)  # taming/VQGAN's Adam betas; GAN training prefers a low beta1
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up, until train.steps
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _matrix_weights(module: nn.Module) -> list[nn.Parameter]:
    """The trainable tensor(s) behind a DECAYED_MODULES module's `.weight`."""
    if parametrize.is_parametrized(module, "weight"):
        # spectral_norm (torch.nn.utils.parametrizations) keeps the raw kernel as `.original`; a module's
        # `.weight` is then a computed tensor, not a parameter.
        original = getattr(module.parametrizations.weight, "original", None)
        return [original] if original is not None else []
    return [module.weight]


def decay_split(module: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Trainable parameters of `module` -> (decayed, not decayed) as (name, parameter) in module order.

    Decayed: the weights of DECAYED_MODULES. Every trainable parameter lands in exactly one list.
    """
    decayed_ids = {id(p) for m in module.modules() if isinstance(m, DECAYED_MODULES) for p in _matrix_weights(m)}
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    decay = [(name, p) for name, p in trainable if id(p) in decayed_ids]
    no_decay = [(name, p) for name, p in trainable if id(p) not in decayed_ids]
    # nanoGPT's check that every parameter was considered, once.
    assert {id(p) for _, p in decay}.isdisjoint(id(p) for _, p in no_decay)
    assert len(decay) + len(no_decay) == len(trainable)
    return decay, no_decay


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups: [{matrix weights, weight_decay}, {everything else, 0.0}].

    The split of minGPT / early nanoGPT `configure_optimizers` (karpathy/nanoGPT model.py: decay the
    weights of Linear modules, not biases, LayerNorm or Embedding weights; taming-transformers' GPT does
    the same), with convolutions counted as matrices. NOTE: today's nanoGPT decays every tensor of
    dim >= 2, which would also decay embeddings and the codebook; we keep the module-based rule.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = decay_split(module)
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


def lr_scaled_parameters(module: nn.Module) -> dict[int, float]:
    """id(parameter) -> lr multiplier, from every submodule's `param_lr_scales()` (the quantizer's affine
    scale and shift learn at affine_lr x lr, as vqtorch's `affine_lr`)."""
    scales: dict[int, float] = {}
    for sub in module.modules():
        table = getattr(sub, "param_lr_scales", None)
        if table is None:
            continue
        for name, scale in table().items():
            if scale != 1.0:  # at 1 a parameter stays in its decay group
                scales[id(sub.get_parameter(name))] = float(scale)
    return scales


def split_lr_scaled(groups: list[dict[str, Any]], scales: dict[int, float], lr: float) -> list[dict[str, Any]]:
    """Move lr-scaled parameters out of their group into one group per (weight decay, scale), after the rest.

    Each extra group holds `lr_scale` and starts at lr * lr_scale; the schedule multiplies it as the others.
    """
    if not scales:
        return groups
    out, extra = [], {}
    for group in groups:
        keep = [p for p in group["params"] if id(p) not in scales]
        for p in group["params"]:
            if id(p) in scales:
                key = (group["weight_decay"], scales[id(p)])
                extra.setdefault(key, []).append(p)
        out.append({**group, "params": keep})
    for (decay, scale), params in extra.items():
        out.append({"params": params, "weight_decay": decay, "lr_scale": scale, "lr": lr * scale})
    return out


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over a module's two groups (weight_decay_groups: decay on the matrix weights only), plus one
    group per lr multiplier a submodule asks for (`param_lr_scales`, e.g. the quantizer's affine_lr).

    Always the two groups and AdamW, also at weight_decay 0 (where AdamW's update is Adam's exactly), so
    a resumed run may change optim.weight_decay: the checkpoint's optimizer state keeps its shape.
    A bare iterable of parameters cannot be split: Adam, and refused with decay on.
    """
    if isinstance(model, nn.Module):
        groups = split_lr_scaled(weight_decay_groups(model, config.weight_decay), lr_scaled_parameters(model),
                                 config.lr)
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    else:
        if config.weight_decay > 0:
            raise TypeError(
                f"build_optimizer got a plain iterable of parameters with weight_decay={config.weight_decay}: "
                "pass the module itself (build_optimizer(model, config)) so that only the conv/linear weights "
                "are decayed, not norms, biases, embeddings or the codebook"
            )
        params = [p for p in model if p.requires_grad]
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas)


def lr_multiplier(step: int, config: OptimConfig, total_steps: int) -> float:
    """Factor on the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def apply_config_after_resume(optimizer: torch.optim.Optimizer, scheduler, config: OptimConfig) -> None:
    """Make the recipe's lr, betas and weight decay win over the checkpoint's, after a resume.

    Loading an optimizer's state restores its param_groups (lr, betas, weight_decay) and the
    scheduler's base lrs as they were saved, which would silently ignore a changed optim.lr. The
    schedule's position (last_epoch) and Adam's moments stay the checkpoint's.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrappers
    schedule = getattr(scheduler, "scheduler", scheduler)
    decays = [config.weight_decay] + [0.0] * (len(inner.param_groups) - 1)  # lr-scaled groups: no decay
    for group, decay in zip(inner.param_groups, decays):
        group.update(betas=tuple(config.betas), weight_decay=decay,
                     initial_lr=config.lr * group.get("lr_scale", 1.0))
    schedule.base_lrs = [group["initial_lr"] for group in inner.param_groups]
    lrs = [base * fn(schedule.last_epoch) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, lr in zip(inner.param_groups, lrs):
        group["lr"] = lr
    schedule._last_lr = lrs


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total_steps))
