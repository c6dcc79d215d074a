"""PatchGAN discriminator: a stack of strided 4x4 convs that scores every receptive-field patch.

Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"
(https://arxiv.org/abs/1611.07004), as used by taming-transformers' NLayerDiscriminator
(Esser et al. 2021, https://arxiv.org/abs/2012.09841).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

NORMS = ("batch", "group", "none", "spectral")
_KERNEL, _PADDING = 4, 1


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3
    base_channels: int = 64  # ndf; widths go base * (1, 2, 4, 8, 8, ...)
    num_layers: int = 3  # strided convs; 3 gives the classic 70x70 receptive field
    # NOTE: "batch" is taming's default; under DDP its statistics are per rank and per call
    # (reals and fakes go through separately), which the original recipe also does.
    norm: Literal["batch", "group", "none", "spectral"] = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"DiscriminatorConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.num_layers < 1 or self.base_channels < 1 or self.in_channels < 1:
            raise ValueError(
                "DiscriminatorConfig needs num_layers, base_channels, in_channels >= 1, got "
                f"{self.num_layers}, {self.base_channels}, {self.in_channels}"
            )


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()  # "none" and "spectral" (spectral norm lives on the convs)


def _init_weights(module: nn.Module) -> None:
    """taming's weights_init: convs ~ N(0, 0.02), norm scales ~ N(1, 0.02), norm shifts 0 (DCGAN)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: (B, C, H, W) images in [-1, 1] -> (B, 1, h, w) real/fake logits per patch."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        norm = config.norm
        use_bias = norm != "batch"  # a BatchNorm right after makes a conv bias redundant
        widths = [config.base_channels * min(2**n, 8) for n in range(config.num_layers + 1)]

        # first conv has no norm (pix2pix); then num_layers - 1 strided blocks, one stride-1 block
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, widths[0], _KERNEL, stride=2, padding=_PADDING),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for n in range(1, config.num_layers + 1):
            stride = 2 if n < config.num_layers else 1
            layers += [
                nn.Conv2d(widths[n - 1], widths[n], _KERNEL, stride=stride, padding=_PADDING, bias=use_bias),
                _norm_layer(norm, widths[n]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, _KERNEL, stride=1, padding=_PADDING))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

        if norm == "spectral":  # Miyato et al. 2018, https://arxiv.org/abs/1802.05957
            for index, layer in enumerate(self.main):
                if isinstance(layer, nn.Conv2d):
                    self.main[index] = nn.utils.parametrizations.spectral_norm(layer)

    def output_size(self, size: int) -> int:
        """Side of the patch map for an input side `size` (256 -> 30 for num_layers=3)."""
        for _ in range(self.config.num_layers):
            size = (size + 2 * _PADDING - _KERNEL) // 2 + 1  # stride-2 convs halve (floor)
        return size - 2  # two stride-1 4x4 convs with padding 1 each remove one pixel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"PatchDiscriminator expects (B, {self.config.in_channels}, H, W) images, "
                f"got shape {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if min(self.output_size(h), self.output_size(w)) < 1:
            raise ValueError(
                f"images of {h}x{w} are too small for a {self.config.num_layers}-layer PatchGAN: "
                f"need a side of at least {3 * 2 ** self.config.num_layers} pixels"
            )
        return self.main(images)  # (B, 1, h', w')
