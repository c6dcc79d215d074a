"""VAR's multi-scale tokenizer (Tian et al. 2024, arXiv:2404.02905; `vae_ch160v4096z32.pth`) -> our msvq kind.

    converted = convert_var("vae_ch160v4096z32.pth")   # VAR's scales 1 ... 16 and quant_resi 0.5 by default

VAR's VQVAE (models/vqvae.py) is taming's encoder/decoder (its basic_vae.py: attention at the deepest level
and in the middle, a fused qkv 1x1 conv as ours) around 3x3 quant_conv / post_quant_conv and VectorQuantizer2
(models/quant.py): one codebook `quantize.embedding` shared by every scale and the phi convs
`quantize.quant_resi.*` (PhiPartiallyShared `qresi_ls.{i}`, PhiShared `qresi`, PhiNonShared `{i}`). The
weights say how the phi convs are shared and how many scales there are (`quantize.ema_vocab_hit_SV`,
(scales, K), a training-time usage buffer, dropped); the scale sides and quant_resi are not in the weights:
VAR's defaults, or `config` (a JSON file of its arguments: patch_nums, quant_resi, beta).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from vqgan.autoencoder import VQModelConfig
from vqgan.convert.common import Converted, infer_autoencoder, split_sections, unwrap_checkpoint
from vqgan.convert.keymap import TAMING, ConversionError, import_state
from vqgan.convert.safe_load import read_state_dict_file
from vqgan.quantize import QuantizerConfig

# taming's names, with VAR's fused attention projection (basic_vae.AttnBlock.qkv), as ours
VAR_LAYOUT = dataclasses.replace(TAMING, name="var", attn_qkv=("qkv",))
GENERATOR = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.", "quantize.quant_resi.")
NOT_GENERATOR = ("quantize.ema_vocab_hit_SV",)  # per-scale code-usage EMA of training
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # build_vae_var's patch_nums
VAR_QUANT_RESI = 0.5  # VQVAE's default, used by the released tokenizer
VAR_BETA = 0.25
KNOWN_ARGS = ("patch_nums", "v_patch_nums", "quant_resi", "beta", "using_znorm", "share_quant_resi")

_PHI_PATTERNS = (  # VAR's module -> (our phi_sharing, regex of the conv's key)
    ("partial", re.compile(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$")),
    ("shared", re.compile(r"quantize\.quant_resi\.qresi\.(weight|bias)$")),
    ("per_scale", re.compile(r"quantize\.quant_resi\.(\d+)\.(weight|bias)$")),
)


def _read_args(config: str | Path | None, source: str) -> dict[str, Any]:
    if config is None:
        return {}
    args = json.loads(Path(config).read_text(encoding="utf-8"))
    if not isinstance(args, Mapping):
        raise ConversionError(f"{config}: expected a JSON object of VAR's arguments ({', '.join(KNOWN_ARGS)})")
    unknown = sorted(set(args) - set(KNOWN_ARGS))
    if unknown:
        raise ConversionError(f"{config}: unknown VAR arguments {unknown}; known: {', '.join(KNOWN_ARGS)}")
    if args.get("using_znorm"):
        raise ConversionError(f"{source}: using_znorm=True (cosine search, raw codes added) has no msvq counterpart")
    return dict(args)


def phi_layout(generator: Mapping[str, Tensor], source: str) -> tuple[str, dict[str, str]]:
    """(our phi_sharing, their phi key -> our key); ("none", {}) when VAR's phi is nn.Identity (quant_resi ~ 0)."""
    found: dict[str, dict[str, str]] = {}
    for key in generator:
        if not key.startswith("quantize.quant_resi."):
            continue
        for sharing, pattern in _PHI_PATTERNS:
            match = pattern.match(key)
            if match:
                number = match.group(1) if sharing != "shared" else "0"
                found.setdefault(sharing, {})[key] = f"quantizer.phi.{number}.{match.groups()[-1]}"
                break
        else:
            raise ConversionError(f"{source}: {key} is no phi conv of VAR's Phi / PhiShared / PhiPartiallyShared / "
                                  f"PhiNonShared")
    if len(found) > 1:
        raise ConversionError(f"{source}: phi convs of several sharing modes {sorted(found)}")
    if not found:
        return "none", {}
    sharing, keys = next(iter(found.items()))
    return sharing, keys


