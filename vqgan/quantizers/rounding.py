"""GridQuantizer: the forward of the kinds whose codes are an implicit grid (fsq, lfq), assembled from
the grid a kind chooses (grids.py), an optional commitment weight and MAGVIT-v2's entropy penalty,
exact per channel and per group of channels (product_entropy.py): no (K, c) table exists at any point.

One forward: the grid's bound -> round to the grid (non-finite rows searched as 0, kept non-finite in the
output so they reach the task loss) -> straight-through -> beta * commitment + weight * entropy ->
usage counters (training mode). fp32 under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import KindConfig
from vqgan.quantizers.entropy import histogram, perplexity
from vqgan.quantizers.grids import Grid
from vqgan.quantizers.product_entropy import grid_entropy_terms


class GridQuantizer(Quantizer):
    """Rounding to an implicit grid; `beta`: weight of the commitment term ||z - sg[q]||^2, or None."""

    def __init__(self, config: KindConfig, grid: Grid, beta: float | None):
        super().__init__(config)
        self.grid = grid
        self.beta = beta
        grid.register(self)

    def prepare_rows(self, h: Tensor) -> Tensor:
        return self.grid.prepare_rows(self, h)

    def search(self, h: Tensor) -> Tensor:
        return self.grid.search(self, h)

    def codes_for(self, indices: Tensor) -> Tensor:
        return self.grid.codes_for(self, indices)

    def entropy(self, rows: Tensor) -> Tensor:
        """(N, c) prepared rows -> mean per-sample entropy minus the grouped batch entropy of
        softmax(-||row - c||^2 / T) over the grid's codes c."""
        cfg = self.config
        per_sample, batch = grid_entropy_terms(rows, self.grid.level_values(rows), cfg.entropy_temperature,
                                               cfg.entropy_group_bits, cfg.chunk_size)
        return per_sample - batch

    def forward(self, z: Tensor) -> QuantizerOutput:
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.to_lookup_space(flat)  # (N, c) fp32
        with torch.autocast(device_type=z.device.type, enabled=False):
            rows = self.prepare_rows(h)  # (N, c)
            finite = torch.isfinite(rows.detach()).all(dim=1)
            indices = self.search(torch.where(finite.unsqueeze(1), rows.detach(), 0.0))  # (N,)
            codes = self.codes_for(indices)  # (N, c)
            out = self.grid.pass_through(self, rows, codes)
            zero = rows.new_zeros(())
            commitment_loss = F.mse_loss(rows, codes) if self.beta is not None else zero
            entropy_loss, loss = zero, zero
            if cfg.entropy_weight > 0:
                entropy_loss = self.entropy(rows)
            if self.beta is not None:
                loss = self.beta * commitment_loss + self._entropy_weight() * entropy_loss
            elif cfg.entropy_weight > 0:
                loss = self._entropy_weight() * entropy_loss
            batch_perplexity = perplexity(histogram(indices, cfg.num_codes))
            if self.training:
                self._count(indices, finite)
            usage = self.window_usage()
        return self._output(z, out, indices, loss=loss, codebook_loss=zero, commitment_loss=commitment_loss,
                            entropy_loss=entropy_loss, perplexity=batch_perplexity, usage=usage)
