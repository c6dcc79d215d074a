"""What every quantizer kind shares: the output type, the input layout, the usage statistics and
`indices_to_codes`. A kind supplies its search (`search`), its codes (`codes_for`) and `forward`.

The usage counters (step, seen, last_used_step, last_seen) are training state: `training_state_names`.

z (B, D, H, W) or (N, D) -> project_in (D -> c, when the kind's lookup width differs) -> one index
per position -> codes (N, c) -> project_out (c -> D). Distances, codes and losses are fp32 under
autocast: bf16 rounding flips nearest codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgan.quantizers.config import KindConfig, QuantizerConfig, as_kind_config
from vqgan.quantizers.distributed import all_reduce_sum
from vqgan.quantizers.entropy import histogram


@dataclass
class QuantizerOutput:
    quantized: Tensor  # same shape as the input, straight-through (or the kind's) gradient
    # (B, H, W) for (B, D, H, W) input; (N,) for (N, D) input; msvq: (B, Σ s²), each scale's s x s grid row-major,
    # coarse to fine (its split_scales / join_scales)
    indices: Tensor
    loss: Tensor  # codebook + beta * commitment + entropy weight * entropy
    codebook_loss: Tensor  # ||sg[z] - e||^2, mean over elements; 0 with use_ema, fsq, lfq
    commitment_loss: Tensor  # ||z - sg[e]||^2, mean over elements, before beta
    entropy_loss: Tensor  # entropy penalty before its weight; 0 when entropy_weight == 0
    perplexity: Tensor  # exp(entropy of this batch's code histogram), this rank's batch
    usage: Tensor  # fraction of the K codes used by real assignments over the last ~usage_window indices


class Quantizer(nn.Module):
    """Base of every kind: layout checks, projections, usage counters, indices_to_codes and lookup."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        super().__init__()
        config = as_kind_config(config)
        self.config = config
        width = config.lookup_dim
        projected = width != config.dim
        self.project_in = nn.Linear(config.dim, width) if projected else None
        self.project_out = nn.Linear(width, config.dim) if projected else None
        num_codes = config.num_codes
        self.register_buffer("step", torch.tensor(0))  # training forwards so far
        self.register_buffer("seen", torch.tensor(0))  # indices assigned so far, summed over ranks
        self.register_buffer("last_used_step", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("last_seen", torch.zeros(num_codes, dtype=torch.long))  # `seen` when last used

    # -- what a kind provides ------------------------------------------------------------------

    def search(self, h: Tensor) -> Tensor:
        """(N, c) fp32 rows of the lookup space -> (N,) long indices; exact, chunked, no state change."""
        raise NotImplementedError

    def export_search(self, h: Tensor) -> Tensor:
        """`search` in a form the ONNX tracer takes (no out= buffers); the same indices."""
        return self.search(h)

    def codes_for(self, indices: Tensor) -> Tensor:
        """(N,) long -> (N, c) fp32 codes of the lookup space; traceable."""
        raise NotImplementedError

    @property
    def codebook(self) -> Tensor:
        """(K, c) every code of the lookup space (built on demand for fsq / lfq)."""
        return self.codes_for(torch.arange(self.config.num_codes, device=self.step.device))

    def refresh_flags(self) -> None:
        """Re-read Python mirrors of buffers after a load or a restore (none by default)."""

    def training_state_names(self) -> tuple[str, ...]:
        """Buffers (names in this module) that only training reads: kept in training checkpoints, left out
        of tokenizer folders (vqgan/training_state.py). Here the usage counters; kinds add their own."""
        return ("step", "seen", "last_used_step", "last_seen")

    def reset_training_state(self) -> None:
        """Make training state that a tokenizer folder does not hold consistent with its loaded weights
        (before training goes on from them); the counters start fresh as built."""

    def param_lr_scales(self) -> dict[str, float]:
        """Parameter name (in this module) -> lr multiplier, for parameters that learn at their own rate."""
        return {}

    # -- shared API -----------------------------------------------------------------------------

    @torch.no_grad()
    def lookup(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) or (N, D) -> indices (B, H, W) or (N,); never changes any state.

        The indices forward would return, without its training-mode side effects (k-means, restarts,
        EMA codebook, usage counters): tokenizing with a model left in train mode is safe.
        """
        h = self.lookup_rows(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            indices = self.search(h)
        return self._unflatten(indices, z)

    def lookup_rows(self, z: Tensor) -> Tensor:
        """z -> (N, c) fp32 rows of the lookup space (after checks, projection and the kind's map)."""
        flat = self._flatten_checked(z)  # (N, D)
        return self.prepare_rows(self.to_lookup_space(flat))  # (N, c) fp32

    def to_lookup_space(self, flat: Tensor) -> Tensor:
        """(N, D) -> (N, c) fp32 rows of the lookup space: the projection too runs in fp32 under autocast,
        since a bf16 projection flips signs (lfq) and nearest codes as surely as a bf16 search would."""
        if self.project_in is None:
            return flat.float()
        weight, bias = self.project_in.weight, self.project_in.bias
        with torch.autocast(device_type=flat.device.type, enabled=False):  # fp32 whatever the weights' dtype
            return F.linear(flat.float(), weight.float(), bias.float())

    def prepare_rows(self, h: Tensor) -> Tensor:
        """(N, c) -> (N, c): the kind's map before the search (l2 normalisation, FSQ's bound); identity here."""
        return h

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, H, W) -> (B, D, H, W) or (N,) -> (N, D): the quantized tensor these indices stand for."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.dim() not in (1, 3):
            raise ValueError(f"indices must have shape (B, H, W) or (N,), got {tuple(indices.shape)}")
        num_codes = self.config.num_codes
        if indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= num_codes:
                raise ValueError(f"indices must lie in [0, {num_codes}), got values in [{low}, {high}]")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            out = self.codes_for(indices.reshape(-1).long())  # (N, c)
        out = self.project_out(out) if self.project_out is not None else out  # (N, D)
        if indices.dim() == 3:
            b, h, w = indices.shape
            return rearrange(out, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous()
        return out

    # -- input layout ---------------------------------------------------------------------------

    def _flatten_checked(self, z: Tensor) -> Tensor:
        """Validate z and return it as (N, D) rows."""
        dim = self.config.dim
        if z.dim() not in (2, 4):
            raise ValueError(f"z must have shape (B, {dim}, H, W) or (N, {dim}), got {tuple(z.shape)}")
        if z.shape[1] != dim:
            raise ValueError(f"z must have {dim} channels in dim 1, got {z.shape[1]} (shape {tuple(z.shape)})")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating point tensor, got dtype {z.dtype}")
        if z.numel() == 0:
            raise ValueError(f"z must hold at least one vector, got shape {tuple(z.shape)}")
        # In training a non-finite encoder output (an fp16 overflow) must reach the loss, so that the loop
        # skips the step on every process; the statistics leave those rows out (see forward).
        if not self.training and not torch.isfinite(z).all():
            bad = int((~torch.isfinite(z)).sum())
            raise ValueError(f"z must be finite, got {bad} NaN/inf values out of {z.numel()}")
        return rearrange(z, "b d h w -> (b h w) d") if z.dim() == 4 else z

    @staticmethod
    def _unflatten(rows: Tensor, like: Tensor) -> Tensor:
        """Rows (N, ...) back to the layout of `like`: (B, ..., H, W) for 4-D input, unchanged for 2-D."""
        if like.dim() == 2:
            return rows
        b, _, h, w = like.shape
        if rows.dim() == 1:
            return rearrange(rows, "(b h w) -> b h w", b=b, h=h, w=w)
        # contiguous: a channels-last view would silently switch the decoder's convs to that layout
        return rearrange(rows, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous()

    def _output(self, z: Tensor, out: Tensor, indices: Tensor, **terms: Tensor) -> QuantizerOutput:
        """Assemble the QuantizerOutput from lookup-space rows `out` (N, c) and `indices` (N,)."""
        out = self.project_out(out) if self.project_out is not None else out  # (N, D)
        return QuantizerOutput(quantized=self._unflatten(out.to(z.dtype), z), indices=self._unflatten(indices, z),
                               **terms)

    # -- statistics (training mode only) ------------------------------------------------------

    @torch.no_grad()
    def _count(self, indices: Tensor, finite: Tensor) -> Tensor:
        """Count this batch's real assignments (all ranks) into the usage counters; (K,) global histogram.

        Non-finite rows (an fp16 overflow) go to an extra bin that is dropped, so the shapes stay fixed
        and nothing is read back to the host.
        """
        num_codes = self.config.num_codes
        counts = histogram(torch.where(finite, indices, num_codes), num_codes + 1)[:num_codes]
        counts = all_reduce_sum(counts.clone())  # (K,)
        used = counts > 0
        self.step += 1
        self.seen += counts.sum()
        self.last_used_step.copy_(torch.where(used, self.step, self.last_used_step))
        self.last_seen.copy_(torch.where(used, self.seen, self.last_seen))
        return counts

    def window_usage(self, window: int | None = None) -> Tensor:
        """Fraction of codes used by real assignments within the last `window` training indices (default
        usage_window), rounded out to whole batches; read from the counters, so any window fits."""
        window = self.config.usage_window if window is None else window
        recent = (self.last_seen > 0) & (self.last_seen > self.seen - window)
        return recent.float().mean()

    def _entropy_weight(self) -> Tensor:
        """The annealed entropy weight at this training step, as a tensor (no host sync)."""
        cfg = self.config
        if cfg.entropy_anneal_steps == 0:
            return torch.tensor(cfg.entropy_weight, device=self.step.device)
        progress = (self.step.float() / cfg.entropy_anneal_steps).clamp(max=1.0)
        return cfg.entropy_weight * (cfg.entropy_anneal_factor + (1.0 - cfg.entropy_anneal_factor) * progress)
