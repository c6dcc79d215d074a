"""kind="lfq": Lookup-Free Quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats Diffusion",
arXiv:2310.05737, sec. 3.1; Open-MAGVIT2, Luo et al. 2024, arXiv:2409.04410).

Each of the b = log2 K channels is quantized to its sign (+1 / -1) with a straight-through gradient;
the index is the binary number of the signs, first channel = least significant bit (as Open-MAGVIT2's
`2 ** arange(bits)` mask, so its indices and ours agree).
The entropy penalty is E[H(q(z))] - H(E[q(z)]) with q the softmax of -||z - c||^2 / T over the 2^b
codes c. That distribution factorises over bits (p_i(+1) = sigmoid(4 z_i / T)), so:
  - the per-sample entropy is the sum of b binary entropies (exact, O(N b));
  - the batch entropy is computed over groups of at most entropy_group_bits bits, each exactly over
    its 2^g codes and summed (Open-MAGVIT2's token factorisation; exact when b <= entropy_group_bits, an
    upper bound otherwise). No (K, b) table exists at any point: a group's table is (2^g, g).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vqgan.quantize_utils import chunk_rows, histogram, perplexity
from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import QuantizerConfig


def code_bits(num_bits: int, device: torch.device) -> Tensor:
    """(2^g, g) float 0/1 table of every g-bit code, column i = bit i."""
    codes = torch.arange(2**num_bits, device=device)
    shifts = torch.arange(num_bits, device=device)
    return ((codes.unsqueeze(1) >> shifts) & 1).float()


def _group_probability_sum(log_plus: Tensor, log_minus: Tensor, table: Tensor) -> Tensor:
    """(r, g) log p(+1), log p(-1) per bit, (2^g, g) table -> (2^g,) summed code probabilities."""
    log_p = log_plus @ table.t() + log_minus @ (1.0 - table).t()  # (r, 2^g)
    return log_p.exp().sum(dim=0)


def lfq_entropy_terms(h: Tensor, temperature: float, group_bits: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(N, b) -> (mean per-sample entropy, batch entropy over groups of <= group_bits bits), in nats."""
    logits = 4.0 * h / temperature  # (N, b): log p(+1) - log p(-1) for each bit
    log_plus, log_minus = F.logsigmoid(logits), F.logsigmoid(-logits)
    per_sample = -(log_plus.exp() * log_plus + log_minus.exp() * log_minus).sum(dim=1).mean()
    n, bits = h.shape
    batch = h.new_zeros(())
    for start in range(0, bits, group_bits):
        stop = min(bits, start + group_bits)
        table = code_bits(stop - start, h.device)  # (2^g, g)
        rows = chunk_rows(n, table.shape[0], stop - start, chunk_size, h.device)
        total = sum(
            checkpoint(_group_probability_sum, log_plus[s : s + rows, start:stop], log_minus[s : s + rows, start:stop],
                       table, use_reentrant=False)
            for s in range(0, n, rows)
        )
        avg = total / n  # (2^g,)
        # clamped log: xlogy's gradient at an exactly empty code would be -inf * 0 = NaN
        batch = batch - (avg * avg.clamp_min(1e-30).log()).sum()
    return per_sample, batch


class LookupFreeQuantizer(Quantizer):
    """Sign bits with a straight-through gradient, a commitment term and the factorised entropy penalty."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        bits = config.bits
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)  # (b,) channel i = bit i

    def search(self, h: Tensor) -> Tensor:
        return ((h > 0).long() * self.powers).sum(dim=1)

    def codes_for(self, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(1) // self.powers) % 2  # (N, b)
        return bits.float() * 2.0 - 1.0

    def forward(self, z: Tensor) -> QuantizerOutput:
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.project_in(flat) if self.project_in is not None else flat  # (N, b)
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = h.float()
            finite = torch.isfinite(h.detach()).all(dim=1)
            indices = self.search(torch.where(finite.unsqueeze(1), h.detach(), 0.0))  # (N,)
            h_q = self.codes_for(indices)  # (N, b) in {-1, +1}
            out = h_q + (h - h.detach())  # value exactly h_q, identity gradient
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
            usage = self._window_usage()
        return self._output(z, out, indices, loss=loss, codebook_loss=zero, commitment_loss=commitment_loss,
                            entropy_loss=entropy_loss, perplexity=batch_perplexity, usage=usage)
