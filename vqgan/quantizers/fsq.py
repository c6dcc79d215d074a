"""kind="fsq": Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple", arXiv:2309.15505; the quantizer of NVIDIA Cosmos' discrete tokenizers).

Each of the c = len(levels) channels is bounded by a shifted tanh to L_i values and rounded with a
straight-through gradient; the index is the mixed-radix number of the c digits (grids.ScalarLevels).
There is no codebook to learn: every code is a point of the grid. The one optional loss is MAGVIT-v2's
entropy penalty (entropy_weight > 0), exact per channel and per group of channels (`product_entropy`;
LFQ is its two-level case): FSQ alone has nothing that spreads its use over the grid, so over a short
window an MSE-trained FSQ leaves its rare corner codes unused (benchmarks/results/quantizer_fidelity.md).
"""

from __future__ import annotations

from torch import Tensor

from vqgan.quantizers.config import FSQConfig, KindConfig, QuantizerConfig, as_kind_config
from vqgan.quantizers.grids import ScalarLevels
from vqgan.quantizers.rounding import GridQuantizer


class FiniteScalarQuantizer(GridQuantizer):
    """Bounded rounding to fixed levels per channel; no commitment term."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        cfg: FSQConfig = as_kind_config(config)
        super().__init__(cfg, ScalarLevels(cfg.levels), beta=None)

    @property
    def half_width(self) -> Tensor:
        """(c,) L_i // 2: rows in level units over this are rows in code units."""
        return ScalarLevels.half_width(self)
