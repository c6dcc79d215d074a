"""Entropies of code distributions: the MAGVIT-v2 penalty over a codebook's softmax, the entropy of a
probability vector, and the perplexity of a code histogram. (Product-grid kinds: product_entropy.py.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqgan.quantizers.search import squared_distances


def entropy_penalty(z: Tensor, codes: Tensor, temperature: float, max_rows: int, inner_product: bool = False) -> Tensor:
    """Mean per-sample entropy minus entropy of the batch-average code distribution (scalar).

    Distributions are softmax(-||z - e||^2 / temperature) over the K codes (softmax(z.e / temperature)
    with inner_product, as IBQ). Minimising it makes each
    assignment confident and the batch spread over the codebook (MAGVIT-v2, arXiv:2310.05737, sec. 3.1).
    At most `max_rows` evenly spaced rows are used, deterministic, so the (rows, K) matrix and its
    backward stay bounded by the chunk size whatever N is.
    """
    n = z.shape[0]
    if n > max_rows:
        z = z[torch.arange(max_rows, device=z.device) * n // max_rows]  # (max_rows, d)
    logits = z @ codes.t() if inner_product else -squared_distances(z, codes)  # (n, K)
    log_p = F.log_softmax(logits / temperature, dim=1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(dim=1).mean()
    return per_sample - distribution_entropy(p.mean(dim=0))


def distribution_entropy(p: Tensor) -> Tensor:
    """(K,) probabilities -> their entropy in nats, with a finite gradient at exactly empty entries.

    The log is clamped: xlogy's gradient at p = 0 (a code a sharp softmax leaves empty) is -inf * 0 = NaN.
    """
    return -(p * p.clamp_min(1e-30).log()).sum()


def perplexity(counts: Tensor) -> Tensor:
    """(K,) code histogram -> exp(entropy) of it: K for uniform use, 1 for a single code."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.xlogy(p, p).sum())


def histogram(indices: Tensor, bins: int) -> Tensor:
    """(N,) ints in [0, bins) -> (bins,) int64 counts, without a host sync.

    torch.bincount on CUDA reads the input's min and max back to the host to size its output (two
    syncs); a scatter-add into a fixed-size buffer needs none (and integer adds are exact in any order).
    """
    flat = indices.reshape(-1)
    return torch.zeros(bins, dtype=torch.long, device=indices.device).scatter_add_(0, flat, torch.ones_like(flat))
