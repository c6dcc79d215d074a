"""kind="fsq": Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple", arXiv:2309.15505; the quantizer of NVIDIA Cosmos' discrete tokenizers).

Each of the c = len(levels) channels is bounded by a shifted tanh to L_i values and rounded with a
straight-through gradient; the index is the mixed-radix number of the c digits. There is no codebook
to learn: every code is a point of the grid. The one optional loss is MAGVIT-v2's entropy penalty
(entropy_weight > 0), exact per channel and per group of channels (`product_entropy`; LFQ is its
two-level case): FSQ alone has nothing that spreads its use over the grid, so over a short window an
MSE-trained FSQ leaves its rare corner codes unused (benchmarks/results/quantizer_fidelity.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import KindConfig, QuantizerConfig
from vqgan.quantizers.entropy import histogram, perplexity
from vqgan.quantizers.product_entropy import channel_log_probs, product_entropy_terms

# tanh's range is widened by this much so that its end points round to the outer levels, and the even-L
# shift atanh(0.5 / half) stays finite at L = 2 (as vector-quantize-pytorch; the paper's code uses tan).
_BOUND_EPS = 1e-3


class FiniteScalarQuantizer(Quantizer):
    """Bounded rounding to fixed levels per channel; index = mixed-radix digits (first channel lowest)."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        super().__init__(config)
        levels = torch.tensor(self.config.levels, dtype=torch.long)  # (c,)
        # Non-persistent: derived from the config, not state (a checkpoint stays the same across versions).
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0),
                             persistent=False)  # (c,) place value of each digit

    @property
    def half_width(self) -> Tensor:
        return (self.levels // 2).float()  # (c,)

    def prepare_rows(self, h: Tensor) -> Tensor:
        """(N, c) -> (N, c) bounded so that rounding gives exactly L_i values per channel."""
        levels = self.levels.float()
        half = (levels - 1.0) * (1.0 + _BOUND_EPS) / 2.0
        offset = torch.where(self.levels % 2 == 1, 0.0, 0.5)  # even L: the grid is shifted by a half
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def search(self, h: Tensor) -> Tensor:
        digits = torch.round(h).long() + self.levels // 2  # (N, c) in [0, L_i)
        return (digits * self.basis).sum(dim=1)

    def codes_for(self, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(1) // self.basis) % self.levels  # (N, c)
        return (digits - self.levels // 2).float() / self.half_width

    def forward(self, z: Tensor) -> QuantizerOutput:
        flat = self._flatten_checked(z)  # (N, D)
        h = self.to_lookup_space(flat)  # (N, c) fp32
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.prepare_rows(h)  # (N, c)
            finite = torch.isfinite(bounded.detach()).all(dim=1)
            safe = torch.where(finite.unsqueeze(1), bounded.detach(), 0.0)
            indices = self.search(safe)  # (N,)
            # value exactly codes_for(indices) (x - x == 0), identity gradient to the bounded rows
            out = self.codes_for(indices) + (bounded - bounded.detach()) / self.half_width
            zero = bounded.new_zeros(())
            entropy_loss, loss = zero, zero
            if self.config.entropy_weight > 0:
                entropy_loss = self._entropy(bounded)
                loss = self._entropy_weight() * entropy_loss
            batch_perplexity = perplexity(histogram(indices, self.config.num_codes))
            if self.training:
                self._count(indices, finite)
            usage = self.window_usage()
        # A non-finite row stays non-finite in `out` (NaN - NaN), so it reaches the task loss.
        return self._output(z, out, indices, loss=loss, codebook_loss=zero, commitment_loss=zero,
                            entropy_loss=entropy_loss, perplexity=batch_perplexity, usage=usage)

    def _entropy(self, bounded: Tensor) -> Tensor:
        """Mean per-sample entropy minus the grouped batch entropy of softmax(-||b - c||^2 / T) over the grid."""
        cfg = self.config
        values = [torch.arange(level, device=bounded.device) - level // 2 for level in cfg.levels]  # digit - L // 2
        values = [v.to(bounded.dtype) for v in values]
        log_probs = channel_log_probs(bounded, values, cfg.entropy_temperature)
        per_sample, batch = product_entropy_terms(log_probs, cfg.entropy_group_bits, cfg.chunk_size)
        return per_sample - batch
