"""Gated PixelCNN prior over token grids, without the blind spot.

van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", arXiv:1606.05328.
A vertical stack sees every row above; a horizontal stack sees the pixels to the left in the current
row and receives the vertical stack shifted down by one row, so together they cover all earlier
raster positions within the receptive field. Causality is built from padding and shifts instead of
masked weights, so the gradient to any later position is exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.prior.ids import check_id_range
from vqgan.prior.sampling import SamplingConfig, sample_pixelcnn
from vqgan.utils import as_grid


@dataclass(frozen=True)
class PixelCNNConfig:
    num_codes: int = 1024                 # K
    grid: tuple[int, ...] = (16, 16)    # (h, w) of the token grid
    hidden: int = 128
    num_layers: int = 12
    kernel_size: int = 5                  # odd; the vertical kernel is (k//2 + 1) x k, horizontal 1 x (k//2 + 1)
    num_classes: int = 0                  # 0 = unconditional

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", as_grid(self.grid))
        if self.num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {self.num_codes}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.num_layers < 1 or self.hidden < 1 or self.num_classes < 0:
            raise ValueError(
                f"num_layers, hidden must be >= 1 and num_classes >= 0, got "
                f"{self.num_layers}, {self.hidden}, {self.num_classes}"
            )

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


def shift_down(x: Tensor) -> Tensor:
    """(B, C, H, W) -> same, row r holding row r-1 (zeros in row 0)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: Tensor) -> Tensor:
    """(B, C, H, W) -> same, column c holding column c-1 (zeros in column 0)."""
    return F.pad(x, (1, 0))[..., :-1]


def gate(x: Tensor) -> Tensor:
    """(B, 2C, H, W) -> (B, C, H, W): tanh(a) * sigmoid(b), the gated unit of the paper (eq. 2)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer: vertical stack, horizontal stack, vertical->horizontal link, class bias."""

    def __init__(self, hidden: int, kernel_size: int, num_classes: int, first: bool):
        super().__init__()
        self.first = first  # mask type 'A': the horizontal stack excludes the current pixel
        self.half = kernel_size // 2
        self.vertical = nn.Conv2d(hidden, 2 * hidden, (self.half + 1, kernel_size))
        self.horizontal = nn.Conv2d(hidden, 2 * hidden, (1, self.half + 1))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        # Class embedding as a bias on both gates (paper eq. 4, with a one-hot h).
        self.class_bias = nn.Embedding(num_classes, 4 * hidden) if num_classes > 0 else None

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """v, h: (B, C, H, W) -> new (v, h)."""
        # Vertical: rows r-half..r, all columns c-half..c+half (pad top and both sides).
        v_pre = self.vertical(F.pad(v, (self.half, self.half, self.half, 0)))        # (B, 2C, H, W)
        # Horizontal: columns c-half..c of the current row; type 'A' shifts right to drop column c.
        h_in = shift_right(h) if self.first else h
        h_pre = self.horizontal(F.pad(h_in, (self.half, 0)))                       # (B, 2C, H, W)
        # The vertical stack at row r has seen row r itself: shift it down before the link.
        h_pre = h_pre + self.v_to_h(shift_down(v_pre))
        if self.class_bias is not None:
            bias_v, bias_h = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)  # (B, 2C, 1, 1)
            v_pre, h_pre = v_pre + bias_v, h_pre + bias_h
        h_new = self.h_out(gate(h_pre))                                            # (B, C, H, W)
        # Residual only after the first layer: the first layer's input holds the current pixel.
        return gate(v_pre), h_new if self.first else h + h_new


class PixelCNNPrior(nn.Module):
    """Gated PixelCNN over (B, h, w) token grids -> (B, K, h, w) next-token logits."""

    check_ids = True  # range-check token and class ids (a host sync); the training loop turns it off: see vqgan.prior.ids

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.num_codes, c.hidden)
        self.layers = nn.ModuleList(
            GatedLayer(c.hidden, c.kernel_size, c.num_classes, first=(i == 0)) for i in range(c.num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c.hidden, c.hidden, 1), nn.ReLU(), nn.Conv2d(c.hidden, c.num_codes, 1)
        )

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, h, w) long -> (B, hidden, h, w) input embeddings (checked against K)."""
        if tokens.dim() != 3 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (B, h, w) long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if self.check_ids:
            check_id_range(tokens, self.config.num_codes, "token")
        return self.embedding(tokens).permute(0, 3, 1, 2)                          # (B, C, h, w)

    def forward_embeddings(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, hidden, h, w) embeddings -> (B, K, h, w) logits; lets tests differentiate w.r.t. inputs."""
        labels = self._check_labels(labels, x.shape[0])
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)                                                        # (B, K, h, w)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, h, w) tokens, (B,) labels -> (B, K, h, w); logits at (r, c) see only earlier raster positions."""
        h, w = self.config.grid
        if tokens.dim() == 3 and (tokens.shape[1] > h or tokens.shape[2] != w):
            raise ValueError(f"tokens must be (B, {h}, {w}) (fewer rows allowed), got {tuple(tokens.shape)}")
        return self.forward_embeddings(self.embed(tokens), labels)

    def _check_labels(self, labels: Tensor | None, batch: int) -> Tensor | None:
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("labels were given but the PixelCNN prior is unconditional (num_classes=0)")
            return None
        if labels is None:
            raise ValueError(f"the PixelCNN prior is class-conditional ({k} classes): labels are required")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if self.check_ids:
            check_id_range(labels, k, "class")
        return labels

    def sample(
        self, n: int, labels=None, config: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None
    ) -> Tensor:
        """n grids (n, h, w) by ancestral sampling; see sampling.sample_pixelcnn."""
        if config.cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={config.cfg_scale}: the PixelCNN prior has no classifier-free guidance")
        return sample_pixelcnn(self, n, labels, config.temperature, config.top_k, config.top_p, generator)


def nll_bits(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K, h, w) logits, (B, h, w) tokens -> (bits per token, bits per image); uniform = log2 K per token."""
    if logits.dim() != 4 or logits.shape[0] != tokens.shape[0] or logits.shape[2:] != tokens.shape[1:]:
        raise ValueError(f"logits (B, K, h, w) and tokens (B, h, w) disagree: {tuple(logits.shape)} vs {tuple(tokens.shape)}")
    bits_per_token = F.cross_entropy(logits.float(), tokens) / math.log(2)
    return bits_per_token, bits_per_token * tokens[0].numel()
