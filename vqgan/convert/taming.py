"""taming-transformers VQGAN checkpoints (and latent-diffusion's VQ first stages) -> our tokenizer.

    converted = convert_taming("last.ckpt", "model.yaml")   # the yaml is optional: shapes come from the weights

taming's VQModel is encoder -> quant_conv -> VectorQuantizer2 -> post_quant_conv -> decoder, the network
ours reproduces (vqgan/autoencoder.py), so the weights map one to one (vqgan/convert/keymap.py). The
Lightning checkpoint also holds `loss.*` (LPIPS and the discriminator), dropped, and trainer state, ignored.
Pieces we do not have are refused, naming them: the Gumbel quantizer, index remapping, KL (double_z)
autoencoders, average-pool resampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from vqgan.autoencoder import VQModelConfig
from vqgan.convert.common import (
    Converted,
    infer_autoencoder,
    infer_quantizer,
    rebuild_ema,
    split_sections,
    unwrap_checkpoint,
)
from vqgan.convert.keymap import TAMING, ConversionError, import_state
from vqgan.convert.safe_load import read_state_dict_file

GENERATOR = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# loss.*: LPIPS + discriminator; model_ema.*: LitEma shadows (IBQ, latent-diffusion use_ema)
NOT_GENERATOR = ("loss.", "model_ema.")
DEFAULT_RESOLUTION = 256


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """taming's / latent-diffusion's / SEED-Voken's model.yaml -> {target, params}."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConversionError(f"{path}: no 'model' section")
    params = model.get("params", model.get("init_args"))  # taming: target/params; SEED-Voken: class_path/init_args
    target = model.get("target", model.get("class_path", ""))
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise ConversionError(f"{path}: model has no params.ddconfig (the encoder/decoder config)")
    return {"target": str(target), "params": params}


def check_yaml(yaml_config: Mapping[str, Any], config: VQModelConfig, source: str) -> None:
    """Refuse what we lack; the yaml's shapes must agree with the weights'."""
    target, params = yaml_config["target"], yaml_config["params"]
    dd = params["ddconfig"]
    if "Gumbel" in target or "gumbel" in str(params.get("quantconfig", "")).lower():
        raise ConversionError(f"{source}: {target} uses taming's GumbelQuantize, which vqgan has no quantizer for; "
                              f"only VectorQuantizer2 (VQModel) checkpoints convert")
    if params.get("remap"):
        raise ConversionError(f"{source}: the quantizer remaps indices (remap={params['remap']!r}); "
                              f"vqgan has no index remapping")
    if dd.get("double_z"):
        raise ConversionError(f"{source}: ddconfig.double_z=True is a KL autoencoder, not a VQ model")
    if dd.get("resamp_with_conv") is False:
        raise ConversionError(f"{source}: ddconfig.resamp_with_conv=False (no conv in Upsample); not supported")
    ae, q = config.autoencoder, config.quantizer
    expected = {"ch": ae.base_channels, "ch_mult": list(ae.channel_mult), "num_res_blocks": ae.num_res_blocks,
                "attn_resolutions": sorted(ae.attn_resolutions), "z_channels": ae.z_channels,
                "in_channels": ae.in_channels, "out_ch": ae.out_channels}
    given = {k: sorted(dd[k]) if k == "attn_resolutions" else (list(dd[k]) if k == "ch_mult" else dd[k])
             for k in expected if k in dd}
    wrong = {k: (given[k], expected[k]) for k in given if given[k] != expected[k]}
    for key, value in (("n_embed", q.num_codes), ("embed_dim", q.dim)):
        if key in params and params[key] != value:
            wrong[key] = (params[key], value)
    if wrong:
        raise ConversionError(f"{source}: the yaml and the weights disagree: "
                              + ", ".join(f"{k}: yaml {a}, weights {b}" for k, (a, b) in wrong.items()))


