"""Size presets for VQModel: plain functions in a registry dict (DiT-style), the only names the CLI takes.

Parameter counts (encoder + decoder + quantizer, checked in tests/test_autoencoder.py):
tiny 0.77M, taming_f4 4.20M, cifar32_f4 22.07M, imagenet256_f8 72.20M, imagenet256_f16 72.14M,
imagenet256_f16_l2 72.01M.
"""

from __future__ import annotations

from typing import Callable

from vqgan.autoencoder import AutoencoderConfig, VQModelConfig
from vqgan.config import ConfigError
from vqgan.quantizers import QuantizerConfig


def tiny() -> VQModelConfig:
    """32px f4, ~0.8M params: CPU unit tests and smoke runs."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=32, num_groups=8, resolution=32),
        QuantizerConfig(num_codes=256, dim=32),
    )


def cifar32_f4() -> VQModelConfig:
    """32px f4 (8x8 = 64 tokens), ~22M params: CIFAR-10-sized images."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                          z_channels=64, resolution=32),
        QuantizerConfig(num_codes=1024, dim=64),
    )


def taming_f4() -> VQModelConfig:
    """32px f4, ~4.2M params: taming layout scaled to 32px (ch 64, one res block, attention at 8x8)."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                          z_channels=64, resolution=32),
        QuantizerConfig(num_codes=1024, dim=64),
    )


def imagenet256_f8() -> VQModelConfig:
    """256px f8 (32x32 = 1024 tokens), ~72M params; ch_mult and attention at 32 as LDM's vq-f8."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,),
                          z_channels=256, resolution=256),
        QuantizerConfig(num_codes=8192, dim=256),
    )


def imagenet256_f16() -> VQModelConfig:
    """256px f16 (16x16 = 256 tokens), ~72M params: taming's ImageNet VQGAN, K=1024."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          attn_resolutions=(16,), z_channels=256, resolution=256),
        QuantizerConfig(num_codes=1024, dim=256),
    )


def imagenet256_f16_l2() -> VQModelConfig:
    """256px f16, ~72M params, K=16384 l2-normalised 8-dim codes (LlamaGen VQ-16, arXiv:2406.06525)."""
    return VQModelConfig(
        AutoencoderConfig(base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          attn_resolutions=(16,), z_channels=256, resolution=256),
        # low-dim, l2-normalised lookup raises codebook usage (Yu et al. 2022, arXiv:2110.04627)
        QuantizerConfig(num_codes=16384, dim=256, code_dim=8, l2_normalize=True),
    )


PRESETS: dict[str, Callable[[], VQModelConfig]] = {
    "tiny": tiny,
    "cifar32_f4": cifar32_f4,
    "taming_f4": taming_f4,
    "imagenet256_f8": imagenet256_f8,
    "imagenet256_f16": imagenet256_f16,
    "imagenet256_f16_l2": imagenet256_f16_l2,
}


def preset(name: str) -> VQModelConfig:
    """The VQModelConfig registered under `name`; unknown names raise ConfigError listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
