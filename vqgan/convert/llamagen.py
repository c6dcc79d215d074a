"""LlamaGen VQ-16 / VQ-8 tokenizers (Sun et al. 2024, arXiv:2406.06525) -> our tokenizer.

LlamaGen's VQModel is taming's network under other names (`conv_blocks.{i}.res.{j}`, decoder blocks
numbered in execution order, attention only at the deepest level) with an l2-normalised codebook of
8-dim codes reached through quant_conv (z_channels 256 -> 8): quantizer.dim = 8, one to one, no
projection. Sources: a training `.pt` ({"model", "ema", "args": argparse.Namespace, ...}; the EMA
weights when present, as its vq_demo.py), a bare state dict, or a hub folder (model.safetensors +
config.json of its ModelArgs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from vqgan.autoencoder import VQModelConfig
from vqgan.config import from_dict
from vqgan.convert.diffusers_vq import VQGAN_CONFIG_KEY
from vqgan.convert.common import Converted, architecture, infer_autoencoder, infer_quantizer, split_sections, unwrap_checkpoint
from vqgan.convert.keymap import LLAMAGEN, ConversionError, import_state
from vqgan.convert.safe_load import read_state_dict_file

GENERATOR = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")
NOT_GENERATOR = ("quantize.codebook_used",)  # a training-time usage window
DEFAULT_RESOLUTION = 256  # VQ-16 / VQ-8 are trained at 256 px; it only places the attention


def _model_args(obj: Any) -> dict[str, Any]:
    """ModelArgs-like fields from an argparse.Namespace, a config.json or a JSON file's content."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):  # PyTorchModelHubMixin's wrapping
        obj = obj["config"]
    return dict(obj) if isinstance(obj, Mapping) else {}


def _read(src: Path, ema: bool | None) -> tuple[Mapping[str, Tensor], dict[str, Any], str]:
    if src.is_dir():
        weights = next((src / name for name in ("model.safetensors", "pytorch_model.bin") if (src / name).is_file()),
                       None)
        if weights is None:
            raise ConversionError(f"{src}: a LlamaGen hub folder holds model.safetensors (or pytorch_model.bin)")
        config_path = src / "config.json"
        args = _model_args(json.loads(config_path.read_text())) if config_path.is_file() else {}
        return unwrap_checkpoint(read_state_dict_file(weights), str(weights)), args, "raw"
    obj = read_state_dict_file(src)
    args = _model_args(obj.get("args")) if isinstance(obj, Mapping) else {}
    has_ema = isinstance(obj, Mapping) and isinstance(obj.get("ema"), Mapping)
    if ema and not has_ema:
        raise ConversionError(f"{src}: --ema asked, but the checkpoint has no 'ema' weights")
    use_ema = has_ema if ema is None else ema
    candidates = ("ema",) if use_ema else ("model", "state_dict")
    return unwrap_checkpoint(obj, str(src), candidates), args, "EMA" if use_ema else "raw"


def convert_llamagen(src: str | Path, *, config: str | Path | None = None, resolution: int | None = None,
                     ema: bool | None = None) -> Converted:
    """A LlamaGen VQ checkpoint (.pt, state dict, or hub folder) -> Converted.

    `config`: a JSON file of its ModelArgs (e.g. {"codebook_l2_norm": true}), for a bare state dict; the
    l2 normalisation cannot be read off the weights and defaults to LlamaGen's (True).
    """
    src = Path(src)
    state, args, weights = _read(src, ema)
    if config is not None:
        args.update(_model_args(json.loads(Path(config).read_text(encoding="utf-8"))))
    source = str(src)
    if args.get("encoder_ch_mult") is not None and args.get("decoder_ch_mult") is not None \
            and list(args["encoder_ch_mult"]) != list(args["decoder_ch_mult"]):
        raise ConversionError(f"{source}: encoder_ch_mult {args['encoder_ch_mult']} differs from decoder_ch_mult "
                              f"{args['decoder_ch_mult']}; vqgan's decoder mirrors its encoder")
    if args.get("norm_type", "group") != "group":
        raise ConversionError(f"{source}: norm_type={args['norm_type']!r}; only GroupNorm models convert")
    generator, dropped = split_sections(state, GENERATOR, NOT_GENERATOR, source)
    l2 = bool(args.get("codebook_l2_norm", True))
    model_config = VQModelConfig(
        infer_autoencoder(generator, LLAMAGEN, resolution=resolution or DEFAULT_RESOLUTION, source=source),
        infer_quantizer(generator, LLAMAGEN, kind="vq", l2_normalize=l2, source=source),
    )
    if VQGAN_CONFIG_KEY in args:  # exported by vqgan-export --format llamagen: our full config travels along
        exported = from_dict(VQModelConfig, args[VQGAN_CONFIG_KEY], VQGAN_CONFIG_KEY)
        if architecture(exported) != architecture(model_config):
            raise ConversionError(f"{source}: {VQGAN_CONFIG_KEY} does not describe these weights")
        model_config = exported
    ours = import_state(model_config, generator, LLAMAGEN, source)
    return Converted(model_config, ours, {"kind": "llamagen", "path": source, "weights": weights,
                                          "keys_mapped": len(generator), "keys_dropped": len(dropped)})
