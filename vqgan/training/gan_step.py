"""The tokenizer's two steps: generator (encoder + quantizer + decoder) and discriminator.

Each computes its loss on one micro-batch and backpropagates it (divided by the window's length);
the optimizer update is the window's (`vqgan.training.window.apply_updates`). The training loop,
the tests and `benchmarks/train_step.py` all call these functions, so what is timed and tested is
what trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vqgan.autoencoder import VQModel
from vqgan.losses import LeCAM, LossConfig, discriminator_loss, expected_image, generator_loss
from vqgan.quantizers import QuantizerOutput
from vqgan.training.window import Backward, plain_backward

def differentiable_images(model: VQModel, decoded: Tensor) -> Tensor:
    """Images in [-1, 1] that gradients flow through: the pixels, or the expected value of categorical logits."""
    return decoded if model.config.autoencoder.output == "pixels" else expected_image(decoded)


@dataclass
class GeneratorResult:
    loss: Tensor  # the generator's total loss on this micro-batch (detached, before division)
    decoded: Tensor  # model output, detached (pixels, or categorical logits)
    fake: Tensor  # differentiable images, detached: what the discriminator step scores as fake
    quant: QuantizerOutput
    logs: dict[str, Tensor]  # detached device scalars; read them only at log steps


def generator_step(model: nn.Module, raw_model: VQModel, raw_disc: nn.Module, perceptual: nn.Module | None,
                   images: Tensor, config: LossConfig, step: int, backward: Backward = plain_backward,
                   accum_steps: int = 1, loss_scale: float | Tensor = 1.0,
                   adaptive_fallback: float | Tensor = 1.0) -> GeneratorResult:
    """Reconstruction, codebook, perceptual and adversarial terms on `images` (B, 3, H, W); backward.

    `model` is what runs the forward (DDP-wrapped or not), `raw_model` the module under it. The
    discriminator scores the reconstructions through `raw_disc` with its gradients off, so this step
    touches no discriminator gradient (and no DDP hook of it).
    """
    decoded, quant = model(images)
    recon = differentiable_images(raw_model, decoded)
    logits_fake = None
    if step >= config.disc_start:
        raw_disc.requires_grad_(False)
        logits_fake = raw_disc(recon)
        raw_disc.requires_grad_(True)
    total, logs = generator_loss(config, images, decoded, recon, quant.loss, logits_fake, raw_model.last_layer_weight,
                                 step, perceptual, loss_scale=loss_scale, adaptive_fallback=adaptive_fallback)
    backward(total / accum_steps)
    return GeneratorResult(total.detach(), decoded.detach(), recon.detach(), quant, logs)


def discriminator_step(discriminator: nn.Module, images: Tensor, fake: Tensor, config: LossConfig, step: int,
                       lecam: LeCAM | None = None, backward: Backward = plain_backward,
                       accum_steps: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """Real `images` against the detached reconstructions `fake`: GAN + LeCAM + R1 loss; backward."""
    total, logs = discriminator_loss(config, discriminator, images, fake, step, lecam=lecam)
    backward(total / accum_steps)
    return total.detach(), logs
