"""taming-transformers' VQGAN training step, built from the `taming-transformers-rom1504` wheel, for speed comparisons.

The wheel is an optional extra (`gpu-bench` in pyproject.toml; setup.sh installs it with `--no-deps`:
its metadata asks for pytorch-lightning and omegaconf, which none of the modules used here imports).
taming's own `taming.models.vqgan.VQModel` cannot be imported without them (it is a LightningModule
and imports `taming.main`), so `TamingVQModel` repeats its forward (encoder, quant_conv, VectorQuantizer2,
post_quant_conv, decoder: taming/models/vqgan.py, `encode`/`decode`/`forward`) over taming's own modules.
`TamingStep` is one call of its Lightning `training_step` per optimizer, as Lightning runs it with two
optimizers: the generator pass (forward, `VQLPIPSWithDiscriminator` with optimizer_idx 0: L1 + codebook +
adaptive-weighted GAN term, Adam step) and then the discriminator pass (a second generator forward,
optimizer_idx 1: hinge loss, Adam step), each with the other optimizer's parameters frozen
(Lightning's `toggle_optimizer`). LPIPS is off (taming would download VGG16 and its LPIPS weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

TAMING_PACKAGE = "taming-transformers-rom1504==0.0.6"


class TamingMissing(RuntimeError):
    pass


def import_taming():
    """taming's modules (Encoder, Decoder, VectorQuantizer2, vqperceptual), or TamingMissing saying how to install them."""
    try:
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.losses import vqperceptual
        from taming.modules.vqvae.quantize import VectorQuantizer2
    except ImportError as err:
        raise TamingMissing(
            f"taming-transformers is not importable ({err}): install it with `pip install --no-deps "
            f"'{TAMING_PACKAGE}'` (the `gpu-bench` extra; setup.sh does this), or on a machine without a "
            "network carry its wheel (benchmarks/gpu_wheels.sh)") from err
    return Encoder, Decoder, VectorQuantizer2, vqperceptual


@dataclass(frozen=True)
class TamingSize:
    """taming's `ddconfig` and codebook; `imagenet_f16_16384` is configs of its ImageNet f16, K=16384 model."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    resolution: int
    n_embed: int
    embed_dim: int

    def ddconfig(self) -> dict:
        return dict(double_z=False, z_channels=self.z_channels, resolution=self.resolution, in_channels=3, out_ch=3,
                    ch=self.ch, ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=list(self.attn_resolutions), dropout=0.0)


# taming's vqgan_imagenet_f16_16384 (the 72M ImageNet f16 model): the same layout as our imagenet256_f16 presets
IMAGENET_F16_16384 = TamingSize(128, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 16384, 256)
TINY = TamingSize(32, (1, 1, 2), 1, (), 32, 32, 256, 32)  # CPU rehearsals (taming's GroupNorm needs ch % 32 == 0)


class TamingVQModel(nn.Module):
    """taming.models.vqgan.VQModel's modules and forward, without Lightning: (B, 3, S, S) -> (decoded, qloss)."""

    def __init__(self, size: TamingSize):
        super().__init__()
        Encoder, Decoder, VectorQuantizer2, _ = import_taming()
        self.encoder = Encoder(**size.ddconfig())
        self.decoder = Decoder(**size.ddconfig())
        self.quantize = VectorQuantizer2(size.n_embed, size.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(size.z_channels, size.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(size.embed_dim, size.z_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant, qloss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quant)), qloss


def build_taming_loss(disc_layers: int, disc_ndf: int, disc_weight: float = 0.75) -> nn.Module:
    """taming's VQLPIPSWithDiscriminator, GAN from step 0, LPIPS off (its constructor's LPIPS() would download)."""
    *_, vqperceptual = import_taming()
    with mock.patch.object(vqperceptual, "LPIPS", nn.Identity), contextlib.redirect_stdout(None):
        return vqperceptual.VQLPIPSWithDiscriminator(
            disc_start=0, codebook_weight=1.0, disc_num_layers=disc_layers, disc_ndf=disc_ndf,
            disc_weight=disc_weight, perceptual_weight=0.0, disc_loss="hinge")


def _require_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


class TamingStep:
    """One training step of taming's VQModel as Lightning runs it (see the module docstring); bf16 autocast or fp32."""

    def __init__(self, model: TamingVQModel, loss: nn.Module, images: torch.Tensor, dtype: str, lr: float = 4.5e-6):
        self.model, self.loss, self.images = model, loss, images
        self.autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if dtype == "bf16"
                         else contextlib.nullcontext())
        self.g_params = list(model.parameters())
        self.d_params = list(loss.discriminator.parameters())
        lr = lr * images.shape[0]  # taming's base_learning_rate x batch size (one GPU)
        self.opt_ae = torch.optim.Adam(self.g_params, lr=lr, betas=(0.5, 0.9))  # configure_optimizers
        self.opt_disc = torch.optim.Adam(self.d_params, lr=lr, betas=(0.5, 0.9))
        self.global_step = 0

    def __call__(self) -> None:
        x, last_layer = self.images, self.model.decoder.conv_out.weight
        _require_grad(self.d_params, False)  # toggle_optimizer(opt_ae)
        with self.autocast:
            xrec, qloss = self.model(x)
            aeloss, _ = self.loss(qloss, x, xrec, 0, self.global_step, last_layer=last_layer, split="train")
        self.opt_ae.zero_grad(set_to_none=True)
        aeloss.backward()
        self.opt_ae.step()
        _require_grad(self.d_params, True)
        _require_grad(self.g_params, False)  # toggle_optimizer(opt_disc)
        with self.autocast:
            xrec, qloss = self.model(x)
            discloss, _ = self.loss(qloss, x, xrec, 1, self.global_step, last_layer=last_layer, split="train")
        self.opt_disc.zero_grad(set_to_none=True)
        discloss.backward()
        self.opt_disc.step()
        _require_grad(self.g_params, True)
        self.global_step += 1
