"""What every converter shares: the result type, reading the taming network's shape off the weights,
rebuilding EMA names, and writing the tokenizer folder.

A converter is a key map plus a config map (diffusers' `scripts/convert_*`): each source module returns
a `Converted` (our config, our state dict, what it dropped and why); nothing else writes files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from vqgan.autoencoder import AutoencoderConfig, VQModelConfig
from vqgan.convert.keymap import ConversionError, Layout
from vqgan.quantizers import QuantizerConfig


@dataclass(frozen=True)
class Converted:
    """A source checkpoint in our terms."""

    config: VQModelConfig
    state: dict[str, Tensor]  # our full VQModel state dict
    source: dict[str, Any]  # what it came from: kind, path, weights (raw / EMA), keys mapped and dropped
    discriminator: dict[str, Tensor] | None = field(default=None)  # their D in our PatchDiscriminator's names
    discriminator_config: Any = None  # its DiscriminatorConfig


def _indices(keys: set[str], prefix_pattern: str) -> list[int]:
    pattern = re.compile(prefix_pattern)
    return sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})


def _pattern(prefix: str) -> str:
    return re.escape(prefix).replace("@", r"(\d+)") + r"\."


def infer_autoencoder(state: Mapping[str, Tensor], layout: Layout, *, resolution: int, num_groups: int = 32,
                      source: str) -> AutoencoderConfig:
    """The taming network's shape read off its weights (channels, levels, blocks, where attention sits)."""
    keys = set(state)

    def need(key: str) -> Tensor:
        if key not in state:
            raise ConversionError(f"{source}: no {key}; is this a {layout.name} VQ checkpoint?")
        return state[key]

    conv_in = need("encoder.conv_in.weight")
    base, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels = _indices(keys, _pattern(f"encoder.{layout.encoder_level('@')}"))
    if levels != list(range(len(levels))) or not levels:
        raise ConversionError(f"{source}: encoder levels {levels} are not 0..n-1")
    mult, blocks_per_level, attention = [], set(), []
    for i in levels:
        level = f"encoder.{layout.encoder_level(i)}"
        res = _indices(keys, _pattern(f"{level}.{layout.res}.@"))
        blocks_per_level.add(len(res))
        width = need(f"{level}.{layout.res}.{res[-1]}.conv1.weight").shape[0]
        if width % base:
            raise ConversionError(f"{source}: level {i} width {width} is not a multiple of the base width {base}")
        mult.append(width // base)
        if _indices(keys, _pattern(f"{level}.{layout.attn}.@")):
            attention.append(i)
        if i != levels[-1] and f"{level}.{layout.downsample}.conv.weight" not in keys:
            raise ConversionError(f"{source}: level {i} downsamples without a conv (resamp_with_conv=False: average "
                                  f"pooling down and no conv up); our decoder always upsamples with a conv")
    if len(blocks_per_level) != 1:
        raise ConversionError(f"{source}: levels have different numbers of ResBlocks {sorted(blocks_per_level)}")
    z_channels = need("quant_conv.weight").shape[1]
    encoder_out = need("encoder.conv_out.weight").shape[0]
    if encoder_out != z_channels:
        raise ConversionError(f"{source}: encoder.conv_out gives {encoder_out} channels, quant_conv takes {z_channels} "
                              f"(double_z=True: a KL autoencoder's mean and log-variance, not a VQ model)")
    mid_attention = f"encoder.{layout.mid[1]}.{layout.attn_norm}.weight" in keys
    if any(resolution % 2 ** i for i in range(len(mult))):
        raise ConversionError(f"{source}: resolution {resolution} is not divisible by 2^{len(mult) - 1}")
    return AutoencoderConfig(
        in_channels=in_channels, out_channels=need("decoder.conv_out.weight").shape[0], base_channels=base,
        channel_mult=tuple(mult), num_res_blocks=blocks_per_level.pop(),
        attn_resolutions=tuple(resolution // 2**i for i in attention), z_channels=z_channels, dropout=0.0,
        num_groups=num_groups, resolution=resolution, mid_attention=mid_attention,
    )


def infer_quantizer(state: Mapping[str, Tensor], layout: Layout, *, kind: str = "vq", l2_normalize: bool = False,
                    source: str) -> QuantizerConfig:
    """Codebook size and width from the weights; training-time remedies off, since the codebook is trained."""
    if layout.codebook not in state:
        raise ConversionError(f"{source}: no codebook {layout.codebook}")
    num_codes, dim = state[layout.codebook].shape
    if state["quant_conv.weight"].shape[0] != dim:
        raise ConversionError(f"{source}: quant_conv gives {state['quant_conv.weight'].shape[0]} channels, "
                              f"the codebook holds {dim}-dim codes")
    extra = {"l2_normalize": l2_normalize} if kind == "vq" else {}
    return QuantizerConfig(kind=kind, num_codes=num_codes, dim=dim, kmeans_init=False, dead_code_threshold=0,
                           **extra)


def rebuild_ema(state: Mapping[str, Tensor], names: list[str], prefix: str = "model_ema.",
                source: str = "checkpoint") -> dict[str, Tensor]:
    """LitEma keeps `name` as the buffer `model_ema.<name without dots>`: map each name back, or fail."""
    by_flat: dict[str, str] = {}
    for name in names:
        flat = name.replace(".", "")
        if flat in by_flat:
            raise ConversionError(f"{source}: EMA names are ambiguous: {name} and {by_flat[flat]} both read {flat}")
        by_flat[flat] = name
    out: dict[str, Tensor] = {}
    for name in names:
        key = prefix + name.replace(".", "")
        if key not in state:
            raise ConversionError(f"{source}: the EMA weights lack {key} (for {name}); convert without --ema")
        out[name] = state[key]
    return out


def split_sections(state: Mapping[str, Tensor], generator_prefixes: tuple[str, ...],
                   dropped_prefixes: tuple[str, ...], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """(generator weights, dropped key names); a key in neither group is an error that names it."""
    generator, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key.startswith(generator_prefixes):
            generator[key] = value
        elif key.startswith(dropped_prefixes):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{source}: keys that belong to no part we know: {', '.join(sorted(unknown)[:8])}"
                              + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return generator, sorted(dropped)


def unwrap_checkpoint(obj: Any, source: str, candidates: tuple[str, ...] = ("state_dict",)) -> Mapping[str, Tensor]:
    """The state dict inside a checkpoint object (Lightning's `state_dict`, LlamaGen's `model` / `ema`)."""
    if isinstance(obj, Mapping):
        for key in candidates:
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{source}: no state dict under {list(candidates)}; found {found}")


def architecture(config: VQModelConfig) -> tuple:
    """The fields that decide the weights' names and shapes (what a config read off the weights can know)."""
    ae = config.autoencoder
    return (ae.in_channels, ae.out_channels, ae.base_channels, ae.channel_mult, ae.num_res_blocks, ae.z_channels,
            ae.num_groups, ae.mid_attention, config.quantizer.num_codes, config.quantizer.dim)


def write_converted(converted: Converted, out_dir: str | Path) -> Path:
    """Write the tokenizer folder (config.json + model.safetensors + card), atomically; loads it back to check."""
    from vqgan.folder_format import write_folder_atomically
    from vqgan.tokenizer import VQTokenizer

    tokenizer = VQTokenizer(converted.config, {"converted_from": converted.source})
    tokenizer.model.load_state_dict(converted.state, strict=True)

    def write(folder: Path) -> None:
        tokenizer.write_files(folder)
        if converted.discriminator is not None:
            import json

            from safetensors.torch import save_file

            from vqgan.config import to_dict
            from vqgan.folder_format import DISCRIMINATOR_NAME

            save_file({k: v.contiguous() for k, v in converted.discriminator.items()},
                      str(folder / DISCRIMINATOR_NAME),
                      metadata={"config": json.dumps(to_dict(converted.discriminator_config)),
                                "source": converted.source["kind"]})

    return write_folder_atomically(out_dir, write)
