"""One optimizer step of the tokenizer: a window of micro-batches through `generator_step` and `discriminator_step`,
the window's one flag read and non-finite policy, then both updates, the schedulers and the EMA.

vqgan/train.py calls this once per step and benchmarks/train_step.py times this very object, so the benchmark
measures the loop's step and not a copy of it. What stays in the loop: where the micro-batches come from
(`draw`: data position, unreadable files, the stand-in for an empty batch), counting steps and images,
logging, evaluation and checkpoints.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from vqgan.losses import LeCAM, LossConfig
from vqgan.training.ema import ema_decay_at, update_ema
from vqgan.training.gan_step import GeneratorResult, discriminator_step, generator_step
from vqgan.training.rng import seed_window
from vqgan.training.state import TrainState
from vqgan.training.window import (
    Update,
    WindowSnapshot,
    apply_updates,
    discard_window,
    gradient_sync,
    in_place_params,
    loss_scale,
    reduce_window_flags,
    settle_window,
)

# -> (images (B, 3, S, S) in [-1, 1], whether they are a stand-in for a batch of only unreadable files)
Draw = Callable[[], tuple[torch.Tensor, bool]]


@dataclass(frozen=True)
class StepResult:
    """What the loop logs of a kept window: its last micro-batch's generator output, logs and images."""

    gen: GeneratorResult
    logs: dict[str, torch.Tensor]  # the last micro-batch's generator and discriminator terms (device tensors)
    grad_norms: list[torch.Tensor | None]  # (generator, discriminator if on) before clipping; None: not clipped
    images: torch.Tensor  # (B, 3, S, S) the last micro-batch


@dataclass
class TokenizerStep:
    """The tokenizer's optimizer step; `model` and `discriminator` as `accelerator.prepare` returned them."""

    accelerator: Accelerator
    model: nn.Module
    discriminator: nn.Module
    perceptual: nn.Module | None
    lecam: LeCAM | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None
    loss: LossConfig
    grad_clip_g: float
    grad_clip_d: float
    ema_decay: float = 0.0
    grad_accum_steps: int = 1
    seed: int = 0
    max_nonfinite_in_row: int = 1  # discarded windows in a row before the run stops (1: the first one stops it)
    autocast: Callable[[], AbstractContextManager] | None = None  # default: accelerator.autocast
    # the adaptive weight used where the GAN gradient norm is 0 or overflows: the last finite one (a checkpoint
    # keeps it as TrainState.adaptive_weight; see losses.adaptive_weight)
    adaptive_fallback: torch.Tensor | float = 1.0
    raw_model: nn.Module = field(init=False)
    raw_disc: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.raw_model = self.accelerator.unwrap_model(self.model)
        self.raw_disc = self.accelerator.unwrap_model(self.discriminator)
        self.adaptive_fallback = torch.as_tensor(self.adaptive_fallback, device=self.accelerator.device)
        if self.autocast is None:
            self.autocast = self.accelerator.autocast

    def __call__(self, state: TrainState, draw: Draw) -> StepResult | None:
        """One window at `state.step`; -> what to log, or None when the window was discarded (state counts it).

        The caller advances state.step after a kept window; `draw` advances state.batches_seen.
        """
        accelerator, loss, device = self.accelerator, self.loss, self.accelerator.device
        scaler = accelerator.scaler
        disc_on = state.step >= loss.disc_start
        snapshot = WindowSnapshot([self.raw_model, self.raw_disc, self.lecam], in_place_params(self.raw_model))
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        overflow = torch.zeros((), device=device)
        empty = False
        for micro in range(self.grad_accum_steps):
            images, stand_in = draw()
            seed_window(self.seed, state.batches_seen, accelerator.process_index)
            empty |= stand_in
            sync = micro == self.grad_accum_steps - 1
            with gradient_sync(accelerator, sync, self.model, self.discriminator), self.autocast():
                gen = generator_step(self.model, self.raw_model, self.raw_disc, self.perceptual, images, loss,
                                     state.step, accelerator.backward, self.grad_accum_steps,
                                     loss_scale(scaler, device), self.adaptive_fallback)
                nonfinite |= ~torch.isfinite(gen.loss)
                overflow = overflow + gen.logs["adaptive_overflow"]
                logs = dict(gen.logs)
                if disc_on:
                    d_total, d_logs = discriminator_step(self.discriminator, images, gen.fake, loss, state.step,
                                                         self.lecam, accelerator.backward, self.grad_accum_steps)
                    nonfinite |= ~torch.isfinite(d_total)
                    logs.update(d_logs)
        flags = reduce_window_flags(accelerator, nonfinite, overflow, empty)  # the window's one host sync
        if not settle_window(state, flags, self.max_nonfinite_in_row, accelerator.print):
            snapshot.restore()  # the codebook, usage counters, LeCAM and BatchNorm statistics as before the window
            discard_window([self.opt_g, self.opt_d], scaler, back_off=flags.nonfinite)
            return None

        updates = [Update(self.opt_g, list(self.raw_model.parameters()), self.grad_clip_g)]
        if disc_on:
            updates.append(Update(self.opt_d, list(self.raw_disc.parameters()), self.grad_clip_d))
        norms = apply_updates(updates, scaler, skip=flags.overflow)
        self.sched_g.step()
        if disc_on:
            self.sched_d.step()
            if loss.use_adaptive_weight and loss.disc_weight > 0:
                self.adaptive_fallback = gen.logs["adaptive_weight"]  # the last finite one (or the fallback itself)
        if self.ema is not None:
            update_ema(self.ema, self.raw_model, ema_decay_at(state.step, self.ema_decay))
        return StepResult(gen, logs, norms, images)
