"""Family-agnostic evaluation of priors: NLL where the family defines one, token statistics of samples.

The token-statistics distance compares what a prior samples with the tokens it was trained on without
any image model: total-variation distance between the code frequencies (unigram) and between the
frequencies of neighbouring code pairs, right and down neighbours separately. It needs no Inception
weights, so it works offline; its noise floor is the same distance between two real token sets of the
sizes compared (benchmarks/prior_quality.py reports both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.prior.ids import check_id_range
from vqgan.prior.maskgit import MaskGITPrior


def unigram_frequencies(tokens: Tensor, num_codes: int) -> Tensor:
    """(N, h, w) tokens -> (K,) float64 code frequencies (sum 1)."""
    counts = torch.bincount(tokens.flatten().long().cpu(), minlength=num_codes).double()
    return counts / counts.sum().clamp_min(1)


def pair_frequencies(tokens: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """(N, h, w) tokens -> (K, K) frequencies of (z[r, c], z[r, c + 1]) and of (z[r, c], z[r + 1, c])."""
    tokens = tokens.long().cpu()

    def table(a: Tensor, b: Tensor) -> Tensor:
        counts = torch.bincount((a * num_codes + b).flatten(), minlength=num_codes * num_codes).double()
        return (counts / counts.sum().clamp_min(1)).view(num_codes, num_codes)

    return table(tokens[:, :, :-1], tokens[:, :, 1:]), table(tokens[:, :-1], tokens[:, 1:])


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def token_statistics_distance(samples: Tensor, reference: Tensor, num_codes: int) -> dict[str, float]:
    """(N, h, w) and (M, h, w) token grids -> TV distances {unigram, pair_right, pair_down, pair (their mean)}."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} grids differ")
    for name, tokens in (("samples", samples), ("reference", reference)):
        check_id_range(tokens, num_codes, f"{name} token")
    right_s, down_s = pair_frequencies(samples, num_codes)
    right_r, down_r = pair_frequencies(reference, num_codes)
    distances = {
        "unigram": total_variation(unigram_frequencies(samples, num_codes), unigram_frequencies(reference, num_codes)),
        "pair_right": total_variation(right_s, right_r),
        "pair_down": total_variation(down_s, down_r),
    }
    distances["pair"] = (distances["pair_right"] + distances["pair_down"]) / 2
    return distances


def has_likelihood(model: nn.Module) -> bool:
    """Autoregressive priors factorize p(z) and give an exact NLL; MaskGIT's masked objective does not."""
    return not isinstance(model, MaskGITPrior)


@torch.no_grad()
def nll_bits_per_token(model: nn.Module, tokens: Tensor, labels: Tensor | None = None,
                       batch_size: int = 64) -> float | None:
    """Exact NLL (bits/token) of (N, h, w) grids under an autoregressive prior; None where undefined (MaskGIT)."""
    if not has_likelihood(model):
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for begin in range(0, len(tokens), batch_size):
        grids = tokens[begin : begin + batch_size].to(device)
        batch_labels = None if labels is None else labels[begin : begin + batch_size].to(device)
        logits = model(grids, batch_labels)                                                  # (B, K, h, w)
        total += float(F.cross_entropy(logits.float(), grids, reduction="sum"))
        count += grids.numel()
    model.train(was_training)
    return total / max(count, 1) / math.log(2)
