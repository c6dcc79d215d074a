"""VQGAN training losses: reconstruction, GAN terms, adaptive weight, LeCAM, R1, and the two composites.

Follows taming-transformers' VQLPIPSWithDiscriminator (Esser et al. 2021, https://arxiv.org/abs/2012.09841):
losses return `(total, {name: detached value})` and the training loop does the logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqgan.utils import is_distributed

RECONSTRUCTION_KINDS = ("l1", "l2", "categorical")
GAN_KINDS = ("hinge", "non_saturating", "vanilla")  # "vanilla" is taming's name for non-saturating
NUM_BINS = 256  # categorical decoder: 8-bit intensities


# ---------------------------------------------------------------- reconstruction


def pixel_bins(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> integer intensity bins round((x + 1) / 2 * 255) in [0, 255] (long)."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) / 2.0 * (NUM_BINS - 1)).long()


def expected_image(logits: torch.Tensor) -> torch.Tensor:
    """(B, 256, C, H, W) logits -> (B, C, H, W) expected intensity in [-1, 1]; differentiable, unlike argmax."""
    levels = torch.linspace(-1.0, 1.0, NUM_BINS, device=logits.device, dtype=logits.dtype)  # bin k -> k/255*2-1
    return torch.einsum("bkchw,k->bchw", logits.softmax(dim=1), levels)


def reconstruction_loss(kind: str, decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 / L2 between (B, C, H, W) images, or cross-entropy of (B, 256, C, H, W) logits vs target bins."""
    if kind not in RECONSTRUCTION_KINDS:
        raise ValueError(f"unknown reconstruction kind {kind!r}; expected one of {RECONSTRUCTION_KINDS}")
    if kind == "categorical":
        if decoded.ndim != 5 or decoded.shape[1] != NUM_BINS or decoded.shape[:1] + decoded.shape[2:] != target.shape:
            raise ValueError(
                f"categorical reconstruction expects logits (B, {NUM_BINS}, C, H, W) and target (B, C, H, W), "
                f"got {tuple(decoded.shape)} and {tuple(target.shape)}"
            )
        return F.cross_entropy(decoded, pixel_bins(target))  # mean over B*C*H*W
    if decoded.shape != target.shape:
        raise ValueError(
            f"{kind} reconstruction expects equal shapes, got {tuple(decoded.shape)} and {tuple(target.shape)}"
        )
    if kind == "l1":
        return (decoded - target).abs().mean()
    return (decoded - target).pow(2).mean()


# ---------------------------------------------------------------- GAN terms


def _check_gan_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {GAN_KINDS}")


def d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss, halved as in taming: hinge (Lim & Ye 2017) or non-saturating (Goodfellow 2014)."""
    _check_gan_kind(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())  # -log s(r) - log(1-s(f))


def g_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss: -mean(D(fake)) for hinge, -log sigmoid(D(fake)) for non-saturating."""
    _check_gan_kind(kind)
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adversarial_factor(step: int, start_step: int) -> float:
    """Discriminator warm-up (taming's adopt_weight): 0.0 before `start_step`, 1.0 from it on."""
    return 1.0 if step >= start_step else 0.0


