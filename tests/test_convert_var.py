"""VAR's tokenizer (models/vqvae.py VQVAE) -> vqgan's msvq kind, against a fixture made with VAR's own code.

VAR is not on PyPI: tests/fixtures/upstream/make_upstream_fixtures.py built a tiny VQVAE of theirs (VAR commit
78b9539, recorded in the fixture; VAR's Encoder/Decoder with ch 32, ch_mult (1, 2), its default ten scales on a
16 x 16 latent), with weights from `seeded_state` and a codebook seeded from residual rows, and stored its
key layout, its float64 outputs (ids of every scale, the decode, the per-scale residual sums, the next-scale
inputs) and its float32 training forward. Here the same weights are saved as VAR saves them (a bare state dict
.pth), converted with vqgan-convert, and compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert_helpers import max_abs_diff, seeded_state
from vqgan.autoencoder import VQModel
from vqgan.cli.convert import main as convert_main
from vqgan.convert import ConversionError, load_source
from vqgan.convert.common import split_sections
from vqgan.convert.keymap import key_map
from vqgan.convert.var import GENERATOR, NOT_GENERATOR, VAR_LAYOUT, var_config
from vqgan.tokenizer import VQTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "var_tiny.safetensors"


def read_fixture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURE), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def var_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)  # the fixture script's var_images()
    return torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1


def var_state(fixture, meta) -> dict[str, torch.Tensor]:
    shapes = json.loads(meta["shapes"])
    state = seeded_state(shapes, int(meta["seed"]))
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(shapes["quantize.ema_vocab_hit_SV"])
    state["quantize.embedding.weight"] = fixture["codebook"]
    return state


def converted_tokenizer(tmp_path: Path) -> tuple[VQTokenizer, dict, dict]:
    fixture, meta = read_fixture()
    torch.save(var_state(fixture, meta), tmp_path / "vae_tiny.pth")  # as VAR's released vae_ch160v4096z32.pth
    assert convert_main([str(tmp_path / "vae_tiny.pth"), str(tmp_path / "out"), "--from", "var"]) == 0
    return VQTokenizer.from_pretrained(tmp_path / "out"), fixture, meta


def test_var_converts_exactly_in_float64(tmp_path):
    tok, fixture, meta = converted_tokenizer(tmp_path)
    q = tok.config.quantizer
    assert (q.kind, q.scales, q.phi_sharing, q.phi_count, q.phi_ratio) == \
        ("msvq", tuple(json.loads(meta["scales"])), "partial", 4, float(meta["quant_resi"]))
    assert tok.tokens_per_image(32, 32) == 680
    model = tok.model.double()
    images = var_images()
    with torch.no_grad():
        z = model.encode_latent(images)
        ids = model.quantizer.lookup(z)
        f_hats = model.quantizer.partial_reconstructions(z)
        residual_sums = torch.stack([(z - f_hat).sum(dim=(2, 3)) for f_hat in f_hats])
        decoded = model.decode_model_range(ids)
        var_input = model.quantizer.teacher_forcing_input(ids)
    assert torch.equal(ids, fixture["indices"]), f"{(ids == fixture['indices']).float().mean():.4f} of ids equal"
    figures = {"z_sum": max_abs_diff(z.sum(dim=(2, 3)), fixture["z_sum"]),
               "residual_sums": max_abs_diff(residual_sums, fixture["residual_sums"]),
               "decode": max_abs_diff(decoded, fixture["fhat_to_img_fp64"])}
    assert all(value <= 1e-10 for value in figures.values()), figures
    # VAR builds the next-scale inputs in float32 (idxBl_to_var_input's f̂ is float32 whatever the model's dtype)
    assert max_abs_diff(var_input.sum(dim=1), fixture["var_input_sum"]) < 1e-4
    assert max_abs_diff(var_input.square().sum(dim=1), fixture["var_input_sq_sum"]) < 1e-4


def test_var_converts_within_float32_tolerance_of_idxbl_to_img_and_its_training_forward(tmp_path):
    tok, fixture, meta = converted_tokenizer(tmp_path)
    model = tok.model.float()
    with torch.no_grad():
        decoded = model.decode_model_range(fixture["indices"])  # VAR's idxBl_to_img(same_shape=True, last_one=True)
        recon, quant = model(var_images().float())
    assert max_abs_diff(decoded, fixture["idxBl_to_img_fp32"]) < 1e-5
    assert torch.equal(quant.indices, fixture["indices"])
    assert max_abs_diff(recon, fixture["forward_recon_fp32"]) < 1e-5
    assert quant.loss.item() == pytest.approx(fixture["vq_loss_fp32"].item(), rel=1e-5)  # VAR's mean_vq_loss


def released_state(meta) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in json.loads(meta["released_shapes"]).items()}


def test_the_released_vae_ch160v4096z32_layout_maps_one_to_one():
    _, meta = read_fixture()
    state = released_state(meta)  # VAR's build_vae_var() tokenizer, names and shapes recorded with its code
    generator, dropped = split_sections(state, GENERATOR, NOT_GENERATOR, "released")
    assert dropped == ["quantize.ema_vocab_hit_SV"]
    config, phi_keys = var_config(generator, usage_rows=10, source="released")
    ae, q = config.autoencoder, config.quantizer
    assert (ae.base_channels, ae.channel_mult, ae.num_res_blocks, ae.z_channels, ae.resolution) == \
        (160, (1, 1, 2, 2, 4), 2, 32, 256)
    assert (ae.attn_resolutions, ae.mid_attention, ae.quant_conv_kernel) == ((16,), True, 3)
    assert (q.kind, q.num_codes, q.dim, q.scales, q.phi_sharing, q.phi_count, q.phi_ratio) == \
        ("msvq", 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "partial", 4, 0.5)
    mapping = key_map(config, VAR_LAYOUT)
    theirs = {key for keys in mapping.values() for key in keys} | set(phi_keys)
    assert theirs == set(generator)  # every weight of theirs has exactly one place in ours
    with torch.device("meta"):
        ours = VQModel(config).state_dict()
    for our_key, their_keys in mapping.items():
        assert ours[our_key].shape == state[their_keys[0]].shape, our_key
    for their_key, our_key in phi_keys.items():
        assert ours[our_key].shape == state[their_key].shape, our_key
    assert sum(s * s for s in q.scales) == 680


@pytest.mark.parametrize(("name", "sharing", "count"), [("shared", "shared", 1), ("non_shared", "per_scale", 10)])
def test_the_other_phi_sharing_modes_are_read_off_the_weights(name, sharing, count):
    _, meta = read_fixture()
    state = {k: v for k, v in released_state(meta).items() if not k.startswith("quantize.")}
    quantize = json.loads(meta["other_phi_shapes"])[name]  # VQVAE(share_quant_resi=1 / 0)'s quantize.* layout
    state.update({k: torch.empty(v, device="meta") for k, v in quantize.items()})
    generator, _ = split_sections(state, GENERATOR, NOT_GENERATOR, name)
    config, phi_keys = var_config(generator, source=name)
    assert (config.quantizer.phi_sharing, len({k.rsplit(".", 1)[0] for k in phi_keys.values()})) == (sharing, count)
    with torch.device("meta"):
        ours = VQModel(config).state_dict()
    assert {k for k in ours if k.startswith("quantizer.phi.")} == set(phi_keys.values())


def test_what_does_not_convert_exactly_is_refused_by_name(tmp_path):
    fixture, meta = read_fixture()
    state = var_state(fixture, meta)
    torch.save(state, tmp_path / "vae.pth")
    (tmp_path / "args.json").write_text(json.dumps({"patch_nums": [1, 2, 4, 8, 16]}))
    with pytest.raises(ConversionError, match=r"trained with 10 scales .* not 5"):
        load_source("var", tmp_path / "vae.pth", config=tmp_path / "args.json")
    (tmp_path / "args.json").write_text(json.dumps({"using_znorm": True}))
    with pytest.raises(ConversionError, match="using_znorm"):
        load_source("var", tmp_path / "vae.pth", config=tmp_path / "args.json")
    with pytest.raises(ConversionError, match="no EMA weights"):
        load_source("var", tmp_path / "vae.pth", ema=True)
    torch.save({**state, "quantize.quant_resi.extra.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(ConversionError, match="quantize.quant_resi.extra.weight is no phi conv"):
        load_source("var", tmp_path / "odd.pth")


def test_a_3x3_quant_conv_does_not_export_to_1x1_formats(tmp_path):
    from vqgan.autoencoder import AutoencoderConfig, VQModelConfig
    from vqgan.convert.export_formats import export_tokenizer
    from vqgan.quantize import QuantizerConfig

    ae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                           num_groups=8, resolution=16, quant_conv_kernel=3)
    tok = VQTokenizer(VQModelConfig(ae, QuantizerConfig(num_codes=16, dim=4)))
    for target in ("diffusers", "llamagen"):
        with pytest.raises(ConversionError, match="quant_conv_kernel=3"):
            export_tokenizer(tok, tmp_path / target, target)
        assert not (tmp_path / target).exists()
