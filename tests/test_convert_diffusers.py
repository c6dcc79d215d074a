"""diffusers VQModel <-> vqgan: diffusers' own VQModel (random weights, codebook seeded from encoder
outputs), saved with save_pretrained, converted with vqgan-convert --from diffusers, compared in float64;
and vqgan-export --format diffusers / llamagen loaded back (diffusers.VQModel.from_pretrained, LlamaGen's
VQ-16 layout), round trips bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert_helpers import max_abs_diff, seed_codebook
from vqgan.autoencoder import AutoencoderConfig, VQModelConfig
from vqgan.cli.convert import main as convert_main
from vqgan.cli.export import main as export_main
from vqgan.convert import ConversionError, load_source
from vqgan.quantizers import QuantizerConfig
from vqgan.tokenizer import VQTokenizer

diffusers = pytest.importorskip("diffusers", reason="the [interop] extra (setup.sh installs it)")

TINY = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [32, 64], "layers_per_block": 1,
        "latent_channels": 8, "num_vq_embeddings": 64, "vq_embed_dim": 4, "norm_num_groups": 8, "sample_size": 16}


def build_diffusers(tmp_path: Path, **overrides) -> tuple[Path, "diffusers.VQModel", torch.Tensor]:
    torch.manual_seed(0)
    model = diffusers.VQModel(**{**TINY, **overrides}).eval()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits nothing here, but make norms and biases non-trivial
            p.add_(torch.randn_like(p) * 0.02)
        rows = model.encode(images[:2]).latents.permute(0, 2, 3, 1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(seed_codebook(rows, 64, torch.Generator().manual_seed(1)).float())
    model.save_pretrained(tmp_path / "diffusers_vq")
    return tmp_path / "diffusers_vq", model, images


def compare_with_diffusers(tok: VQTokenizer, theirs, images: torch.Tensor) -> dict[str, float]:
    ours, theirs = tok.model.double(), theirs.double()
    x = images.double()
    with torch.no_grad():
        z_theirs = theirs.encode(x).latents
        quant, _, (_, _, idx_theirs) = theirs.quantize(z_theirs)
        recon_theirs = theirs.decode(z_theirs).sample  # quantizes, post_quant_conv, decoder
        z_ours = ours.encode_latent(x)
        idx_ours = ours.quantizer.lookup(z_ours)
        recon_ours, _ = ours(x)
    assert torch.equal(idx_ours.reshape(-1), idx_theirs.reshape(-1))
    figures = {"z": max_abs_diff(z_ours, z_theirs), "recon": max_abs_diff(recon_ours, recon_theirs)}
    assert all(v < 1e-10 for v in figures.values()), figures
    return figures


@pytest.mark.parametrize("mid_attention", [True, False], ids=["vqmodel", "amused-no-mid-attention"])
def test_diffusers_vqmodel_converts_exactly(tmp_path, mid_attention):
    folder, theirs, images = build_diffusers(tmp_path, mid_block_add_attention=mid_attention)
    assert convert_main([str(folder), str(tmp_path / "out"), "--from", "diffusers"]) == 0
    tok = VQTokenizer.from_pretrained(tmp_path / "out")
    assert tok.config.autoencoder.mid_attention is mid_attention
    assert tok.config.quantizer.dim == 4 and tok.config.autoencoder.z_channels == 8
    assert load_source("diffusers", folder).source["keys_mapped"] == len(theirs.state_dict())
    compare_with_diffusers(tok, theirs, images)


def test_spatial_norm_and_other_blocks_are_refused(tmp_path):
    folder, _, _ = build_diffusers(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "norm_type": "spatial"}))
    with pytest.raises(ConversionError, match="SpatialNorm"):
        load_source("diffusers", folder)
    (folder / "config.json").write_text(json.dumps({**config, "up_block_types": ["AttnUpDecoderBlock2D"] * 2}))
    with pytest.raises(ConversionError, match="AttnUpDecoderBlock2D"):
        load_source("diffusers", folder)


def exportable_tokenizer(mid_attention: bool = True) -> VQTokenizer:
    torch.manual_seed(0)
    config = VQModelConfig(
        AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                          num_groups=8, resolution=16, mid_attention=mid_attention),
        QuantizerConfig(num_codes=64, dim=4, dead_code_threshold=3, beta=0.3))
    tok = VQTokenizer(config)
    with torch.no_grad():
        for p in tok.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tok


def test_export_diffusers_loads_in_diffusers_and_round_trips(tmp_path):
    tok = exportable_tokenizer()
    tok.save_pretrained(tmp_path / "ours")
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "diffusers"), "--format", "diffusers"]) == 0
    theirs, info = diffusers.VQModel.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    compare_with_diffusers(VQTokenizer.from_pretrained(tmp_path / "ours"), theirs, images)
    # ours -> diffusers -> ours: the same weights and config, bit for bit
    convert_main([str(tmp_path / "diffusers"), str(tmp_path / "back"), "--from", "diffusers"])
    back = VQTokenizer.from_pretrained(tmp_path / "back")
    assert back.config == tok.config
    original = tok.model.state_dict()
    for key, value in back.model.state_dict().items():
        if key.startswith("quantizer.") and key != "quantizer.weight":
            continue  # usage counters and flags: training statistics, restarted
        assert torch.equal(value, original[key]), key


def test_export_refuses_what_the_target_cannot_compute(tmp_path, capsys):
    tok = exportable_tokenizer()
    ibq = VQTokenizer(VQModelConfig(tok.config.autoencoder, QuantizerConfig(kind="ibq", num_codes=64, dim=4)))
    ibq.save_pretrained(tmp_path / "ibq")
    with pytest.raises(ConversionError, match="kind 'ibq' does not export to diffusers.*decode but"):
        from vqgan.convert.export_formats import export_tokenizer

        export_tokenizer(ibq, tmp_path / "x", "diffusers")
    assert export_main([str(tmp_path / "ibq"), str(tmp_path / "x"), "--format", "llamagen"]) == 2
    assert "error: quantizer kind 'ibq' does not export to LlamaGen" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="LlamaGen has attention at the deepest level"):
        export_tokenizer(tok, tmp_path / "y", "llamagen")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def llamagen_vq16_config() -> VQModelConfig:
    return VQModelConfig(
        AutoencoderConfig(base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                          z_channels=256, resolution=256),
        QuantizerConfig(num_codes=16384, dim=8, l2_normalize=True))


def test_export_llamagen_matches_vq16_layout_and_round_trips(tmp_path):
    from safetensors.torch import load_file

    from test_convert_llamagen_ibq import read_fixture

    _, meta = read_fixture("llamagen_tiny.safetensors")  # VQ-16's layout, recorded with LlamaGen's code
    vq16_shapes, vq16_args = json.loads(meta["vq16_shapes"]), json.loads(meta["vq16_args"])
    torch.manual_seed(0)
    tok = VQTokenizer(llamagen_vq16_config())
    tok.save_pretrained(tmp_path / "ours")
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "llamagen"), "--format", "llamagen"]) == 0
    weights = load_file(str(tmp_path / "llamagen" / "model.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == vq16_shapes  # what VQ_models["VQ-16"] loads strictly
    args = json.loads((tmp_path / "llamagen" / "config.json").read_text())
    assert {k: args[k] for k in vq16_args} == vq16_args  # VQ-16's ModelArgs, field for field
    convert_main([str(tmp_path / "llamagen"), str(tmp_path / "back"), "--from", "llamagen"])
    back = VQTokenizer.from_pretrained(tmp_path / "back")
    assert back.config == tok.config
    original = tok.model.state_dict()
    for key, value in back.model.state_dict().items():
        if key.startswith("quantizer.") and key != "quantizer.weight":
            continue
        assert torch.equal(value, original[key]), key


def test_export_diffusers_l2_codebook_encodes_and_decodes_the_same(tmp_path):
    """vq-l2: diffusers gets the unit codes; its distance search on the raw z picks the same codes."""
    base = exportable_tokenizer()
    config = VQModelConfig(base.config.autoencoder, QuantizerConfig(num_codes=64, dim=4, l2_normalize=True))
    tok = VQTokenizer(config)
    tok.model.load_state_dict(base.model.state_dict(), strict=False)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        rows = tok.model.encode_latent(images[:2]).permute(0, 2, 3, 1).reshape(-1, 4)
        tok.model.quantizer.weight.copy_(seed_codebook(rows, 64, torch.Generator().manual_seed(1)).float() * 3.0)
    tok.save_pretrained(tmp_path / "ours")
    export_main([str(tmp_path / "ours"), str(tmp_path / "diffusers"), "--format", "diffusers"])
    theirs = diffusers.VQModel.from_pretrained(tmp_path / "diffusers").eval()
    ours = VQTokenizer.from_pretrained(tmp_path / "ours").model
    with torch.no_grad():
        z = theirs.encode(images).latents
        _, _, (_, _, idx_theirs) = theirs.quantize(z)
        recon_theirs = theirs.decode(z).sample
        recon_ours, quant = ours(images)
    assert torch.equal(quant.indices.reshape(-1), idx_theirs.reshape(-1))
    assert max_abs_diff(recon_ours, recon_theirs) < 1e-5  # float32: the unit codes are bitwise the same
    convert_main([str(tmp_path / "diffusers"), str(tmp_path / "back"), "--from", "diffusers"])
    back = VQTokenizer.from_pretrained(tmp_path / "back")
    assert back.config == tok.config
    assert max_abs_diff(back.codebook, VQTokenizer.from_pretrained(tmp_path / "ours").codebook) < 1e-6
    assert torch.equal(back.encode((images + 1) / 2), VQTokenizer.from_pretrained(tmp_path / "ours").encode((images + 1) / 2))
