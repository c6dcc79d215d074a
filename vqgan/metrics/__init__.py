"""Evaluation metrics: FID (fid.py, inception.py), PSNR/SSIM (image_metrics.py), codebook figures (plots.py).

plots.py is not imported here: it selects matplotlib's Agg backend, a side effect only its users should get.
"""

from vqgan.metrics.fid import (
    FeatureStatistics,
    FIDStats,
    accumulate_features,
    fid_from_stats,
    frechet_distance,
    load_stats,
    save_stats,
)
from vqgan.metrics.image_metrics import psnr, ssim
from vqgan.metrics.inception import ExtractorIdentity, InceptionFeatures, load_inception, resolve_weights_path

__all__ = [
    "ExtractorIdentity",
    "FIDStats",
    "FeatureStatistics",
    "InceptionFeatures",
    "accumulate_features",
    "fid_from_stats",
    "frechet_distance",
    "load_inception",
    "load_stats",
    "psnr",
    "resolve_weights_path",
    "save_stats",
    "ssim",
]
