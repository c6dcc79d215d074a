"""kind="ibq": Index Backpropagation Quantization (Shi et al. 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", arXiv:2412.02692).

The index is the argmax of the inner products z.e over the K codes. The output's value is the
selected code; its gradient is that of softmax(z E^T) E, so every code (not only the selected ones)
and z receive gradient from the task: the whole codebook keeps being trained. The (rows, K) softmax
is computed in chunks of rows under activation checkpointing, so neither forward nor backward holds
an (N, K) matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vqgan.quantize_utils import chunk_rows, entropy_penalty, nearest_code
from vqgan.quantizers.vq import VectorQuantizer


def _soft_codes(h: Tensor, codes: Tensor) -> Tensor:
    """(r, c), (K, c) -> (r, c) softmax(h E^T) E."""
    return torch.softmax(h @ codes.t(), dim=1) @ codes


def soft_codes_chunked(h: Tensor, codes: Tensor, chunk_size: int) -> Tensor:
    """(N, c), (K, c) -> (N, c) softmax(h E^T) E, chunk by chunk; backward recomputes each chunk."""
    rows = chunk_rows(h.shape[0], codes.shape[0], codes.shape[1], chunk_size, h.device)
    parts = [checkpoint(_soft_codes, h[s : s + rows], codes, use_reentrant=False) for s in range(0, h.shape[0], rows)]
    return torch.cat(parts)


class IndexBackpropQuantizer(VectorQuantizer):
    """Inner-product argmax with a softmax straight-through that reaches every code."""

    uses_kmeans = False

    def search(self, h: Tensor) -> Tensor:
        return nearest_code(h, self.codebook.detach(), self.config.chunk_size, inner_product=True)

    def export_search(self, h: Tensor) -> Tensor:
        return (h @ self.codebook.float().t()).argmax(dim=1)

    def _search_codes(self, h: Tensor, codes: Tensor) -> Tensor:
        return nearest_code(h, codes, self.config.chunk_size, inner_product=True)

    def _estimator(self, h: Tensor, h_q: Tensor, codes: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        commitment = F.mse_loss(h, h_q.detach())
        if not torch.is_grad_enabled() or not (h.requires_grad or codes.requires_grad):
            return h_q, F.mse_loss(h_q, h.detach()), commitment
        soft = soft_codes_chunked(h, codes, self.config.chunk_size)  # (N, c)
        # value exactly h_q (x - x == 0), gradient of the soft assignment (IBQ's hard - sg(soft) + soft)
        out = h_q.detach() + (soft - soft.detach())
        # IBQ's codebook term: its z_q carries the soft path, so every code is pulled towards the data
        codebook = F.mse_loss(h_q + (soft - soft.detach()), h.detach())
        return out, codebook, commitment

    def _entropy(self, h: Tensor, codes: Tensor) -> Tensor:
        return entropy_penalty(h, codes, self.config.entropy_temperature, self.config.chunk_size, inner_product=True)
