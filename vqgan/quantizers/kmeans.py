"""k-means for codebook initialisation (SoundStream, arXiv:2107.03312): k-means++ seeding in a few
rounds, then Lloyd iterations; every distance through the exact chunked search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqgan.quantizers.search import nearest_code


@torch.no_grad()
def kmeans_plus_plus(x: Tensor, num_clusters: int, chunk_size: int, rounds: int = 64) -> Tensor:
    """(N, d) -> (num_clusters,) row indices of x seeded by D^2 sampling, in at most `rounds` rounds.

    k-means++ (Arthur & Vassilvitskii 2007) draws one centre per pass: K passes, ~30 s at K = 16384 on CPU.
    Drawing ceil(K / rounds) centres per pass from the same D^2 weights (as k-means||, Bahmani et al.
    2012, oversamples) costs about one Lloyd step in all, and is exact k-means++ when K <= rounds.
    """
    n = x.shape[0]
    if n <= num_clusters:  # every point becomes a centre; the rest duplicate (restarted later)
        extra = torch.randint(n, (num_clusters - n,), device=x.device)
        return torch.cat([torch.randperm(n, device=x.device), extra])
    picks = [torch.randint(n, (1,), device=x.device)]
    min_dist = (x - x[picks[0]]).square().sum(dim=1)  # (N,) squared distance to the nearest centre
    per_round = -(-(num_clusters - 1) // rounds)
    remaining = num_clusters - 1
    while remaining > 0:
        take = min(per_round, remaining)
        # The floor keeps every weight positive, so `take` distinct rows always exist (n > K).
        weights = min_dist + min_dist.max().clamp_min(1.0) * 1e-12
        new = torch.multinomial(weights, take, replacement=False)  # (take,)
        centres = x[new]  # (take, d)
        nearest = centres[nearest_code(x, centres, chunk_size)]  # (N, d)
        torch.minimum(min_dist, (x - nearest).square().sum(dim=1), out=min_dist)
        picks.append(new)
        remaining -= take
    return torch.cat(picks)


@torch.no_grad()
def kmeans(x: Tensor, num_clusters: int, iters: int, chunk_size: int, spherical: bool = False) -> Tensor:
    """(N, d) -> (num_clusters, d) centres: k-means++ seeding, then `iters` Lloyd iterations.

    With fewer points than clusters the extra centres duplicate points; they stay unused and the
    dead-code restart reseeds them later. `spherical` renormalises the centres (cosine codes).
    """
    x = x.float()
    centres = x[kmeans_plus_plus(x, num_clusters, chunk_size)].clone()  # (K, d)
    for _ in range(iters):
        assign = nearest_code(x, centres, chunk_size)  # (N,)
        counts = torch.bincount(assign, minlength=num_clusters)  # (K,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (K, d)
        means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        if spherical:
            means = F.normalize(means, dim=1)
        centres = torch.where((counts > 0).unsqueeze(1), means, centres)  # empty cluster keeps its centre
    return centres
