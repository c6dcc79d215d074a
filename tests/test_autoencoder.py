"""VQModel / encoder / decoder: shapes per preset, encode-decode round trip, gradients, attention
reference, categorical output, input validation and config round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from vqgan import autoencoder
from vqgan.autoencoder import (
    PRESETS,
    AttnBlock,
    AutoencoderConfig,
    Decoder,
    Encoder,
    VQModel,
    VQModelConfig,
    preset,
)
from vqgan.config import ConfigError, from_dict, to_dict
from vqgan.quantizers import QuantizerConfig, VectorQuantizer
from vqgan.utils import count_parameters

EXPECTED_FACTOR = {
    "tiny": 4,
    "cifar32_f4": 4,
    "taming_f4": 4,
    "imagenet256_f8": 8,
    "imagenet256_f16": 16,
    "imagenet256_f16_l2": 16,
}


def tiny_model(**autoencoder_changes) -> VQModel:
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, **autoencoder_changes))
    return VQModel(cfg)


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def test_presets_registry_matches_expected_names_and_factors():
    assert set(PRESETS) == set(EXPECTED_FACTOR)
    for name, factor in EXPECTED_FACTOR.items():
        assert preset(name).downsample_factor == factor


@pytest.mark.parametrize("name", sorted(EXPECTED_FACTOR))
def test_preset_encoder_decoder_shapes_on_meta(name):
    cfg = preset(name).autoencoder
    f, res = cfg.downsample_factor, cfg.resolution
    with torch.device("meta"):  # shapes only: no memory, no FLOPs, even for the 70M presets
        encoder, decoder = Encoder(cfg), Decoder(cfg)
        z = encoder(torch.empty(2, cfg.in_channels, res, res))
        out = decoder(z)
    assert z.shape == (2, cfg.z_channels, res // f, res // f)
    assert out.shape == (2, cfg.out_channels, res, res)


def preset_parameter_count(name: str) -> int:
    cfg = preset(name)
    with torch.device("meta"):
        return count_parameters(VQModel(cfg))


def test_preset_parameter_counts():
    counts = {name: preset_parameter_count(name) for name in EXPECTED_FACTOR}
    print("\n" + "\n".join(f"{name:>20}: {n / 1e6:7.2f}M" for name, n in counts.items()))
    assert counts["tiny"] < 1_000_000
    for name in ("imagenet256_f8", "imagenet256_f16", "imagenet256_f16_l2"):
        assert 60e6 < counts[name] < 80e6, (name, counts[name])
    # the counts add up: encoder + decoder + quantizer + the two 1x1 convs
    cfg = preset("imagenet256_f16")
    with torch.device("meta"):
        parts = (Encoder(cfg.autoencoder), Decoder(cfg.autoencoder), VectorQuantizer(cfg.quantizer))
    z = cfg.autoencoder.z_channels
    assert counts["imagenet256_f16"] == sum(map(count_parameters, parts)) + 2 * (z * z + z)


@pytest.mark.parametrize("quantizer", [{}, {"code_dim": 8, "l2_normalize": True}], ids=["plain", "l2_lowdim"])
def test_encode_then_decode_indices_equals_forward_reconstruction(quantizer):
    model = tiny_model()
    cfg = dataclasses.replace(model.config, quantizer=dataclasses.replace(model.config.quantizer, **quantizer))
    model = VQModel(cfg).eval()
    x = images()
    with torch.no_grad():
        reconstruction, quant = model(x)
        indices = model.encode_model_range(x)
        decoded = model.decode_model_range(indices)
    f, k = model.downsample_factor, model.config.quantizer.num_codes
    assert indices.shape == (2, 32 // f, 32 // f)
    assert indices.dtype == torch.long
    assert 0 <= int(indices.min()) and int(indices.max()) < k
    assert torch.equal(indices, quant.indices)
    assert reconstruction.shape == x.shape
    # the quantizer's forward value is exactly the looked-up code, so the two paths agree bit for bit
    assert torch.equal(decoded, model.to_images(reconstruction))
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_non_square_images_and_avg_downsampling():
    model = tiny_model(downsample="avg").eval()
    x = images(1, 32, 48)
    with torch.no_grad():
        reconstruction, quant = model(x)
    assert quant.indices.shape == (1, 8, 12)
    assert reconstruction.shape == (1, 3, 32, 48)


def test_gradients_reach_encoder_and_decoder_through_straight_through():
    model = tiny_model().train()
    x = images()
    reconstruction, _ = model(x)
    # reconstruction loss only: the encoder can be reached only through the straight-through path
    (reconstruction - x).abs().mean().backward()
    for part in (model.encoder, model.quant_conv, model.post_quant_conv, model.decoder):
        for name, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(autoencoder, "checkpoint", counting_checkpoint)
    plain, checkpointed = tiny_model().train(), tiny_model(gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = images()
    for model in (plain, checkpointed):
        reconstruction, quant = model(x)
        ((reconstruction - x).pow(2).mean() + quant.loss).backward()
    n_blocks = sum(isinstance(m, (autoencoder.ResBlock, AttnBlock)) for m in checkpointed.modules())
    assert len(calls) == n_blocks  # every res/attn block of the checkpointed model, none of the plain one
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_matches_contiguous():
    model = tiny_model().eval()
    x = images()
    with torch.no_grad():
        expected, _ = model(x)
        model = model.to(memory_format=torch.channels_last)
        got, _ = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_categorical_output_shape_and_to_images():
    model = tiny_model(output="categorical").eval()
    x = images()
    with torch.no_grad():
        logits, _ = model(x)
        decoded = model.decode_model_range(model.encode_model_range(x))
    assert logits.shape == (2, 256, 3, 32, 32)
    assert model.last_layer_weight.shape[0] == 256 * 3
    assert model.last_layer_weight is model.decoder.conv_out.weight
    torch.testing.assert_close(decoded, model.to_images(logits), atol=0, rtol=0)
    # hand-made logits: bin b at every pixel of channel c -> value b / 255 * 2 - 1
    bins = torch.tensor([0, 128, 255])
    hand = F.one_hot(bins, 256).float()  # (C, 256)
    hand = hand.T.reshape(1, 256, 3, 1, 1).expand(2, 256, 3, 4, 4)
    expected = (bins.float() / 255 * 2 - 1).reshape(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(model.to_images(hand), expected)
    assert model.to_images(hand)[:, 0].eq(-1).all() and model.to_images(hand)[:, 2].eq(1).all()


def test_attention_block_equals_handwritten_softmax_reference():
    torch.manual_seed(0)
    block = AttnBlock(16, num_groups=4)
    with torch.no_grad():  # non-trivial norm affine so the reference has to apply it too
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 3, 5)  # non-square: catches an h/w mix-up in the reshapes
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x))
    q, k, v = (t.reshape(b, c, h * w).transpose(1, 2) for t in qkv.split(c, dim=1))  # (B, HW, C)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)  # (B, HW, HW)
    attended = (weights @ v).transpose(1, 2).reshape(b, c, h, w)
    expected = x + block.proj_out(attended)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(3, 32, 32), r"rank 4 \(B, 3, H, W\), got shape \(3, 32, 32\)"),
        (torch.zeros(1, 1, 32, 32), r"expected 3 channels .* got 1"),
        (torch.zeros(1, 3, 30, 32), r"divisible by the downsampling factor 4, got 30x32"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"expected float images .* got dtype torch.uint8"),
        (torch.full((1, 3, 32, 32), float("nan")), r"expected finite images"),
    ],
)
def test_bad_images_raise_value_error_naming_expected_and_got(bad, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(bad)
    with pytest.raises(ValueError, match=message):
        model.encode_model_range(bad)


def test_bad_indices_raise_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"shape \(B, h, w\), got \(1, 1, 8, 8\)"):
        model.decode_model_range(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer indices, got dtype torch.float32"):
        model.decode_model_range(torch.zeros(1, 8, 8))
    too_big = torch.zeros(1, 8, 8, dtype=torch.long)
    too_big[0, 3, 4] = 256
    with pytest.raises(ValueError, match=r"in \[0, 256\), got values in \[0, 256\]"):
        model.decode_model_range(too_big)
    with pytest.raises(ValueError, match=r"in \[0, 256\), got values in \[-1, 0\]"):
        model.decode_model_range(-too_big.clamp(max=1))


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown preset 'imagenet512'") as err:
        preset("imagenet512")
    for name in EXPECTED_FACTOR:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_FACTOR))
def test_config_round_trip(name):
    cfg = preset(name)
    assert from_dict(VQModelConfig, to_dict(cfg)) == cfg
    assert from_dict(VQModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"attn_resolutions \[12\] match no feature-map size"):
        AutoencoderConfig(resolution=32, channel_mult=(1, 2), attn_resolutions=(12,))
    with pytest.raises(ConfigError, match=r"num_groups=32 must divide every level width \[16, 32\]"):
        AutoencoderConfig(base_channels=16, channel_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ConfigError, match=r"resolution=30 must be divisible by the downsampling factor 4"):
        AutoencoderConfig(resolution=30, channel_mult=(1, 2, 2), attn_resolutions=())
    with pytest.raises(ConfigError, match=r"unknown config key autoencoder.chanel_mult"):
        from_dict(VQModelConfig, {"autoencoder": {"chanel_mult": [1, 2]}})


def test_summary_reports_counts_and_tokens():
    model = tiny_model()
    text = model.summary()
    assert "f=4" in text and "8x8 = 64 tokens" in text and "K=256" in text
    assert f"{count_parameters(model) / 1e3:.2f}K" in text


def test_quantizer_dim_may_differ_from_z_channels_one_to_one():
    """LlamaGen's layout: quant_conv maps z (32) straight to the code space (4), no projection inside."""
    cfg = VQModelConfig(
        AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=32, num_groups=8, resolution=16),
        QuantizerConfig(num_codes=16, dim=4, l2_normalize=True),
    )
    model = VQModel(cfg)
    assert model.quant_conv.weight.shape == (4, 32, 1, 1)
    assert model.post_quant_conv.weight.shape == (32, 4, 1, 1)
    assert model.quantizer.project_in is None and model.quantizer.project_out is None
    assert not any("project" in key for key in model.state_dict())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, quant = model.eval()(images)
    assert recon.shape == images.shape and quant.indices.shape == (2, 8, 8)
    assert from_dict(VQModelConfig, to_dict(cfg)) == cfg


def test_old_config_without_mid_attention_key_loads_with_attention():
    data = to_dict(autoencoder.preset("tiny"))
    del data["autoencoder"]["mid_attention"]  # configs written before the switch existed
    cfg = from_dict(VQModelConfig, data)
    assert cfg.autoencoder.mid_attention
    assert any(isinstance(block, autoencoder.AttnBlock) for block in VQModel(cfg).encoder.mid)


def test_mid_attention_switch_removes_only_the_mid_attention():
    base = autoencoder.preset("tiny")
    off = dataclasses.replace(base, autoencoder=dataclasses.replace(base.autoencoder, mid_attention=False))
    with_attn, without = VQModel(base).state_dict(), VQModel(off).state_dict()
    # the AttnBlock between the two ResBlocks goes: the second ResBlock moves from mid.2 to mid.1
    assert all(key.replace(".mid.1.", ".mid.2.") in with_attn for key in without if ".mid.1." in key)
    assert sum(1 for key in with_attn if ".qkv." in key) == sum(1 for key in without if ".qkv." in key) + 4
    assert len(VQModel(off).decoder.mid) == 2 and len(VQModel(off).encoder.mid) == 2