def adaptive_weight_norms(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                          loss_scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(||grad_L L_rec||, ||grad_L L_G||) in fp32, unscaled: the two norms of the adaptive weight.

    fp16: `loss_scale` (the GradScaler's scale, a float or a device tensor) multiplies both losses
    before differentiating, so that gradients through fp16 activations do not underflow; the norms
    are taken in fp32 and divided by it. An overflow shows as an inf/NaN norm. No host sync.
    """
    rec_grad, = torch.autograd.grad(rec_loss * loss_scale, last_layer_weight, retain_graph=True, allow_unused=True)
    gan_grad, = torch.autograd.grad(g_loss * loss_scale, last_layer_weight, retain_graph=True, allow_unused=True)
    if rec_grad is None or gan_grad is None:
        which = "reconstruction" if rec_grad is None else "generator adversarial"
        raise ValueError(
            f"the {which} loss does not depend on last_layer_weight {tuple(last_layer_weight.shape)}; "
            "pass the decoder's final conv weight (VQModel.last_layer_weight) and feed the discriminator "
            "the decoded images without detaching them"
        )
    return rec_grad.float().norm() / loss_scale, gan_grad.float().norm() / loss_scale


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_weight: float = 1e4, loss_scale: float | torch.Tensor = 1.0,
                    fallback: float | torch.Tensor = 1.0) -> torch.Tensor:
    """lambda = ||grad_L L_rec|| / (||grad_L L_G|| + 1e-4) clamped to [0, max_weight], detached (Esser et al. eq. 7).

    L is the decoder's last layer. When no gradient can be taken (eval, torch.no_grad, or losses that
    do not require grad) this returns 0.0, as taming does, so validation totals leave the adversarial
    term out. The norms are fp32 and unscaled (see adaptive_weight_norms); when a scaled gradient
    overflowed, lambda is `fallback` (the loop passes the last finite value) rather than NaN, 0 or
    the clamp, and the loop skips that step and backs the scale off (generator_loss logs
    "adaptive_overflow").
    """
    return adaptive_weight_and_overflow(rec_loss, g_loss, last_layer_weight, max_weight, loss_scale, fallback)[0]


def adaptive_weight_and_overflow(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                                 max_weight: float = 1e4, loss_scale: float | torch.Tensor = 1.0,
                                 fallback: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(adaptive_weight(...), 1.0 if a scaled gradient overflowed else 0.0), both detached device scalars."""
    if not (torch.is_grad_enabled() and rec_loss.requires_grad and g_loss.requires_grad):
        zero = torch.zeros((), device=rec_loss.device)
        return zero, zero
    rec_norm, gan_norm = adaptive_weight_norms(rec_loss, g_loss, last_layer_weight, loss_scale)
    finite = torch.isfinite(rec_norm) & torch.isfinite(gan_norm)
    computed = (rec_norm / (gan_norm + 1e-4)).clamp(0.0, max_weight)
    fallback = torch.as_tensor(fallback, dtype=computed.dtype, device=computed.device)
    return torch.where(finite, computed, fallback).detach(), (~finite).float()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021, https://arxiv.org/abs/2104.03310) for limited-data GANs.

    reg = mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2), with ema_* the
    zero-debiased EMAs (decay 0.99, as google/lecam-gan) of the batch-mean logits, updated in training mode.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))  # biased EMAs; debiased on read
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Debiased (ema_real, ema_fake); zeros before the first update (no host sync)."""
        # before any update the biased EMAs are 0, so clamping the count keeps 0 / (1 - decay) = 0
        correction = 1.0 - self.decay ** self.num_updates.clamp_min(1).float()
        return self.ema_real / correction, self.ema_fake / correction

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])  # (2,)
        if is_distributed():  # the same averages on every process, so a resume restores all of them
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        self.ema_real.lerp_(means[0], 1.0 - self.decay)
        self.ema_fake.lerp_(means[1], 1.0 - self.decay)
        self.num_updates += 1

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        ema_real, ema_fake = self.averages()
        return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def r1_penalty(logits_real: torch.Tensor, real_images: torch.Tensor, gamma: float) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, https://arxiv.org/abs/1801.04406): gamma/2 * E_x ||grad_x sum D(x)||^2 on reals.

    `real_images` must have had requires_grad set before the discriminator produced `logits_real`.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty needs real_images.requires_grad_(True) before computing logits_real")
    grad, = torch.autograd.grad(logits_real.sum(), real_images, create_graph=True)  # (B, C, H, W)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(dim=1).mean()


# ---------------------------------------------------------------- composites


@dataclass(frozen=True)
class LossConfig:
    reconstruction_kind: Literal["l1", "l2", "categorical"] = "l1"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; ignored (recorded as 0) when no perceptual module is given
    codebook_weight: float = 1.0  # multiplies QuantizerOutput.loss
    disc_weight: float = 0.8  # taming's VQGAN configs; multiplies the adaptive weight
    disc_start: int = 0  # generator adversarial term and discriminator loss are off before this step
    disc_loss: Literal["hinge", "non_saturating", "vanilla"] = "hinge"
    use_adaptive_weight: bool = True  # False: lambda = 1 (LlamaGen-style fixed weight)
    adaptive_weight_max: float = 1e4
    lecam_weight: float = 0.0  # 0 = off
    lecam_decay: float = 0.99
    r1_weight: float = 0.0  # gamma of R1; 0 = off

    def __post_init__(self) -> None:
        if self.reconstruction_kind not in RECONSTRUCTION_KINDS:
            raise ValueError(
                f"reconstruction_kind must be one of {RECONSTRUCTION_KINDS}, got {self.reconstruction_kind!r}"
            )
        _check_gan_kind(self.disc_loss)
        weights = ("reconstruction_weight", "perceptual_weight", "codebook_weight", "disc_weight",
                   "adaptive_weight_max", "lecam_weight", "r1_weight")
        negative = [f"{name}={getattr(self, name)}" for name in weights if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"LossConfig weights must be >= 0, got {', '.join(negative)}")


def generator_loss(config: LossConfig, images: torch.Tensor, decoded: torch.Tensor, recon: torch.Tensor,
                   quantizer_loss: torch.Tensor, logits_fake: torch.Tensor | None, last_layer_weight: torch.Tensor,
                   step: int, perceptual: nn.Module | None = None, loss_scale: float | torch.Tensor = 1.0,
                   adaptive_fallback: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Autoencoder objective: rec + perceptual + codebook + adaptive-weighted adversarial term.

    images (B, C, H, W) in [-1, 1]; decoded as the model returns it (pixels, or (B, 256, C, H, W) logits);
    recon the differentiable images (decoded itself, or expected_image(logits)) that LPIPS and D saw;
    logits_fake = D(recon) or None before the discriminator starts; loss_scale and adaptive_fallback:
    see adaptive_weight. logs["adaptive_overflow"] is 1 when the adaptive weight's scaled gradients
    overflowed (fp16): the loop then skips the optimizer step and backs the loss scale off.
    """
    zero = images.new_zeros(())
    rec = reconstruction_loss(config.reconstruction_kind, decoded, images)
    use_perceptual = perceptual is not None and config.perceptual_weight > 0
    perceptual_term = perceptual(recon, images) if use_perceptual else zero
    # taming's "nll": the adaptive weight balances the GAN gradient against rec + perceptual
    nll = config.reconstruction_weight * rec + config.perceptual_weight * perceptual_term

    factor = adversarial_factor(step, config.disc_start)
    g_adv, weight, overflow = zero, zero, zero
    if logits_fake is not None:
        g_adv = g_loss(config.disc_loss, logits_fake)
        if factor > 0 and config.disc_weight > 0 and not config.use_adaptive_weight:
            weight = zero + 1.0
        elif factor > 0 and config.disc_weight > 0:
            weight, overflow = adaptive_weight_and_overflow(nll, g_adv, last_layer_weight, config.adaptive_weight_max,
                                                            loss_scale, adaptive_fallback)
    total = nll + config.codebook_weight * quantizer_loss + factor * config.disc_weight * weight * g_adv
    logs = {
        "rec": rec, "perceptual": perceptual_term, "quant": quantizer_loss, "g_adv": g_adv,
        "adaptive_weight": weight, "adaptive_overflow": overflow, "adv_factor": zero + factor,
        "perceptual_enabled": zero + float(use_perceptual), "g_total": total,
    }
    return total, {name: value.detach() for name, value in logs.items()}


def discriminator_loss(config: LossConfig, discriminator: nn.Module, images: torch.Tensor,
                       fake_images: torch.Tensor, step: int,
                       lecam: LeCAM | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator objective on real `images` vs `fake_images` (pass them detached): GAN + LeCAM + R1.

    Off (times 0) before disc_start. LeCAM needs its EMA state: pass a LeCAM module kept by the loop.
    """
    if config.lecam_weight > 0 and lecam is None:
        raise ValueError("LossConfig.lecam_weight > 0 needs a LeCAM(config.lecam_decay) module passed as `lecam`")
    real = images.detach().requires_grad_(config.r1_weight > 0)  # R1 differentiates D w.r.t. the reals
    logits_real = discriminator(real)  # (B, 1, h, w)
    logits_fake = discriminator(fake_images)
    zero = logits_real.new_zeros(())
    loss = d_loss(config.disc_loss, logits_real, logits_fake)
    lecam_term = lecam(logits_real, logits_fake) if config.lecam_weight > 0 else zero
    r1 = r1_penalty(logits_real, real, config.r1_weight) if config.r1_weight > 0 else zero
    factor = adversarial_factor(step, config.disc_start)
    total = factor * (loss + config.lecam_weight * lecam_term + r1)
    logs = {
        "d_loss": loss, "d_real_logits": logits_real.mean(), "d_fake_logits": logits_fake.mean(),
        "lecam": lecam_term, "r1": r1, "d_total": total,
    }
    return total, {name: value.detach() for name, value in logs.items()}
