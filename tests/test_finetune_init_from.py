"""model.init_from: fine-tune a converted tokenizer (taming's modules, random weights, vqgan-convert) on the
embedded photos; the generator and D start from the converted weights, the codebook is kept, a mismatch is
refused by name, and the run resumes bit-identically."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from convert_helpers import save_lightning_checkpoint
from test_train import assert_same_checkpoint, fresh_accelerate_state, run, write_recipe  # noqa: F401 (fixture)
from vqgan.cli.convert import main as convert_main
from vqgan.config import ConfigError
from vqgan.train import load_train_config

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model",
                                   reason="taming-transformers-rom1504 (setup.sh installs it --no-deps)")
from taming.modules.discriminator.model import NLayerDiscriminator  # noqa: E402
from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: E402

DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny taming VQGAN + its PatchGAN, as a Lightning .ckpt, converted with --keep-discriminator."""
    tmp = tmp_path_factory.mktemp("taming")
    torch.manual_seed(0)
    modules = torch.nn.Module()
    modules.encoder, modules.decoder = taming_model.Encoder(**DDCONFIG), taming_model.Decoder(**DDCONFIG)
    modules.quantize = VectorQuantizer2(64, 32, beta=0.25)
    modules.quant_conv, modules.post_quant_conv = torch.nn.Conv2d(32, 32, 1), torch.nn.Conv2d(32, 32, 1)
    modules.loss = torch.nn.Module()
    modules.loss.discriminator = NLayerDiscriminator(input_nc=3, ndf=16, n_layers=2)
    with torch.no_grad():
        modules.quantize.embedding.weight.normal_()  # a trained-looking codebook, far from a k-means one
    ckpt = save_lightning_checkpoint(modules.state_dict(), tmp / "last.ckpt")
    out = tmp / "tokenizer"
    assert convert_main([str(ckpt), str(out), "--from", "taming", "--resolution", "32", "--keep-discriminator"]) == 0
    return out


def finetune_recipe(tmp_path, run_name, init_from, **extra):
    recipe = {
        "run_dir": str(tmp_path / run_name),
        "model": {"init_from": str(init_from)},
        "discriminator": {"base_channels": 16, "num_layers": 2, "norm": "batch"},
        "loss": {"perceptual_weight": 0.0, "disc_start": 2},
        "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},
        "optim": {"lr": 1e-4},
        "train": {"steps": 4, "batch_size": 4, "log_every": 1, "image_every": 100, "eval_every": 2,
                  "checkpoint_every": 2, "keep_checkpoints": 5, "tracker": "none", "progress_bar": False,
                  "mixed_precision": "no", "export_with_checkpoint": False},
    }
    for section, values in extra.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(tmp_path, recipe, f"{run_name}.yaml")


def test_generator_discriminator_and_codebook_start_from_the_converted_folder(tmp_path, converted):
    path = finetune_recipe(tmp_path, "start", converted, optim={"lr": 1e-12}, disc_optim={"lr": 1e-12},
                           train={"steps": 1, "checkpoint_every": 1, "ema_decay": 0.0})
    config = load_train_config(str(path), [])
    assert config.init_from == str(converted) and config.model.quantizer.num_codes == 64
    run(path)
    ckpt = tmp_path / "start" / "checkpoints" / "checkpoint-0000001"
    trained, start = load_file(ckpt / "generator.safetensors"), load_file(converted / "model.safetensors")
    for key in ("quantizer.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert float((trained[key] - start[key]).abs().max()) < 1e-6, key  # no k-means, no re-init
    disc, disc_start = load_file(ckpt / "model_1.safetensors"), load_file(converted / "discriminator.safetensors")
    assert float((disc["main.0.weight"] - disc_start["main.0.weight"]).abs().max()) < 1e-6


def test_converted_model_fine_tunes_and_resumes_bit_identically(tmp_path, converted):
    straight = finetune_recipe(tmp_path, "straight", converted)
    resumed = finetune_recipe(tmp_path, "resumed", converted)
    assert run(straight)["step"] == 4
    run(resumed)
    final = tmp_path / "resumed" / "checkpoints" / "checkpoint-0000004"
    shutil.rmtree(final)  # killed after step 2
    run(resumed)
    assert_same_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint-0000004", final)


def test_mismatches_are_refused_by_name(tmp_path, converted):
    path = finetune_recipe(tmp_path, "bad", converted)
    with pytest.raises(ConfigError, match=r"model.autoencoder.channel_mult: recipe \[1, 1, 2\], init_from \(1, 2\)"):
        load_train_config(str(path), ["model.preset=tiny"])
    with pytest.raises(ConfigError, match=r"model.quantizer.num_codes: recipe 128, init_from 64"):
        load_train_config(str(path), ["model.quantizer.num_codes=128"])
    with pytest.raises(ConfigError, match="its discriminator is .*set discriminator.\\* to match"):
        run(path, "discriminator.base_channels=32")


def test_kmeans_only_when_asked(tmp_path, converted):
    from vqgan.autoencoder import VQModel
    from vqgan.discriminator import PatchDiscriminator
    from vqgan.training.init_from import load_initial_weights

    for overrides, expect_initialized in (([], True), (["model.quantizer.kmeans_init=true"], False)):
        config = load_train_config(str(finetune_recipe(tmp_path, "k", converted)), overrides)
        model = VQModel(config.model)
        load_initial_weights(model, PatchDiscriminator(config.discriminator), config.model, config.discriminator,
                             config.init_from)
        assert bool(model.quantizer.initialized) is expect_initialized
