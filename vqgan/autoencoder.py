"""Convolutional VQGAN encoder/decoder and the VQModel that puts a vector quantizer between them.

The layout is the taming-transformers / latent-diffusion one (Esser et al. 2021,
https://arxiv.org/abs/2012.09841; Rombach et al. 2022, https://arxiv.org/abs/2112.10752):

    encoder: conv_in -> per level [ResBlock (+Attn)] x num_res_blocks, downsample (not after the last)
             -> mid ResBlock-Attn-ResBlock -> GroupNorm, SiLU, conv_out (z_channels)
    decoder: conv_in -> mid ResBlock-Attn-ResBlock -> per level, deepest first,
             [ResBlock (+Attn)] x (num_res_blocks + 1), nearest upsample + conv (not after the
             shallowest) -> GroupNorm, SiLU, conv_out (out_channels, or 256 logits per channel)

A 1x1 quant_conv / post_quant_conv sits on either side of the quantizer. Images inside the model
are floats in [-1, 1]. Size presets live in `vqgan/presets.py` and are re-exported here as
`PRESETS` / `preset`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vqgan.config import ConfigError
from vqgan.quantize import QuantizerConfig, QuantizerOutput, build_quantizer
from vqgan.utils import count_parameters, format_count

NUM_BINS = 256  # categorical output: one logit per 8-bit intensity value


@dataclass(frozen=True)
class AutoencoderConfig:
    """Encoder/decoder shape; downsampling factor f = 2 ** (len(channel_mult) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # self-attention at these feature-map sizes (+ mid block)
    z_channels: int = 256
    dropout: float = 0.0
    num_groups: int = 32
    resolution: int = 256  # nominal image size, used only to place attention
    # categorical: 256 logits per channel & pixel, trained with cross-entropy (PixelCNN-style
    # discretised output, van den Oord et al. 2016, https://arxiv.org/abs/1601.06759)
    output: Literal["pixels", "categorical"] = "pixels"
    downsample: Literal["conv", "avg"] = "conv"  # conv: stride-2 3x3 with taming's asymmetric pad
    # Self-attention between the two mid ResBlocks of encoder and decoder (taming, LlamaGen, diffusers);
    # aMUSEd's VQ-GAN has none (diffusers' `mid_block_add_attention=False`).
    mid_attention: bool = True
    gradient_checkpointing: bool = False  # recompute res/attn blocks in backward to save memory
    # Kernel of quant_conv / post_quant_conv: 1 (taming), 3 (VAR's VQVAE, quant_conv_ks=3).
    quant_conv_kernel: int = 1

    def __post_init__(self) -> None:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "z_channels",
                     "num_groups", "resolution"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        widths = sorted({self.base_channels * m for m in self.channel_mult})
        if any(w % self.num_groups for w in widths):
            raise ConfigError(
                f"num_groups={self.num_groups} must divide every level width {widths} "
                f"(base_channels * channel_mult) for GroupNorm"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"resolution={self.resolution} must be divisible by the downsampling factor "
                f"{self.downsample_factor} (from channel_mult={self.channel_mult})"
            )
        stray = sorted(set(self.attn_resolutions) - set(self.level_resolutions))
        if stray:  # a size that matches no level would silently add no attention at all
            raise ConfigError(
                f"attn_resolutions {stray} match no feature-map size; with resolution={self.resolution} "
                f"the levels are {self.level_resolutions}"
            )
        if self.output not in ("pixels", "categorical"):
            raise ConfigError(f"output must be 'pixels' or 'categorical', got {self.output!r}")
        if self.downsample not in ("conv", "avg"):
            raise ConfigError(f"downsample must be 'conv' or 'avg', got {self.downsample!r}")
        if self.quant_conv_kernel < 1 or self.quant_conv_kernel % 2 == 0:
            raise ConfigError(f"quant_conv_kernel must be odd and >= 1 (1 or 3), got {self.quant_conv_kernel}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each encoder level, shallowest first."""
        return tuple(self.resolution // 2**i for i in range(len(self.channel_mult)))


@dataclass(frozen=True)
class VQModelConfig:
    """Autoencoder + quantizer; the 1x1 quant_conv maps autoencoder.z_channels to quantizer.dim.

    quantizer.dim may differ from z_channels: LlamaGen's VQ-16 maps z 256 -> 8 channels in quant_conv
    and looks codes up there, with no projection inside the quantizer. A low-dimensional lookup space
    behind a full-width quant_conv (a linear projection inside the quantizer) is quantizer.code_dim.
    """

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor


# --------------------------------------------------------------------------------------- blocks


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a residual; 1x1 shortcut when the width changes (taming)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual (taming AttnBlock)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # fused q, k, v 1x1 projections
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(qkv, "b (three c) h w -> three b 1 (h w) c", three=3)  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height)  # reshape, not view: channels_last safe
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv after a right/bottom pad (taming), or 2x2 average pool."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if mode == "conv" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # NOTE: asymmetric (0, 1, 0, 1) pad as in taming, so even sizes halve exactly with padding=0
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_blocks(blocks: nn.Sequential, x: Tensor, use_checkpoint: bool) -> Tensor:
    """Apply `blocks` in order, recomputing res/attn blocks in backward when `use_checkpoint`."""
    for block in blocks:
        if use_checkpoint and isinstance(block, (ResBlock, AttnBlock)):
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def mid_block(channels: int, config: AutoencoderConfig) -> nn.Sequential:
    attention = [AttnBlock(channels, config.num_groups)] if config.mid_attention else []
    return nn.Sequential(
        ResBlock(channels, channels, config.dropout, config.num_groups),
        *attention,
        ResBlock(channels, channels, config.dropout, config.num_groups),
    )


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        width = config.base_channels
        self.conv_in = nn.Conv2d(config.in_channels, width, 3, padding=1)
        last = len(config.channel_mult) - 1
        self.levels = nn.ModuleList()
        for level, (mult, res) in enumerate(zip(config.channel_mult, config.level_resolutions)):
            blocks: list[nn.Module] = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, config.base_channels * mult, config.dropout, config.num_groups))
                width = config.base_channels * mult
                if res in config.attn_resolutions:
                    blocks.append(AttnBlock(width, config.num_groups))
            if level != last:
                blocks.append(Downsample(width, config.downsample))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = mid_block(width, config)
        self.norm_out = group_norm(width, config.num_groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = self.conv_in(x)  # (B, C, H, W)
        for level in self.levels:
            h = run_blocks(level, h, ckpt)
        h = run_blocks(self.mid, h, ckpt)  # (B, C_max, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f), or (B, 256*out_channels, ...) logits."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        width = config.base_channels * config.channel_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = mid_block(width, config)
        self.levels = nn.ModuleList()  # in execution order: deepest level first
        for level in reversed(range(len(config.channel_mult))):
            res = config.level_resolutions[level]
            out = config.base_channels * config.channel_mult[level]
            blocks: list[nn.Module] = []
            for _ in range(config.num_res_blocks + 1):  # one more than the encoder, as in taming
                blocks.append(ResBlock(width, out, config.dropout, config.num_groups))
                width = out
                if res in config.attn_resolutions:
                    blocks.append(AttnBlock(width, config.num_groups))
            if level != 0:
                blocks.append(Upsample(width))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = group_norm(width, config.num_groups)
        bins = NUM_BINS if config.output == "categorical" else 1
        self.conv_out = nn.Conv2d(width, config.out_channels * bins, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = run_blocks(self.mid, self.conv_in(z), ckpt)  # (B, C_max, h, w)
        for level in self.levels:
            h = run_blocks(level, h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels * bins, H, W)


# --------------------------------------------------------------------------------------- model


class VQModel(nn.Module):
    """Image tokenizer: encoder -> quant_conv -> quantizer (any kind) -> post_quant_conv -> decoder."""

    def __init__(self, config: VQModelConfig):
        super().__init__()
        self.config = config
        ae = config.autoencoder
        self.encoder = Encoder(ae)
        kernel = ae.quant_conv_kernel
        self.quant_conv = nn.Conv2d(ae.z_channels, config.quantizer.dim, kernel, padding=kernel // 2)
        self.quantizer = build_quantizer(config.quantizer)  # the module of quantizer.kind
        self.post_quant_conv = nn.Conv2d(config.quantizer.dim, ae.z_channels, kernel, padding=kernel // 2)
        self.decoder = Decoder(ae)
        # Checking finiteness reads a flag back from the device (one host sync per call); a training
        # loop that already watches its loss for NaN may turn it off for speed.
        self.check_finite = True

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer_weight(self) -> Tensor:
        """Decoder's final conv weight, for the adaptive GAN weight (Esser et al. 2021, eq. 7)."""
        return self.decoder.conv_out.weight

    def encode_latent(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> pre-quantization latent z (B, D, H/f, W/f), after quant_conv."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) quantized latent -> decoder output (pixels or (B, 256, C, H, W) logits)."""
        out = self.decoder(self.post_quant_conv(z_q))  # (B, C * bins, H, W)
        if self.config.autoencoder.output == "categorical":
            return rearrange(out, "b (c k) h w -> b k c h w", k=NUM_BINS)  # (B, 256, C, H, W)
        return out

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """(B, 3, H, W) in [-1, 1] -> (reconstruction or logits, quantizer output)."""
        quant = self.quantizer(self.encode_latent(images))
        return self.decode_latent(quant.quantized), quant

    # NOTE: the model works on images in [-1, 1] ("model range"); VQTokenizer.encode/decode work on [0, 1].
    # The model-level names say their range so that a VQModel holder cannot feed [0, 1] images by habit.
    def encode_model_range(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f); changes no state, in train mode too.

        For images in [0, 1] use `VQTokenizer.encode` (or `vqgan.utils.images_to_model_range` first).
        """
        return self.quantizer.lookup(self.encode_latent(images))

    def decode_model_range(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (`VQTokenizer.decode` gives [0, 1])."""
        self._check_indices(indices)
        codes = self.quantizer.indices_to_codes(indices)  # (B, D, h, w)
        return self.to_images(self.decode_latent(codes))

    def encode(self, images: Tensor) -> Tensor:
        """Deprecated alias of `encode_model_range` (images in [-1, 1], unlike `VQTokenizer.encode`)."""
        _warn_renamed("encode", "encode_model_range")
        return self.encode_model_range(images)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Deprecated alias of `decode_model_range` (images in [-1, 1], unlike `VQTokenizer.decode`)."""
        _warn_renamed("decode_indices", "decode_model_range")
        return self.decode_model_range(indices)

    def to_images(self, decoded: Tensor) -> Tensor:
        """Decoder output -> images in [-1, 1]: clamp pixels; categorical bin b -> b / 255 * 2 - 1."""
        if self.config.autoencoder.output == "categorical":
            bins = decoded.argmax(dim=1)  # (B, C, H, W) in [0, 255]
            return bins.to(torch.float32) / (NUM_BINS - 1) * 2.0 - 1.0
        return decoded.clamp(-1.0, 1.0)

    def summary(self) -> str:
        """One line of parameter counts and token geometry, to print at startup."""
        ae, q = self.config.autoencoder, self.config.quantizer
        side = ae.resolution // self.downsample_factor
        parts = {
            "encoder": count_parameters(self.encoder) + count_parameters(self.quant_conv),
            "quantizer": count_parameters(self.quantizer),
            "decoder": count_parameters(self.decoder) + count_parameters(self.post_quant_conv),
        }
        counts = ", ".join(f"{k} {format_count(v)}" for k, v in parts.items())
        return (
            f"VQModel {format_count(sum(parts.values()))} params ({counts}); f={self.downsample_factor}, "
            f"{ae.resolution}px -> {side}x{side} = {side * side} tokens, K={q.num_codes} ({q.kind}), output={ae.output}"
            + (f"; msvq: {sum(s * s for s in q.scales)} ids over scales {list(q.scales)}" if q.kind == "msvq" else "")
        )

    def _check_images(self, images: Tensor) -> None:
        ae, f = self.config.autoencoder, self.downsample_factor
        layout = f"(B, {ae.in_channels}, H, W)"
        if not isinstance(images, Tensor):
            raise ValueError(f"expected images as a torch.Tensor {layout}, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"expected images of rank 4 {layout}, got shape {tuple(images.shape)}")
        if images.shape[1] != ae.in_channels:
            raise ValueError(
                f"expected {ae.in_channels} channels {layout}, got {images.shape[1]} "
                f"in shape {tuple(images.shape)}"
            )
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"expected H and W divisible by the downsampling factor {f}, got {images.shape[2]}x{images.shape[3]}"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}")
        if self.check_finite and not _tracing() and images.device.type != "meta":
            if not bool(torch.isfinite(images).all()):
                raise ValueError("expected finite images in [-1, 1], got NaN or inf values")

    def _check_indices(self, indices: Tensor) -> None:
        # The quantizer's indices_to_codes checks the value range [0, K); here only the layout.
        if self.config.quantizer.kind == "msvq":  # (B, Σ s²), checked by the quantizer
            return
        if not isinstance(indices, Tensor) or indices.ndim != 3:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"expected indices of shape (B, h, w), got {shape}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices, got dtype {indices.dtype}")


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(f"VQModel.{old} is renamed VQModel.{new}: it takes and gives images in [-1, 1]; "
                  f"VQTokenizer.encode/decode take and give [0, 1]", DeprecationWarning, stacklevel=3)


def _tracing() -> bool:
    """True under torch.compile / torch.export / jit tracing, where data-dependent checks cannot run."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def __getattr__(name: str):
    # PRESETS / preset() live in vqgan/presets.py to keep this file to one concept; they are
    # re-exported lazily (PEP 562) because presets.py imports the config classes from here.
    if name in ("PRESETS", "preset"):
        from vqgan import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
