"""Frechet Inception Distance: streaming feature statistics, their files, and the Frechet distance.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), Heusel et al. 2017 (https://arxiv.org/abs/1706.08500),
computed as TTUR / pytorch-fid do (https://github.com/bioinf-jku/TTUR, https://github.com/mseitzer/pytorch-fid).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from vqgan.metrics.inception import ExtractorIdentity
from vqgan.utils import atomic_write_bytes, is_distributed


class FeatureStatistics:
    """Running float64 sum of x, sum of x x^T and count: mergeable and all-reducible, exact up to rounding.

    Sums (rather than Welford updates) make a multi-process merge a plain all-reduce of three tensors. The
    cancellation in sum(x x^T)/n - mu mu^T costs about eps64 * E[x^2] / Var[x] relative, ~1e-15 for
    Inception features, far below what FID can resolve.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # a tensor so that it all-reduces too

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {tuple(features.shape)}")
        x = features.to(device=self.total.device, dtype=torch.float64)  # (B, D)
        self.total += x.sum(dim=0)
        self.outer.addmm_(x.T, x)  # += x^T x, (D, D)
        self.count += x.shape[0]

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add another accumulator's sums into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.total += other.total.to(self.total.device)
        self.outer += other.outer.to(self.outer.device)
        self.count += other.count.to(self.count.device)
        return self

    def all_reduce(self) -> FeatureStatistics:
        """Sum the accumulators of all processes (no-op in a single process) and return self.

        With each process holding the disjoint shard i::world of the images (no padding), the sum is exactly the
        statistics of the full set: no duplicated tail samples, and O(D^2) traffic independent of the image count.
        """
        if is_distributed():
            for tensor in (self.total, self.outer, self.count):
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return self

    def mean(self) -> np.ndarray:
        """(D,) float64 mean."""
        n = self._checked_count(1)
        return (self.total / n).cpu().numpy()

    def covariance(self) -> np.ndarray:
        """(D, D) float64 unbiased covariance (ddof=1), as np.cov(features, rowvar=False)."""
        n = self._checked_count(2)
        mu = self.total / n  # (D,)
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)  # (D, D)
        return ((cov + cov.T) / 2).cpu().numpy()  # symmetric by construction; rounding in the gemm is not

    def _checked_count(self, minimum: int) -> int:
        n = int(self.count.item())
        if n < minimum:
            raise ValueError(f"need at least {minimum} feature vectors for these statistics, have {n}")
        return n

    def to_stats(self, extractor: ExtractorIdentity, source: str = "") -> FIDStats:
        return FIDStats(self.mean(), self.covariance(), int(self.count.item()), extractor, source)


@dataclass(frozen=True, eq=False)  # arrays have no scalar ==
class FIDStats:
    """Mean (D,), covariance (D, D) and count of a feature set, with the extractor that produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: ExtractorIdentity
    source: str = ""  # what the images were (source, split, protocol), so a reference cannot be mixed up


def save_stats(path: str | Path, stats: FIDStats) -> Path:
    """Write an .npz with mu, sigma, count and the extractor identity (name, layer, weights sha256)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz, got {path}")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mu=stats.mu.astype(np.float64),
        sigma=stats.sigma.astype(np.float64),
        count=np.int64(stats.count),
        extractor_name=np.str_(stats.extractor.name),
        feature_layer=np.str_(stats.extractor.layer),
        weights_sha256=np.str_(stats.extractor.weights_sha256),
        source=np.str_(stats.source),
    )
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_stats(path: str | Path, expected: ExtractorIdentity | None = None) -> FIDStats:
    """Read a file written by `save_stats`; with `expected`, refuse statistics from another feature extractor."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        required = ("mu", "sigma", "count", "extractor_name", "feature_layer", "weights_sha256")
        missing = [key for key in required if key not in data.files]
        if missing:
            raise ValueError(
                f"{path} lacks {missing} (has {data.files}); only statistics written by vqgan-fid --save-stats "
                "record the feature extractor, and FID across extractors is meaningless"
            )
        identity = ExtractorIdentity(str(data["extractor_name"]), str(data["feature_layer"]), str(data["weights_sha256"]))
        source = str(data["source"]) if "source" in data.files else ""  # files before the field: unknown
        stats = FIDStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["count"]), identity,
                         source)
    if expected is not None and identity != expected:
        raise ValueError(
            f"{path} holds statistics from another feature extractor:\n  file:    {identity.describe()}\n"
            f"  current: {expected.describe()}\nrecompute them with the current weights (--save-stats)"
        )
    return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, as pytorch-fid / TTUR compute it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected mu (D,) and sigma (D, D) of one D, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # NOTE: scipy warns when S1 S2 is singular, which it always is with fewer samples than dimensions.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # pytorch-fid's fallback: a tiny ridge makes the product non-singular.
            warnings.warn(f"singular product of covariances; adding {eps} to their diagonals", stacklevel=2)
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # S1 S2 has real non-negative eigenvalues, so an imaginary part is numerical error; refuse a large one.
        # NOTE: pytorch-fid's bound is an absolute 1e-3, tuned to real Inception features (diagonal ~ 0.1-1);
        # we scale it by the diagonal's magnitude so that features of another scale get the same relative check.
        diagonal = np.diagonal(covmean)
        largest, scale = np.max(np.abs(diagonal.imag)), max(1.0, np.max(np.abs(diagonal.real)))
        if largest > 1e-3 * scale:
            raise ValueError(
                f"matrix square root has an imaginary component of {largest:.3g} (diagonal up to {scale:.3g}): "
                "the covariances are too degenerate for a Frechet distance"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(stats1: FIDStats, stats2: FIDStats) -> float:
    """FID of two statistics, refusing to compare features from different extractors."""
    if stats1.extractor != stats2.extractor:
        raise ValueError(
            f"statistics come from different feature extractors:\n  1: {stats1.extractor.describe()}\n"
            f"  2: {stats2.extractor.describe()}"
        )
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def accumulate_features(
    batches: Iterable[torch.Tensor],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> FeatureStatistics:
    """Stream uint8 image batches (B, 3, H, W) through `extractor` into float64 statistics on `device`.

    `batches` is any iterable: a DataLoader shard, a tokenizer's reconstructions, a prior's samples. Call
    `.all_reduce()` on the result when several processes each streamed a shard.
    """
    stats = FeatureStatistics(dim, device)
    with torch.inference_mode():
        for images in batches:
            features = extractor(images.to(device, non_blocking=True))  # (B, D)
            stats.update(features)
            if on_batch is not None:
                on_batch(images.shape[0])
    return stats
