"""Codebook and sample figures as PNG files: t-SNE of the codes, code-usage curve, captioned image grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

MAX_TSNE_CODES = 4096  # t-SNE is O(K log K) per iteration at best; beyond this it takes minutes on a CPU


def _as_numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _check_counts(counts: np.ndarray, num_codes: int | None = None) -> None:
    if counts.ndim != 1 or (num_codes is not None and counts.shape[0] != num_codes):
        raise ValueError(f"expected counts ({num_codes if num_codes is not None else 'K'},), got {counts.shape}")
    if (counts < 0).any():
        raise ValueError("code counts must be non-negative")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_codebook_tsne(
    codebook, counts, path: str | Path, max_codes: int = MAX_TSNE_CODES, seed: int = 0, iterations: int = 1000
) -> Path:
    """t-SNE of code vectors (K, D), coloured by log usage frequency; dead codes (count 0) drawn as red x."""
    from sklearn.manifold import TSNE

    codes, counts = _as_numpy(codebook).astype(np.float64), _as_numpy(counts).astype(np.float64)
    if codes.ndim != 2:
        raise ValueError(f"expected a codebook (K, D), got {codes.shape}")
    _check_counts(counts, codes.shape[0])
    if codes.shape[0] < 4:
        raise ValueError(f"t-SNE needs at least 4 codes, got {codes.shape[0]}")
    num_codes = codes.shape[0]
    title = f"codebook t-SNE: {num_codes} codes"
    if num_codes > max_codes:
        keep = np.sort(np.random.default_rng(seed).choice(num_codes, max_codes, replace=False))
        codes, counts = codes[keep], counts[keep]
        title = f"codebook t-SNE: random {max_codes} of {num_codes} codes"
    perplexity = min(30.0, (codes.shape[0] - 1) / 3)  # sklearn requires perplexity < n_samples
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=iterations, random_state=seed)
    xy = tsne.fit_transform(codes)  # (K, 2)
    frequency = counts / max(counts.sum(), 1.0)
    dead = counts == 0
    fig, ax = plt.subplots(figsize=(7, 6))
    if (~dead).any():
        points = ax.scatter(xy[~dead, 0], xy[~dead, 1], c=np.log10(frequency[~dead]), cmap="viridis", s=12)
        fig.colorbar(points, ax=ax, label="log10 usage frequency")
    if dead.any():
        ax.scatter(xy[dead, 0], xy[dead, 1], marker="x", c="red", s=18, label=f"dead codes ({int(dead.sum())})")
        ax.legend(loc="best")
    ax.set_title(f"{title}, {int(dead.sum())} dead")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def plot_code_usage(counts, path: str | Path) -> Path:
    """Code frequencies sorted from most to least used, log scale; the title gives usage and perplexity."""
    counts = _as_numpy(counts).astype(np.float64)
    _check_counts(counts)
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts are all zero: nothing to plot")
    frequency = np.sort(counts / total)[::-1]  # (K,)
    used = frequency > 0
    perplexity = float(np.exp(-(frequency[used] * np.log(frequency[used])).sum()))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, used.sum() + 1), frequency[used], drawstyle="steps-post")
    ax.axhline(1.0 / counts.shape[0], color="gray", linestyle="--", label="uniform 1/K")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("usage frequency")
    ax.set_xlim(1, counts.shape[0])
    ax.legend(loc="best")
    ax.set_title(f"{int(used.sum())}/{counts.shape[0]} codes used, perplexity {perplexity:.1f}")
    return _save(fig, path)


def save_image_grid(images, path: str | Path, nrow: int = 8, captions: list[str] | None = None,
                    min_cell: int = 96, pad: int = 2) -> Path:
    """Images (N, 3, H, W) in [0, 1] as a grid PNG, nrow per row, each with an optional caption below it.

    Small images are enlarged by an integer factor (nearest neighbour, pixels stay visible) to at least
    `min_cell` pixels so that captions are readable.
    """
    images = _as_numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W), got {images.shape}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    if captions is not None and len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    n, _, h, w = images.shape
    scale = max(1, -(-min_cell // min(h, w)))  # ceil
    font = ImageFont.load_default()
    caption_h = 0 if captions is None else 14 * (1 + max(caption.count("\n") for caption in captions))
    cell_w, cell_h = w * scale + pad, h * scale + caption_h + pad
    cols, rows = min(nrow, n), -(-n // nrow)
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (np.clip(rearrange(images, "n c h w -> n h w c"), 0, 1) * 255 + 0.5).astype(np.uint8)
    for i in range(n):
        tile = Image.fromarray(pixels[i] if pixels.shape[-1] == 3 else pixels[i, ..., 0])
        tile = tile.resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
        x, y = pad + (i % nrow) * cell_w, pad + (i // nrow) * cell_h
        canvas.paste(tile, (x, y))
        if captions is not None:
            draw.multiline_text((x + 1, y + h * scale + 1), captions[i], fill="black", font=font, spacing=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
