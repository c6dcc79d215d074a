"""diffusers `VQModel` folders (and aMUSEd's VQ-GAN) -> our tokenizer.

diffusers' VQModel is taming's network too: DownEncoderBlock2D / UpDecoderBlock2D levels without
attention, a mid block with one single-head attention (none in aMUSEd: `mid_block_add_attention=False`,
our `autoencoder.mid_attention`), Linear q/k/v projections (our fused 1x1 qkv conv). Refused, by name:
SpatialNorm decoders (`norm_type="spatial"`, MoVQ), other block types, other activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from vqgan.autoencoder import VQModelConfig
from vqgan.config import from_dict
from vqgan.convert.common import Converted, architecture, infer_autoencoder, infer_quantizer, split_sections, unwrap_checkpoint
from vqgan.convert.keymap import DIFFUSERS, ConversionError, import_state
from vqgan.convert.safe_load import read_state_dict_file

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GENERATOR = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")
# Written by vqgan-export into config.json (diffusers ignores keys starting with "_"): our full model
# config, so that ours -> diffusers -> ours is the identity, training options included.
VQGAN_CONFIG_KEY = "_vqgan_model"


def check_diffusers_config(config: Mapping[str, Any], source: str) -> None:
    """Refuse what our network lacks, naming the piece."""
    if config.get("_class_name", "VQModel") != "VQModel":
        raise ConversionError(f"{source}: a {config['_class_name']}, not a diffusers VQModel")
    if config.get("norm_type", "group") != "group":
        raise ConversionError(f"{source}: norm_type={config['norm_type']!r}: the decoder uses SpatialNorm (MoVQ), "
                              f"which vqgan's decoder does not have")
    if config.get("act_fn", "silu") != "silu":
        raise ConversionError(f"{source}: act_fn={config['act_fn']!r}; vqgan's blocks use SiLU")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        wrong = sorted({t for t in config.get(key, [allowed]) if t != allowed})
        if wrong:
            raise ConversionError(f"{source}: {key} {wrong}: only {allowed} converts")


def convert_diffusers(src: str | Path) -> Converted:
    """A diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors) -> Converted."""
    folder = Path(src)
    if folder.is_dir() and (folder / "vqvae" / "config.json").is_file():
        folder = folder / "vqvae"  # a pipeline folder (aMUSEd): its VQ-GAN subfolder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: a diffusers VQModel folder holds config.json and "
                              f"diffusion_pytorch_model.safetensors")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    source = str(folder)
    check_diffusers_config(config, source)
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise ConversionError(f"{source}: no {' or '.join(WEIGHT_NAMES)}")
    state = unwrap_checkpoint(read_state_dict_file(weights), str(weights))
    generator, dropped = split_sections(state, GENERATOR, (), source)
    groups = int(config.get("norm_num_groups", 32))
    inferred = VQModelConfig(
        infer_autoencoder(generator, DIFFUSERS, resolution=int(config.get("sample_size", 256)), num_groups=groups,
                          source=source),
        infer_quantizer(generator, DIFFUSERS, source=source),
    )
    model_config = inferred
    if VQGAN_CONFIG_KEY in config:  # exported by vqgan: the full config, checked against the weights
        model_config = from_dict(VQModelConfig, config[VQGAN_CONFIG_KEY], VQGAN_CONFIG_KEY)
        if architecture(model_config) != architecture(inferred):
            raise ConversionError(f"{source}: {VQGAN_CONFIG_KEY} in config.json does not describe these weights")
    ours = import_state(model_config, generator, DIFFUSERS, source)
    return Converted(model_config, ours, {"kind": "diffusers", "path": source, "weights": "raw",
                                          "keys_mapped": len(generator), "keys_dropped": len(dropped)})

