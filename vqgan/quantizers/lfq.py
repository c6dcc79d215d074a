"""kind="lfq": Lookup-Free Quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats Diffusion",
arXiv:2310.05737, sec. 3.1; Open-MAGVIT2, Luo et al. 2024, arXiv:2409.04410).

Each of the b = log2 K channels is quantized to its sign (+1 / -1) with a straight-through gradient;
the index is the binary number of the signs, first channel = least significant bit (as Open-MAGVIT2's
`2 ** arange(bits)` mask, so its indices and ours agree).
The entropy penalty is E[H(q(z))] - H(E[q(z)]) with q the softmax of -||z - c||^2 / T over the 2^b
codes c. That distribution factorises over bits, so the per-sample entropy is exact per bit and the
batch entropy exact per group of at most entropy_group_bits bits (`product_entropy`): no (K, b) table
exists at any point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import KindConfig, QuantizerConfig
from vqgan.quantizers.entropy import histogram, perplexity
from vqgan.quantizers.estimators import straight_through
from vqgan.quantizers.product_entropy import channel_log_probs, product_entropy_terms


def lfq_entropy_terms(h: Tensor, temperature: float, group_bits: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(N, b) -> (mean per-sample entropy, batch entropy over groups of <= group_bits bits), in nats."""
    levels = [h.new_tensor([-1.0, 1.0])] * h.shape[1]  # digit 0 = -1, digit 1 = +1 (bit i of the index)
    return product_entropy_terms(channel_log_probs(h, levels, temperature), group_bits, chunk_size)


class LookupFreeQuantizer(Quantizer):
    """Sign bits with a straight-through gradient, a commitment term and the factorised entropy penalty."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        super().__init__(config)
        bits = self.config.bits
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)  # (b,) channel i = bit i

    def search(self, h: Tensor) -> Tensor:
        return ((h > 0).long() * self.powers).sum(dim=1)

    def codes_for(self, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(1) // self.powers) % 2  # (N, b)
        return bits.float() * 2.0 - 1.0

    def forward(self, z: Tensor) -> QuantizerOutput:
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.to_lookup_space(flat)  # (N, b) fp32
        with torch.autocast(device_type=z.device.type, enabled=False):
            finite = torch.isfinite(h.detach()).all(dim=1)
            indices = self.search(torch.where(finite.unsqueeze(1), h.detach(), 0.0))  # (N,)
            h_q = self.codes_for(indices)  # (N, b) in {-1, +1}
            out = straight_through(h, h_q)  # value exactly h_q, identity gradient
            commitment_loss = F.mse_loss(h, h_q)
            zero = h.new_zeros(())
            entropy_loss = zero
            if cfg.entropy_weight > 0:
                per_sample, batch = lfq_entropy_terms(h, cfg.entropy_temperature, cfg.entropy_group_bits,
                                                      cfg.chunk_size)
                entropy_loss = per_sample - batch
            loss = cfg.beta * commitment_loss + self._entropy_weight() * entropy_loss
            batch_perplexity = perplexity(histogram(indices, cfg.num_codes))
            if self.training:
                self._count(indices, finite)
            usage = self.window_usage()
        return self._output(z, out, indices, loss=loss, codebook_loss=zero, commitment_loss=commitment_loss,
                            entropy_loss=entropy_loss, perplexity=batch_perplexity, usage=usage)
