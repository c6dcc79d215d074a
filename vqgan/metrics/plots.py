"""Codebook figures as PNG files: t-SNE of the codes, the code-usage curve (image grids: vqgan/image_io.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqgan.utils import to_numpy  # noqa: E402

MAX_TSNE_CODES = 4096  # t-SNE is O(K log K) per iteration at best; beyond this it takes minutes on a CPU


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

    codes, counts = to_numpy(codebook).astype(np.float64), to_numpy(counts).astype(np.float64)
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
    counts = to_numpy(counts).astype(np.float64)
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