def var_config(generator: Mapping[str, Tensor], *, args: Mapping[str, Any] | None = None,
               resolution: int | None = None, usage_rows: int | None = None,
               source: str = "checkpoint") -> tuple[VQModelConfig, dict[str, str]]:
    """(our config, their phi key -> our key) read off VAR's generator weights (shapes only) and its arguments.

    usage_rows: the first dimension of quantize.ema_vocab_hit_SV (one row per scale), checked against the scales.
    """
    args = dict(args or {})
    scales = tuple(int(s) for s in args.get("patch_nums", args.get("v_patch_nums", VAR_SCALES)))
    if usage_rows is not None and usage_rows != len(scales):
        raise ConversionError(f"{source}: the checkpoint was trained with {usage_rows} scales "
                              f"(quantize.ema_vocab_hit_SV), not {len(scales)} {list(scales)}; pass its patch_nums "
                              f"with --config")
    sharing, phi_keys = phi_layout(generator, source)
    count = len({ours.rsplit(".", 1)[0] for ours in phi_keys.values()})
    if sharing == "per_scale" and count != len(scales):
        raise ConversionError(f"{source}: {count} non-shared phi convs for {len(scales)} scales "
                              f"(VAR's default_qresi_counts); msvq keeps one per scale")
    if "share_quant_resi" in args:
        expected = {0: "per_scale", 1: "shared"}.get(int(args["share_quant_resi"]), "partial")
        if sharing not in (expected, "none") or (expected == "partial" and count != int(args["share_quant_resi"])):
            raise ConversionError(f"{source}: share_quant_resi={args['share_quant_resi']} but the weights hold "
                                  f"{count} {sharing} phi convs")
    ratio = abs(float(args.get("quant_resi", VAR_QUANT_RESI)))
    if sharing == "none":
        ratio = 0.0  # VAR: nn.Identity for |quant_resi| <= 1e-6, no weights
    elif ratio == 0.0:
        raise ConversionError(f"{source}: quant_resi=0 but the weights hold phi convs")
    theirs = {k: v for k, v in generator.items() if k not in phi_keys}
    ae = infer_autoencoder(theirs, VAR_LAYOUT, resolution=resolution or 256, source=source)
    if resolution is None:  # the nominal size whose latent is the last scale (VAR: 16 x f16 = 256)
        ae = infer_autoencoder(theirs, VAR_LAYOUT, resolution=scales[-1] * ae.downsample_factor, source=source)
    ae = dataclasses.replace(ae, quant_conv_kernel=int(theirs["quant_conv.weight"].shape[-1]))
    if VAR_LAYOUT.codebook not in theirs:
        raise ConversionError(f"{source}: no codebook {VAR_LAYOUT.codebook}; is this VAR's VQVAE?")
    num_codes, dim = theirs[VAR_LAYOUT.codebook].shape
    quantizer = QuantizerConfig(kind="msvq", num_codes=num_codes, dim=dim, beta=float(args.get("beta", VAR_BETA)),
                                kmeans_init=False, dead_code_threshold=0, scales=scales, phi_ratio=ratio,
                                phi_sharing="partial" if sharing == "none" else sharing,
                                phi_count=count if sharing == "partial" else 4)
    return VQModelConfig(ae, quantizer), phi_keys


def convert_var_state(state: Mapping[str, Tensor], *, args: Mapping[str, Any] | None = None,
                      resolution: int | None = None, source: str = "checkpoint") -> Converted:
    """VAR's VQVAE state dict -> Converted (kind msvq)."""
    generator, dropped = split_sections(state, GENERATOR, NOT_GENERATOR, source)
    usage = state.get("quantize.ema_vocab_hit_SV")
    config, phi_keys = var_config(generator, args=args, resolution=resolution, source=source,
                                  usage_rows=None if usage is None else int(usage.shape[0]))
    theirs = {k: v for k, v in generator.items() if k not in phi_keys}
    ours = import_state(config, theirs, VAR_LAYOUT, source)
    missing = sorted(k for k in ours if k.startswith("quantizer.phi.") and k not in phi_keys.values())
    if missing:
        raise ConversionError(f"{source}: phi weights missing for {', '.join(missing)}")
    for their_key, our_key in phi_keys.items():
        if our_key not in ours or ours[our_key].shape != generator[their_key].shape:
            raise ConversionError(f"{source}: {their_key} {tuple(generator[their_key].shape)} does not fit {our_key}")
        ours[our_key] = generator[their_key].detach().to(ours[our_key].dtype).clone().contiguous()
    return Converted(config, ours, {"kind": "var", "path": source, "weights": "raw",
                                    "keys_mapped": len(generator), "keys_dropped": len(dropped)})


def convert_var(src: str | Path, *, config: str | Path | None = None, resolution: int | None = None,
                ema: bool | None = None) -> Converted:
    """VAR's VQVAE checkpoint (`vae_ch160v4096z32.pth`, a bare state dict; or .safetensors) -> Converted."""
    source = str(src)
    if ema:
        raise ConversionError(f"{source}: VAR's tokenizer checkpoints hold no EMA weights; convert without --ema")
    state = unwrap_checkpoint(read_state_dict_file(src), source)
    return convert_var_state(state, args=_read_args(config, source), resolution=resolution, source=source)