def convert_discriminator(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], Any]:
    """taming's NLayerDiscriminator (`loss.discriminator.main.*`) -> our PatchDiscriminator (the same `main`)."""
    from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator

    prefix = "loss.discriminator."
    theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not theirs:
        raise ConversionError(f"{source}: no loss.discriminator.* weights to keep")
    if any(k.endswith((".loc", ".scale")) for k in theirs):
        raise ConversionError(f"{source}: the discriminator uses ActNorm (use_actnorm=True), which vqgan's "
                              f"PatchDiscriminator does not have")
    convs = sorted(int(k.split(".")[1]) for k, v in theirs.items() if k.endswith(".weight") and v.dim() == 4)
    first = theirs["main.0.weight"]
    config = DiscriminatorConfig(in_channels=first.shape[1], base_channels=first.shape[0], num_layers=len(convs) - 2,
                                 norm="batch")
    own = PatchDiscriminator(config).state_dict()
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        raise ConversionError(f"{source}: loss.discriminator is not taming's NLayerDiscriminator with BatchNorm "
                              f"(keys or shapes differ from a {config.num_layers}-layer PatchGAN)")
    return {k: v.detach().clone() for k, v in theirs.items()}, config


def convert_taming_state(state: Mapping[str, Tensor], *, yaml_config: Mapping[str, Any] | None = None,
                         resolution: int | None = None, kind: str = "vq", ema: bool = False,
                         keep_discriminator: bool = False, source: str = "checkpoint",
                         source_kind: str = "taming") -> Converted:
    """A taming-layout state dict (Lightning's `state_dict`) -> Converted. Shared with IBQ (kind="ibq")."""
    if "quantize.proj.weight" in state or "quantize.embed.weight" in state:
        raise ConversionError(f"{source}: the quantizer is taming's GumbelQuantize (quantize.proj, quantize.embed), "
                              f"which vqgan has no quantizer for; only VectorQuantizer2 checkpoints convert")
    if "quantize.used" in state:
        raise ConversionError(f"{source}: the quantizer remaps indices (quantize.used); vqgan has no index remapping")
    if resolution is None:
        resolution = int(yaml_config["params"]["ddconfig"].get("resolution", DEFAULT_RESOLUTION)) if yaml_config \
            else DEFAULT_RESOLUTION
    generator, dropped = split_sections(state, GENERATOR, NOT_GENERATOR, source)
    weights = "raw"
    if ema:
        generator = rebuild_ema(state, sorted(generator), source=source)
        weights = "EMA"
    config = VQModelConfig(infer_autoencoder(generator, TAMING, resolution=resolution, source=source),
                           infer_quantizer(generator, TAMING, kind=kind, source=source))
    if yaml_config is not None:
        check_yaml(yaml_config, config, source)
    ours = import_state(config, generator, TAMING, source)
    disc, disc_config = convert_discriminator(state, source) if keep_discriminator else (None, None)
    return Converted(config, ours, {"kind": source_kind, "path": source, "weights": weights,
                                    "keys_mapped": len(generator), "keys_dropped": len(dropped),
                                    "discriminator": "kept" if disc is not None else "dropped"},
                     discriminator=disc, discriminator_config=disc_config)


def convert_taming(ckpt: str | Path, config: str | Path | None = None, *, resolution: int | None = None,
                   ema: bool = False, keep_discriminator: bool = False) -> Converted:
    """A taming / latent-diffusion VQModel `.ckpt` (+ optional model.yaml) -> Converted.

    keep_discriminator: also convert `loss.discriminator` (taming's PatchGAN) for fine-tuning.
    """
    state = unwrap_checkpoint(read_state_dict_file(ckpt), str(ckpt))
    yaml_config = read_yaml_config(config) if config is not None else None
    return convert_taming_state(state, yaml_config=yaml_config, resolution=resolution, ema=ema,
                                keep_discriminator=keep_discriminator, source=str(ckpt))
