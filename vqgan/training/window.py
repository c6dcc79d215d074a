"""One window of micro-batches: fused flags, the non-finite policy, the optimizer update, the undo.

A window is `grad_accum_steps` micro-batches whose gradients add up to one optimizer step. Nothing
inside it reads a value back to the host: each micro-batch ORs its loss's non-finiteness (and the
adaptive weight's fp16 overflow) into device flags, and the window ends with ONE all-reduce of
[non-finite, overflow, empty batch] and one read. A window with a NaN/inf loss on any process, or
with a process that drew only unreadable files, is discarded whole (gradients dropped, counted once), and a
`WindowSnapshot` taken at its start puts back every buffer the forwards changed (codebook, usage
counters, LeCAM averages, BatchNorm statistics), so a discarded window leaves no trace but the
data position and the counters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from vqgan.training.state import TrainState


Backward = Callable[[torch.Tensor], None]  # accelerator.backward, or (lambda loss: scaler.scale(loss).backward())


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


class WindowSnapshot:
    """Copies of the tensors a forward may change in place, taken at a window's start (device copies only)."""

    def __init__(self, modules: Iterable[nn.Module | None], params: Iterable[torch.Tensor] = ()):
        self.modules = [m for m in modules if m is not None]
        tensors = [b for m in self.modules for b in m.buffers()] + list(params)
        self.pairs = [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.pairs:
            live.copy_(saved)
        for module in self.modules:
            for sub in module.modules():
                refresh = getattr(sub, "refresh_flags", None)
                if refresh is not None:
                    refresh()  # Python mirrors of restored buffers (the quantizer's `initialized`)


def in_place_params(model: nn.Module) -> list[torch.Tensor]:
    """Parameters a forward writes in place (the quantizer's codebook under k-means / restarts)."""
    quantizer = getattr(model, "quantizer", None)
    return list(quantizer.parameters()) if quantizer is not None else []


@dataclass(frozen=True)
class WindowFlags:
    """What the processes saw in one window, agreed by all of them."""

    nonfinite: bool  # a loss was NaN/inf somewhere: discard the window
    empty: bool  # a process drew only unreadable files: discard the window
    overflow: bool  # fp16: the adaptive weight's scaled gradients overflowed: skip the update, back off


def reduce_window_flags(accelerator: Accelerator, nonfinite: torch.Tensor, overflow: torch.Tensor | None = None,
                        empty: bool = False) -> WindowFlags:
    """The window's flags summed over processes: one all-reduce and one read.

    This is the only host sync of a bf16/fp32 window; under fp16 the GradScaler adds one per
    optimizer (its inf check before stepping).
    """
    zero = torch.zeros((), device=nonfinite.device)
    local = torch.stack([nonfinite.float(), zero if overflow is None else overflow.float(), zero + float(empty)])
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    nonfinite_count, overflow_count, empty_count = total.tolist()
    return WindowFlags(nonfinite=nonfinite_count > 0, empty=empty_count > 0, overflow=overflow_count > 0)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's wrapper (whose step() would update the scaler once per optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


@dataclass(frozen=True)
class Update:
    """One optimizer of the window and the gradient clipping of its parameters (max_norm 0 = off)."""

    optimizer: torch.optim.Optimizer
    params: Sequence[torch.nn.Parameter]
    max_norm: float


def apply_updates(updates: Sequence[Update], scaler: torch.amp.GradScaler | None,
                  skip: bool = False) -> list[torch.Tensor | None]:
    """Unscale and clip each optimizer's own gradients, step them all, update the scaler ONCE; -> grad norms.

    `skip`: an overflow was seen before backward (WindowFlags.overflow): no optimizer steps, and the
    scale backs off, exactly what the scaler does when it finds one in the gradients.

    One GradScaler for several optimizers, as in PyTorch's AMP recipe for multiple optimizers: each is
    unscaled and stepped by the scaler (an optimizer whose gradients overflowed skips its step), then a
    single `update()` backs the scale off if any overflowed. Accelerate's optimizer wrapper would
    update the scale after each optimizer instead, unscaling the second with the wrong scale.
    """
    if skip:
        discard_window([update.optimizer for update in updates], scaler)
        return [None] * len(updates)
    norms: list[torch.Tensor | None] = []
    for update in updates:
        if scaler is not None:
            scaler.unscale_(_inner(update.optimizer))
        norms.append(torch.nn.utils.clip_grad_norm_(update.params, update.max_norm) if update.max_norm > 0 else None)
    for update in updates:
        if scaler is not None:
            scaler.step(_inner(update.optimizer))
        else:
            _inner(update.optimizer).step()
    if scaler is not None and updates:
        scaler.update()
    for update in updates:
        _inner(update.optimizer).zero_grad(set_to_none=True)
    return norms


def discard_window(optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None,
                   back_off: bool = True) -> None:
    """Drop the window's gradients; under fp16 (`back_off`) back the scale off as an overflow would.

    A loss that is already non-finite in the forward never reaches the scaler's inf check, so without
    this the scale would stay where it overflowed and every later step would be skipped as well. Like
    the scaler's own back-off, it restarts the count of good steps before the scale may grow again.
    A window discarded for want of data (`back_off=False`) leaves the scale alone.
    """
    for optimizer in optimizers:
        _inner(optimizer).zero_grad(set_to_none=True)
    if back_off and scaler is not None and scaler.is_enabled():
        one = torch.ones((), device=scaler._device)  # the device the scaler was made for (torch keeps it private)
        scaler.update(new_scale=scaler.scale(one) * scaler.get_backoff_factor())
        growth_tracker = getattr(scaler, "_growth_tracker", None)  # torch keeps it private; None before use
        if growth_tracker is not None:
            growth_tracker.zero_()


def loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> torch.Tensor | float:
    """The scaler's current scale as a device tensor (no host sync; scaler.get_scale() would read it back)."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return scaler.scale(torch.ones((), device=device))


def settle_window(state: TrainState, flags: WindowFlags, max_in_row: int, say: Callable[[str], None]) -> bool:
    """Count a discarded window (non-finite loss, or an empty batch) and stop after too many in a row; -> keep it."""
    if flags.empty:
        state.empty_batches += 1
        say(f"step {state.step}: a process drew only unreadable files; window discarded on every process")
        return False
    if not flags.nonfinite:
        state.nonfinite_in_row = 0
        state.overflow_steps += int(flags.overflow)
        return True
    state.nonfinite_steps += 1
    state.nonfinite_in_row += 1
    say(f"step {state.step}: non-finite loss in the window, step skipped ({state.nonfinite_in_row} in a row)")
    if state.nonfinite_in_row >= max_in_row:
        raise RuntimeError(
            f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step}: stopping. "
            "Lower the learning rate, use bf16 instead of fp16, or check the data."
        )
    return False


@contextlib.contextmanager
def gradient_sync(accelerator: Accelerator, sync: bool, *models: nn.Module):
    """DDP all-reduces gradients only in the window's last micro-batch (`no_sync` before it)."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield
