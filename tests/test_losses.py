"""Losses, PatchGAN discriminator and LPIPS loading: hand-computed values and real loading paths (CPU, no network)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from vqgan import perceptual
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgan.losses import (
    LeCAM,
    LossConfig,
    adaptive_weight,
    adversarial_factor,
    d_loss,
    discriminator_loss,
    expected_image,
    g_loss,
    generator_loss,
    pixel_bins,
    r1_penalty,
    reconstruction_loss,
)
from vqgan.perceptual import (
    LPIPS,
    VGG16_FILENAME,
    VGG16_URL,
    MissingWeightsError,
    load_vgg16_features,
    lpips_available,
    resolve_vgg16_weights,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- GAN terms

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_losses_match_hand_computation():
    # relu(1 - r) = [0, 0.5, 2] -> 2.5/3 ; relu(1 + f) = [0, 1, 2.5] -> 3.5/3 ; halved sum = 1.0
    assert d_loss("hinge", REAL, FAKE).item() == pytest.approx(1.0)
    assert g_loss("hinge", FAKE).item() == pytest.approx(0.5 / 3)  # -mean(f) = -(-0.5/3)


def test_non_saturating_losses_match_hand_computation():
    real_term = sum(softplus(-r) for r in REAL.tolist()) / 3  # -log sigmoid(r)
    fake_term = sum(softplus(f) for f in FAKE.tolist()) / 3  # -log(1 - sigmoid(f))
    assert d_loss("non_saturating", REAL, FAKE).item() == pytest.approx(0.5 * (real_term + fake_term))
    assert g_loss("non_saturating", FAKE).item() == pytest.approx(sum(softplus(-f) for f in FAKE.tolist()) / 3)
    assert d_loss("vanilla", REAL, FAKE) == d_loss("non_saturating", REAL, FAKE)


def test_unknown_gan_kind_lists_kinds():
    with pytest.raises(ValueError, match="'wgan'.*hinge.*non_saturating"):
        d_loss("wgan", REAL, FAKE)
    with pytest.raises(ValueError, match="hinge"):
        g_loss("lsgan", FAKE)


def test_adversarial_factor_warm_up():
    assert [adversarial_factor(s, 10) for s in (0, 9, 10, 11)] == [0.0, 0.0, 1.0, 1.0]
    assert adversarial_factor(0, 0) == 1.0


# ---------------------------------------------------------------- adaptive weight


def _tiny_decoder_problem(gan_scale: float = 1.0):
    """Linear 'decoder' y = z W^T and linear 'discriminator' D(y) = y v: gradients have closed forms."""
    torch.manual_seed(0)
    z, target = torch.randn(5, 3), torch.randn(5, 2)
    weight = torch.randn(2, 3, requires_grad=True)
    v = torch.randn(2) * gan_scale
    y = z @ weight.T  # (N, 2)
    rec = (y - target).pow(2).mean()
    gan = -(y @ v).mean()
    # d rec / dW = 2/(N*2) (y - t)^T z ; d gan / dW = -(1/N) v (sum_n z_n)^T
    rec_grad = 2.0 / y.numel() * (y - target).detach().T @ z
    gan_grad = -torch.outer(v, z.sum(0)) / z.shape[0]
    return rec, gan, weight, rec_grad, gan_grad


def test_adaptive_weight_is_gradient_norm_ratio():
    rec, gan, weight, rec_grad, gan_grad = _tiny_decoder_problem()
    expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    got = adaptive_weight(rec, gan, weight)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad
    # retain_graph: the losses can still be backpropagated afterwards
    (rec + gan).backward()
    assert weight.grad is not None


def test_adaptive_weight_clamps_to_max():
    rec, gan, weight, rec_grad, gan_grad = _tiny_decoder_problem(gan_scale=1e-6)
    assert (rec_grad.norm() / (gan_grad.norm() + 1e-4)).item() > 5.0
    assert adaptive_weight(rec, gan, weight, max_weight=5.0).item() == 5.0


def test_adaptive_weight_fallback_and_errors():
    rec, gan, weight, _, _ = _tiny_decoder_problem()
    with torch.no_grad():
        assert adaptive_weight(rec, gan, weight).item() == 0.0  # documented eval fallback
    assert adaptive_weight(rec.detach(), gan.detach(), weight).item() == 0.0
    unrelated = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on last_layer_weight"):
        adaptive_weight(rec, gan, unrelated)


# ---------------------------------------------------------------- reconstruction


def test_l1_l2_on_hand_values():
    decoded = torch.tensor([[0.5, -0.5], [1.0, 0.0]]).view(1, 1, 2, 2)
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert reconstruction_loss("l1", decoded, target).item() == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert reconstruction_loss("l2", decoded, target).item() == pytest.approx((0.25 + 0.25 + 1 + 1) / 4)


def test_pixel_bins_and_expected_image():
    images = torch.tensor([-1.0, 1.0, 2 * 10.2 / 255 - 1, 2 * 200.7 / 255 - 1, 1.5])
    assert pixel_bins(images).tolist() == [0, 255, 10, 201, 255]
    bins = torch.tensor([0, 17, 255]).view(1, 1, 3, 1)  # (B, C, H, W)
    logits = torch.nn.functional.one_hot(bins, 256).permute(0, 4, 1, 2, 3).float() * 100.0  # (B, 256, C, H, W)
    torch.testing.assert_close(expected_image(logits), bins.float() / 255 * 2 - 1)


def test_categorical_cross_entropy_on_hand_values():
    target = torch.tensor([-1.0, 1.0, 0.2]).view(1, 1, 1, 3)  # bins 0, 255, 153
    uniform = torch.zeros(1, 256, 1, 1, 3)
    assert reconstruction_loss("categorical", uniform, target).item() == pytest.approx(math.log(256))
    peaked = uniform.clone()
    peaked[0, [0, 255, 153], 0, 0, [0, 1, 2]] = 3.0  # logit 3 on each pixel's true bin
    expected = -3.0 + math.log(math.exp(3.0) + 255)
    assert reconstruction_loss("categorical", peaked, target).item() == pytest.approx(expected, rel=1e-5)
    wrong = uniform.clone()
    wrong[0, 1, 0, 0, :] = 3.0  # logit 3 on bin 1, true bins elsewhere
    expected = math.log(math.exp(3.0) + 255)
    assert reconstruction_loss("categorical", wrong, target).item() == pytest.approx(expected, rel=1e-5)


def test_reconstruction_errors():
    with pytest.raises(ValueError, match="'huber'.*l1.*l2.*categorical"):
        reconstruction_loss("huber", torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="equal shapes"):
        reconstruction_loss("l1", torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 256, C, H, W\)"):
        reconstruction_loss("categorical", torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size, patches", [(32, 2), (64, 6), (256, 30)])
def test_patch_map_shape(size, patches):
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8))
    out = disc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, patches, patches)
    assert disc.output_size(size) == patches


def test_receptive_field_is_70_pixels():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=4, norm="none"))  # no BN: no cross-pixel stats
    images = torch.randn(1, 3, 256, 256, requires_grad=True)
    disc(images)[0, 0, 15, 15].backward()
    rows, cols = images.grad.abs().sum(dim=(0, 1)).nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1).item() == 70
    assert (cols.max() - cols.min() + 1).item() == 70


@pytest.mark.parametrize("norm", ["batch", "group", "none", "spectral"])
def test_norms_build_and_run(norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, norm=norm))
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_discriminator_init_and_errors():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig())  # taming's 64-channel, 3-layer default
    conv = disc.main[8]  # 256 -> 512 stride-1 conv, ~2M weights
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (512, 256, 4, 4)
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert abs(conv.weight.mean().item()) < 1e-4
    bn = disc.main[3]
    assert isinstance(bn, nn.BatchNorm2d) and bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="norm must be one of"):
        DiscriminatorConfig(norm="layer")
    with pytest.raises(ValueError, match="too small.*24"):
        disc(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------- LeCAM and R1


def test_lecam_on_tiny_case():
    lecam = LeCAM(decay=0.99)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    # first update: debiased EMAs equal the batch means (2, -0.5)
    # relu(r + 0.5)^2 = [2.25, 12.25] ; relu(2 - f)^2 = [9, 4]
    assert lecam(real, fake).item() == pytest.approx(7.25 + 6.5)
    real2, fake2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    lecam(real2, fake2)
    bias = 1 - 0.99**2
    ema_real, ema_fake = lecam.averages()
    assert ema_real.item() == pytest.approx((0.99 * 0.01 * 2.0 + 0.01 * 0.0) / bias, rel=1e-5)
    assert ema_fake.item() == pytest.approx((0.99 * 0.01 * -0.5 + 0.01 * 1.0) / bias, rel=1e-5)
    lecam.eval()
    before = lecam.num_updates.item()
    lecam(real, fake)
    assert lecam.num_updates.item() == before  # eval mode does not move the averages


def test_r1_penalty_on_tiny_case():
    a = torch.tensor(1.5, requires_grad=True)
    images = torch.randn(3, 2, 2, 2, requires_grad=True)
    logits = a * images.pow(2).flatten(1).sum(1)  # D(x) = a ||x||^2 -> grad_x = 2 a x
    r1 = r1_penalty(logits, images, gamma=10.0)
    per_image = 4 * 1.5**2 * images.detach().pow(2).flatten(1).sum(1)
    assert r1.item() == pytest.approx(5.0 * per_image.mean().item(), rel=1e-5)
    r1.backward()  # create_graph: the penalty trains the discriminator
    squared_norms = images.detach().pow(2).flatten(1).sum(1)  # d r1 / d a = gamma * 4 a E||x||^2
    assert a.grad.item() == pytest.approx(10.0 * 4 * 1.5 * squared_norms.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(logits, images.detach(), gamma=1.0)


# ---------------------------------------------------------------- composites


def test_loss_config_validation():
    with pytest.raises(ValueError, match="reconstruction_kind"):
        LossConfig(reconstruction_kind="huber")
    with pytest.raises(ValueError, match="hinge"):
        LossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match="r1_weight=-1"):
        LossConfig(r1_weight=-1)


class _L1Perceptual(nn.Module):
    """Stand-in perceptual module: mean |x - y| (keeps the composite test free of VGG)."""

    def forward(self, x, y):
        return (x - y).abs().mean()


def test_generator_loss_combines_terms():
    _, _, weight, _, _ = _tiny_decoder_problem()
    torch.manual_seed(1)
    z = torch.randn(2, 3)
    images = torch.randn(2, 2).view(2, 2, 1, 1)
    decoded = (z @ weight.T).view(2, 2, 1, 1)
    logits_fake = decoded.flatten(1).sum(1)  # a "discriminator" that depends on the decoder
    quant = torch.tensor(0.3)
    cfg = LossConfig(perceptual_weight=0.5, codebook_weight=2.0, disc_weight=0.8, disc_start=5)
    rec = (decoded - images).abs().mean()  # the stand-in perceptual term equals it too
    args = (cfg, images, decoded, decoded, quant, logits_fake, weight)

    total, logs = generator_loss(*args, step=4, perceptual=_L1Perceptual())  # warm-up: no adversarial term
    assert total.item() == pytest.approx((1.5 * rec + 2.0 * 0.3).item())
    assert logs["adaptive_weight"].item() == 0.0 and logs["adv_factor"].item() == 0.0
    assert logs["g_adv"].item() == pytest.approx(-logits_fake.mean().item())

    total, logs = generator_loss(*args, step=5, perceptual=_L1Perceptual())
    lam = adaptive_weight(1.5 * rec, -logits_fake.mean(), weight)
    assert lam.item() > 0 and logs["adaptive_weight"].item() == pytest.approx(lam.item())
    assert total.item() == pytest.approx((1.5 * rec + 0.6 - 0.8 * lam * logits_fake.mean()).item())
    assert all(not v.requires_grad for v in logs.values()) and total.requires_grad
    assert logs["perceptual_enabled"].item() == 1.0

    fixed, logs = generator_loss(dataclasses.replace(cfg, use_adaptive_weight=False), *args[1:], step=5)
    assert logs["adaptive_weight"].item() == 1.0
    assert fixed.item() == pytest.approx((rec + 0.6 - 0.8 * logits_fake.mean()).item())

    no_perceptual, logs = generator_loss(cfg, images, decoded, decoded, quant, None, weight, step=5)
    assert logs["perceptual"].item() == 0.0 and logs["perceptual_enabled"].item() == 0.0
    assert no_perceptual.item() == pytest.approx((rec + 0.6).item())


def test_generator_loss_categorical_uses_cross_entropy():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 4, 4) * 2 - 1
    logits = torch.zeros(1, 256, 3, 4, 4, requires_grad=True)
    cfg = LossConfig(reconstruction_kind="categorical", perceptual_weight=0.0)
    total, logs = generator_loss(cfg, images, logits, expected_image(logits), torch.tensor(0.0), None,
                                 logits, step=0)
    assert logs["rec"].item() == pytest.approx(math.log(256), rel=1e-5) and total.item() == logs["rec"].item()


def test_discriminator_loss_combines_terms():
    cfg = LossConfig(disc_start=3, lecam_weight=0.1, r1_weight=2.0)
    disc = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.constant_(disc.weight, 3.0)  # D(x) = 3x -> grad_x D = 3 -> R1 = 2/2 * 9 = 9
    images, fake = torch.randn(2, 1, 1, 1), torch.randn(2, 1, 1, 1)
    lecam = LeCAM(cfg.lecam_decay)
    total, logs = discriminator_loss(cfg, disc, images, fake, step=2, lecam=lecam)
    assert total.item() == 0.0  # warm-up
    total, logs = discriminator_loss(cfg, disc, images, fake, step=3, lecam=lecam)
    expected = d_loss("hinge", 3 * images, 3 * fake) + 0.1 * logs["lecam"] + 9.0
    assert logs["r1"].item() == pytest.approx(9.0)
    assert logs["d_real_logits"].item() == pytest.approx(3 * images.mean().item())
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    assert disc.weight.grad is not None and not images.requires_grad  # the caller's tensor is untouched
    with pytest.raises(ValueError, match="LeCAM"):
        discriminator_loss(cfg, disc, images, fake, step=3)


# ---------------------------------------------------------------- LPIPS weights


@pytest.fixture(autouse=True)
def _hermetic_hub(tmp_path, monkeypatch):
    """Every test: empty torch hub cache, no env override, and any download attempt fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(perceptual.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(perceptual.OFFLINE_ENV, raising=False)

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.fixture(scope="module")
def fake_vgg16_file(tmp_path_factory):
    """A random torchvision VGG16 checkpoint (features + a small classifier key; the real classifier is 500 MB)."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    state["classifier.6.bias"] = torch.zeros(1000)  # present in the real file, must be ignored
    path = tmp_path_factory.mktemp("weights") / VGG16_FILENAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def lpips_from_file(fake_vgg16_file):
    return LPIPS(weights_path=fake_vgg16_file)


def test_lpips_loads_backbone_from_file(lpips_from_file, fake_vgg16_file):
    state = torch.load(fake_vgg16_file, weights_only=True)
    net = lpips_from_file.model.net
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for name, conv in convs:
        index = name.split(".")[-1]  # slice{k}.{i} -> torchvision features.{i}
        assert torch.equal(conv.weight, state[f"features.{index}.weight"]), name
        assert torch.equal(conv.bias, state[f"features.{index}.bias"]), name
    assert lpips_from_file.weights_source == str(fake_vgg16_file)


def test_lpips_frozen_and_distance(lpips_from_file):
    assert all(not p.requires_grad for p in lpips_from_file.parameters())
    lpips_from_file.train()
    assert not any(m.training for m in lpips_from_file.modules())  # dropout in the heads stays off
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips_from_file(x, x).item() == 0.0
    per_image = lpips_from_file(x, y, reduction="none")
    assert per_image.shape == (2,) and (per_image > 0).all()
    assert lpips_from_file(x, y).item() == pytest.approx(per_image.mean().item())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lpips_from_file(x, y[:, :1])


def test_lpips_rejects_mismatched_checkpoint(lpips_from_file, fake_vgg16_file):
    state = torch.load(fake_vgg16_file, weights_only=True)
    state["features.30.weight"] = torch.zeros(1)  # e.g. vgg16_bn / another net
    with pytest.raises(ValueError, match="does not match"):
        load_vgg16_features(copy.deepcopy(lpips_from_file.model.net), state)
    del state["features.0.weight"]
    with pytest.raises(ValueError, match="features.0.weight"):
        load_vgg16_features(copy.deepcopy(lpips_from_file.model.net), state)


def test_weight_resolution_order(fake_vgg16_file, monkeypatch, tmp_path):
    cached = perceptual.hub_cache_path()
    assert str(cached).startswith(str(tmp_path))  # TORCH_HOME is honoured
    assert resolve_vgg16_weights(fake_vgg16_file) == fake_vgg16_file
    monkeypatch.setenv(perceptual.WEIGHTS_ENV, str(fake_vgg16_file))
    assert resolve_vgg16_weights() == fake_vgg16_file
    monkeypatch.delenv(perceptual.WEIGHTS_ENV)

    def fake_download(url, dst, hash_prefix=None, progress=True):
        assert url == VGG16_URL and hash_prefix == "397923af"
        torch.save({}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert resolve_vgg16_weights() == cached and cached.is_file()  # downloaded into the hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # a second call must not download
    assert resolve_vgg16_weights() == cached


def test_missing_weights_error_says_how_to_fix(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        LPIPS()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in (VGG16_FILENAME, VGG16_URL, perceptual.WEIGHTS_ENV, str(perceptual.hub_cache_path()),
                   "network disabled in tests"):
        assert needle in message, needle
    assert not lpips_available()


def test_missing_weights_offline_and_wrong_explicit_path(monkeypatch, tmp_path, fake_vgg16_file):
    monkeypatch.setenv(perceptual.OFFLINE_ENV, "1")
    with pytest.raises(MissingWeightsError, match="skipped"):
        resolve_vgg16_weights()
    with pytest.raises(MissingWeightsError, match="no_such.pth"):
        resolve_vgg16_weights(tmp_path / "no_such.pth")
    assert not lpips_available(tmp_path / "no_such.pth")
    assert lpips_available(fake_vgg16_file)


def test_random_backbone_is_explicit(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="vqgan.perceptual"):
        model = LPIPS(random_backbone=True)
    assert "RANDOM" in caplog.text and "random" in model.weights_source
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).item() == 0.0 and model(x, y).item() > 0
