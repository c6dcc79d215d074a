"""taming-transformers VQGAN -> vqgan: built from taming's own modules (the PyPI wheel
taming-transformers-rom1504), random weights, a Lightning-style .ckpt + model.yaml, converted with
`vqgan-convert --from taming`, compared in float64 with the tokenizer folder it writes."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from convert_helpers import max_abs_diff, save_lightning_checkpoint, seed_codebook
from vqgan.cli.convert import main as convert_main
from vqgan.convert import ConversionError, load_source
from vqgan.tokenizer import VQTokenizer

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model",
                                   reason="taming-transformers-rom1504 (setup.sh installs it --no-deps)")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

# taming's configs/vqgan_imagenet_f16_1024.yaml (the f16 ImageNet model); K=16384 differs only in n_embed
F16_DDCONFIG = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}


class TamingVQModel(nn.Module):
    """taming.models.vqgan.VQModel's modules under its attribute names (the class itself imports Lightning)."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        self.encoder = taming_model.Encoder(**ddconfig)
        self.decoder = taming_model.Decoder(**ddconfig)
        self.loss = nn.Module()  # VQLPIPSWithDiscriminator's weights: dropped by the converter
        self.loss.discriminator = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.BatchNorm2d(8))
        self.loss.register_buffer("logvar", torch.zeros(()))
        self.quantize = taming_quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):  # taming's VQModel.encode
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


def taming_yaml(path, n_embed, ddconfig=F16_DDCONFIG, target="taming.models.vqgan.VQModel"):
    config = {"model": {"base_learning_rate": 4.5e-6, "target": target,
                        "params": {"embed_dim": 256, "n_embed": n_embed, "ddconfig": ddconfig,
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                  "params": {"disc_start": 250001, "disc_weight": 0.8}}}}}
    path.write_text(yaml.safe_dump(config))
    return path


def build_taming(n_embed: int, seed_images: torch.Tensor) -> TamingVQModel:
    torch.manual_seed(0)
    model = TamingVQModel(F16_DDCONFIG, n_embed, 256).eval()
    with torch.no_grad():
        rows = model.quant_conv(model.encoder(seed_images)).permute(0, 2, 3, 1).reshape(-1, 256)
        codes = seed_codebook(rows, n_embed, torch.Generator().manual_seed(1))
        model.quantize.embedding.weight.copy_(codes.float())
    return model


@pytest.mark.parametrize("n_embed", [1024, 16384])
def test_taming_f16_converts_exactly(tmp_path, n_embed):
    gen = torch.Generator().manual_seed(2)
    seed_images = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    theirs = build_taming(n_embed, seed_images)
    ckpt = save_lightning_checkpoint(theirs.state_dict(), tmp_path / "last.ckpt")
    yaml_path = taming_yaml(tmp_path / "model.yaml", n_embed)

    assert convert_main([str(ckpt), str(tmp_path / "out"), "--from", "taming", "--config", str(yaml_path)]) == 0
    tok = VQTokenizer.from_pretrained(tmp_path / "out")
    ours = tok.model.double()
    theirs = theirs.double()

    # every generator key mapped one to one; exactly loss.* dropped
    converted = load_source("taming", ckpt, config=yaml_path)
    generator_keys = [k for k in theirs.state_dict() if not k.startswith("loss.")]
    assert converted.source["keys_mapped"] == len(generator_keys)
    assert converted.source["keys_dropped"] == len([k for k in theirs.state_dict() if k.startswith("loss.")])
    assert tok.config.autoencoder.attn_resolutions == (16,) and tok.downsample_factor == 16
    assert tok.num_codes == n_embed and tok.config.quantizer.dim == 256

    images = torch.cat([seed_images[:2], torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1]).double()
    with torch.no_grad():
        z_theirs = theirs.quant_conv(theirs.encoder(images))
        z_ours = ours.encode_latent(images)
        quant_theirs, _, (_, _, idx_theirs) = theirs.quantize(z_theirs)
        idx_ours = ours.quantizer.lookup(z_ours)
        recon_theirs = theirs.decode(quant_theirs)
        recon_ours = ours.decode_latent(ours.quantizer.indices_to_codes(idx_ours))
        forward_ours, _ = ours(images)
    assert max_abs_diff(z_ours, z_theirs) < 1e-10
    assert torch.equal(idx_ours.reshape(-1), idx_theirs.reshape(-1))  # 100 % of the indices
    assert max_abs_diff(recon_ours, recon_theirs) < 1e-10
    assert max_abs_diff(forward_ours, recon_theirs) < 1e-10
    # and the tokenizer API (float32, [0, 1]) gives the same ids
    assert torch.equal(tok.float().encode((images[:2].float() + 1) / 2), idx_theirs.reshape(4, 2, 2)[:2])


def test_gumbel_and_kl_and_mismatched_yaml_are_refused(tmp_path):
    state = {"quantize.proj.weight": torch.zeros(4, 4, 1, 1), "quantize.embed.weight": torch.zeros(4, 4)}
    ckpt = save_lightning_checkpoint(state, tmp_path / "gumbel.ckpt")
    with pytest.raises(ConversionError, match="GumbelQuantize"):
        load_source("taming", ckpt)
    small = {**F16_DDCONFIG, "ch_mult": [1, 2], "ch": 32, "attn_resolutions": [], "z_channels": 32, "resolution": 32,
             "num_res_blocks": 1}
    torch.manual_seed(0)
    model = TamingVQModel(small, 16, 32)
    ckpt = save_lightning_checkpoint(model.state_dict(), tmp_path / "small.ckpt")
    with pytest.raises(ConversionError, match="GumbelQuantize"):
        load_source("taming", ckpt, config=taming_yaml(tmp_path / "g.yaml", 16, small,
                                                        target="taming.models.vqgan.GumbelVQ"))
    with pytest.raises(ConversionError, match=r"yaml and the weights disagree: ch: yaml 128, weights 32"):
        load_source("taming", ckpt, config=taming_yaml(tmp_path / "f16.yaml", 16))
    kl = {**small, "double_z": True}
    torch.manual_seed(0)
    ckpt = save_lightning_checkpoint(TamingVQModel(kl, 16, 32).state_dict(), tmp_path / "kl.ckpt")
    with pytest.raises(ConversionError, match="double_z=True"):
        load_source("taming", ckpt)
    # an extra generator-side key is not silently dropped
    state = dict(model.state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"not mapped: encoder.extra.weight"):
        load_source("taming", save_lightning_checkpoint(state, tmp_path / "extra.ckpt"))
