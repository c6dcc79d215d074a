"""Per-image reconstruction metrics, batched in torch: PSNR and SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce


def _check_pair(preds: torch.Tensor, target: torch.Tensor, data_range: float) -> None:
    if preds.shape != target.shape or preds.ndim != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of one shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")
    if data_range not in (1, 1.0, 255, 255.0):
        raise ValueError(f"data_range must be 1 (float images in [0, 1]) or 255 (uint8 values), got {data_range}")
    for name, images in (("preds", preds), ("target", target)):
        low, high = images.min().item(), images.max().item()
        if low < 0 or high > data_range * (1 + 1e-6):
            raise ValueError(f"{name} must lie in [0, {data_range}] for data_range={data_range}, got [{low:.4g}, {high:.4g}]")


def psnr(preds: torch.Tensor, target: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB of images (B, C, H, W); inf where an image is reproduced exactly."""
    _check_pair(preds, target, data_range)
    dtype = torch.promote_types(preds.dtype if preds.is_floating_point() else torch.float32, torch.float32)
    mse = reduce((preds.to(dtype) - target.to(dtype)) ** 2, "b c h w -> b", "mean")  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


# An exact reconstruction has infinite PSNR, and one such image makes a mean infinite; 100 dB (MSE 1e-10 of the
# range squared) is far above any lossy tokenizer and keeps averages finite and comparable.
PSNR_CEILING_DB = 100.0


def capped_psnr(preds: torch.Tensor, target: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """(B,) PSNR in dB capped at PSNR_CEILING_DB: the per-image figure that evaluations average."""
    return psnr(preds, target, data_range=data_range).clamp(max=PSNR_CEILING_DB)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian: scipy.ndimage.gaussian_filter's kernel with truncate=(size-1)/(2 sigma)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return (window / window.sum()).to(dtype)


def ssim(
    preds: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """(B,) structural similarity of images (B, C, H, W), averaged over channels and valid window positions.

    Wang et al. 2004 (https://doi.org/10.1109/TIP.2003.819861) with an 11x11 Gaussian window of sigma 1.5 and
    population (not sample) covariances; equals skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=...), which also averages only the windows that fit
    inside the image. NOTE: no downsampling of large images, unlike Wang's MATLAB script; skimage does none either.
    """
    _check_pair(preds, target, data_range)
    if min(preds.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size}x{window_size} for SSIM, got {tuple(preds.shape[-2:])}")
    dtype = torch.promote_types(preds.dtype if preds.is_floating_point() else torch.float32, torch.float32)
    b, c = preds.shape[:2]
    # SSIM is invariant to scaling images, C1 and C2 together; working in [0, 1] keeps float32 variances accurate.
    x = rearrange(preds.to(dtype) / data_range, "b c h w -> (b c) 1 h w")
    y = rearrange(target.to(dtype) / data_range, "b c h w -> (b c) 1 h w")
    window = gaussian_window(window_size, sigma, dtype).to(preds.device)
    row, col = rearrange(window, "k -> 1 1 1 k"), rearrange(window, "k -> 1 1 k 1")

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, 'valid' positions only: (N, 1, H-10, W-10)
        return F.conv2d(F.conv2d(z, row), col)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2  # (K1 L)^2, (K2 L)^2 with L = 1 after the rescaling
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return reduce(ssim_map, "(b c) 1 h w -> b", "mean", b=b, c=c)
