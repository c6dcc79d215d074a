"""kind="lfq": Lookup-Free Quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats Diffusion",
arXiv:2310.05737, sec. 3.1; Open-MAGVIT2, Luo et al. 2024, arXiv:2409.04410).

Each of the b = log2 K channels is quantized to its sign (+1 / -1) with a straight-through gradient;
the index is the binary number of the signs, first channel = least significant bit (as Open-MAGVIT2's
`2 ** arange(bits)` mask, so its indices and ours agree; grids.SignBits).
The entropy penalty is E[H(q(z))] - H(E[q(z)]) with q the softmax of -||z - c||^2 / T over the 2^b
codes c. That distribution factorises over bits, so the per-sample entropy is exact per bit and the
batch entropy exact per group of at most entropy_group_bits bits (`product_entropy`): no (K, b) table
exists at any point. The commitment term ||z - sg[q]||^2 has weight beta.
"""

from __future__ import annotations

from torch import Tensor

from vqgan.quantizers.config import KindConfig, LFQConfig, QuantizerConfig, as_kind_config
from vqgan.quantizers.grids import SignBits
from vqgan.quantizers.product_entropy import grid_entropy_terms
from vqgan.quantizers.rounding import GridQuantizer


def lfq_entropy_terms(h: Tensor, temperature: float, group_bits: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(N, b) -> (mean per-sample entropy, batch entropy over groups of <= group_bits bits), in nats."""
    return grid_entropy_terms(h, SignBits(h.shape[1]).level_values(h), temperature, group_bits, chunk_size)


class LookupFreeQuantizer(GridQuantizer):
    """Sign bits with a straight-through gradient, a commitment term and the factorised entropy penalty."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        cfg: LFQConfig = as_kind_config(config)
        super().__init__(cfg, SignBits(cfg.bits), beta=cfg.beta)
