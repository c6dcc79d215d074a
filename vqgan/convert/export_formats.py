"""Our tokenizer -> the folders downstream code loads: a diffusers `VQModel` folder, or LlamaGen weights.

    vqgan-export out/tokenizer out/diffusers --format diffusers   # diffusers.VQModel.from_pretrained(OUT)
    vqgan-export out/tokenizer out/llamagen --format llamagen     # model.safetensors + config.json (ModelArgs)

The weights are renamed by the same key map the importers use (vqgan/convert/keymap.py), and our full
config travels in config.json under "_vqgan_model" (both readers ignore it), so ours -> X -> ours gives the
same weights and config bit for bit (one exception: an l2-normalised codebook goes to diffusers as unit
codes, since diffusers does not normalise; it comes back normalised, the same codes to rounding). What the
target cannot compute exactly is refused, naming it: ibq, fsq, lfq, simvq quantizers, a projection inside
the quantizer (code_dim), attention outside the mid block (diffusers), another width or depth than
VQ_models builds (LlamaGen).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vqgan.autoencoder import VQModelConfig
from vqgan.config import to_dict
from vqgan.convert.diffusers_vq import VQGAN_CONFIG_KEY, WEIGHT_NAMES
from vqgan.convert.keymap import DIFFUSERS, LLAMAGEN, ConversionError, export_state

FORMATS = ("diffusers", "llamagen")
LLAMAGEN_USAGE_WINDOW = 65536  # LlamaGen's quantize.codebook_used buffer (show_usage), loaded strictly


def _common_checks(config: VQModelConfig, target: str) -> None:
    ae, q = config.autoencoder, config.quantizer
    if q.kind != "vq":
        raise ConversionError(
            f"quantizer kind {q.kind!r} does not export to {target}: its quantizer finds the nearest code by distance "
            f"({'ibq picks the largest inner product, so its codes would decode but images would encode differently' if q.kind == 'ibq' else 'no lookup-free / scalar grid'}); "
            f"only kind 'vq' (plain or l2-normalised) exports")
    if q.code_dim not in (None, q.dim):
        raise ConversionError(f"quantizer.code_dim={q.code_dim} (a projection inside the quantizer) has no place in "
                              f"{target}'s model; LlamaGen's layout puts the small code space in quant_conv "
                              f"(quantizer.dim={q.code_dim} with no code_dim)")
    if q.affine_reparam:
        raise ConversionError(f"quantizer.affine_reparam has no place in {target}'s quantizer")
    if ae.quant_conv_kernel != 1:
        raise ConversionError(f"autoencoder.quant_conv_kernel={ae.quant_conv_kernel} (VAR's 3x3 quant_conv): "
                              f"{target}'s quant_conv / post_quant_conv are 1x1")
    if ae.output != "pixels" or ae.downsample != "conv":
        raise ConversionError(f"autoencoder output={ae.output!r} / downsample={ae.downsample!r}: {target} has "
                              f"pixel outputs and conv downsampling only")


def diffusers_config(config: VQModelConfig) -> dict:
    ae, q = config.autoencoder, config.quantizer
    _common_checks(config, "diffusers")
    if ae.attn_resolutions:
        raise ConversionError(f"attn_resolutions={ae.attn_resolutions}: diffusers' VQModel has attention only in "
                              f"its mid block (DownEncoderBlock2D / UpDecoderBlock2D have none)")
    if ae.channel_mult[0] != 1:
        raise ConversionError(f"channel_mult[0]={ae.channel_mult[0]}: diffusers' conv_in gives block_out_channels[0], "
                              f"the first level's width, so the first multiplier must be 1")
    levels = len(ae.channel_mult)
    return {
        "_class_name": "VQModel", "_diffusers_version": "0.30.0", "in_channels": ae.in_channels,
        "out_channels": ae.out_channels, "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ae.base_channels * m for m in ae.channel_mult], "layers_per_block": ae.num_res_blocks,
        "act_fn": "silu", "latent_channels": ae.z_channels, "sample_size": ae.resolution,
        "num_vq_embeddings": q.num_codes, "norm_num_groups": ae.num_groups, "vq_embed_dim": q.dim,
        "scaling_factor": 1.0, "norm_type": "group", "mid_block_add_attention": ae.mid_attention,
        "lookup_from_codebook": False, "force_upcast": False, VQGAN_CONFIG_KEY: to_dict(config),
    }


def llamagen_args(config: VQModelConfig) -> dict:
    ae, q = config.autoencoder, config.quantizer
    _common_checks(config, "LlamaGen")
    deepest = ae.level_resolutions[-1]
    if tuple(ae.attn_resolutions) != (deepest,) or not ae.mid_attention:
        raise ConversionError(f"attn_resolutions={ae.attn_resolutions}, mid_attention={ae.mid_attention}: LlamaGen "
                              f"has attention at the deepest level ({deepest}) and in the mid block only")
    if (ae.base_channels, ae.num_res_blocks, ae.num_groups) != (128, 2, 32):
        raise ConversionError(f"base_channels={ae.base_channels}, num_res_blocks={ae.num_res_blocks}, num_groups="
                              f"{ae.num_groups}: LlamaGen's VQModel builds ch=128, num_res_blocks=2, GroupNorm(32)")
    if (ae.in_channels, ae.out_channels) != (3, 3):
        raise ConversionError("LlamaGen's VQModel takes and gives 3-channel images")
    return {"codebook_size": q.num_codes, "codebook_embed_dim": q.dim, "codebook_l2_norm": q.l2_normalize,
            "codebook_show_usage": True, "commit_loss_beta": q.beta, "entropy_loss_ratio": 0.0,
            "encoder_ch_mult": list(ae.channel_mult), "decoder_ch_mult": list(ae.channel_mult),
            "z_channels": ae.z_channels, "dropout_p": ae.dropout, VQGAN_CONFIG_KEY: to_dict(config)}


def export_tokenizer(tokenizer, out_dir: str | Path, fmt: str) -> Path:
    """Write `tokenizer` (a VQTokenizer) as a `fmt` folder, atomically."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    config = tokenizer.config
    state = tokenizer.model.state_dict()
    if fmt == "diffusers":
        meta, weights = diffusers_config(config), export_state(state, config, DIFFUSERS)
        if config.quantizer.l2_normalize:
            # diffusers' VectorQuantizer normalises nothing; with unit-length codes its nearest code to the raw z
            # is the one of largest z.e, the same as the nearest to z / |z| (ours), and it outputs the unit code
            # as ours does. So the unit codes go in, and vq-l2 encodes and decodes exactly there too.
            weights["quantize.embedding.weight"] = tokenizer.model.quantizer.codebook.detach().cpu().clone()
        weights_name = WEIGHT_NAMES[0]
    else:
        meta, weights = llamagen_args(config), export_state(state, config, LLAMAGEN)
        weights["quantize.codebook_used"] = torch.zeros(LLAMAGEN_USAGE_WINDOW)
        weights_name = "model.safetensors"

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / weights_name),
                  metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ConversionError(f"output {out_dir} exists, is not empty and holds no config.json; refusing to replace it")
    from vqgan.utils import replace_folder_atomically

    return replace_folder_atomically(out_dir, write)


__all__ = ["FORMATS", "diffusers_config", "export_tokenizer", "llamagen_args"]
