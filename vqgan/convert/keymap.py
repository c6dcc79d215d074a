"""Our module tree <-> the key layouts of the taming family (taming, IBQ, latent-diffusion), LlamaGen and
diffusers' VQModel: one renaming, used both ways.

Every one of these is the same network (taming's Encoder/Decoder); they differ only in names: where the
blocks of a level live (`down.{i}.block.{j}`, `conv_blocks.{i}.res.{j}`, `down_blocks.{i}.resnets.{j}`),
how the decoder's levels are numbered (taming by level, LlamaGen and diffusers in execution order), and
the attention's projections (three 1x1 convs q, k, v, or diffusers' Linear to_q/to_k/to_v; ours is one
fused qkv conv, so one of our tensors is three of theirs, concatenated along the output channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from vqgan.autoencoder import AttnBlock, Downsample, ResBlock, Upsample, VQModel, VQModelConfig


class ConversionError(ValueError):
    """A source checkpoint that does not convert exactly (a piece we lack, a key that maps nowhere)."""


@dataclass(frozen=True)
class Layout:
    """How one project names the modules of the taming network."""

    name: str
    encoder_level: Callable[[int], str]  # level index (shallowest 0) -> prefix
    decoder_level: Callable[[int, int], str]  # (level index, execution index) -> prefix
    res: str  # "block" -> {level}.block.{j}
    attn: str
    downsample: str
    upsample: str
    mid: tuple[str, str, str]  # ResBlock, AttnBlock, ResBlock
    norm_out: str
    shortcut: str  # the 1x1 conv of a ResBlock that changes width
    attn_norm: str
    attn_qkv: tuple[str, str, str]
    attn_out: str
    codebook: str
    linear_attention: bool = False  # diffusers: to_q / to_k / to_v / to_out.0 are Linear (C, C)


TAMING = Layout(
    name="taming", encoder_level=lambda i: f"down.{i}", decoder_level=lambda level, k: f"up.{level}",
    res="block", attn="attn", downsample="downsample", upsample="upsample",
    mid=("mid.block_1", "mid.attn_1", "mid.block_2"), norm_out="norm_out", shortcut="nin_shortcut",
    attn_norm="norm", attn_qkv=("q", "k", "v"), attn_out="proj_out", codebook="quantize.embedding.weight",
)
LLAMAGEN = Layout(
    name="llamagen", encoder_level=lambda i: f"conv_blocks.{i}", decoder_level=lambda level, k: f"conv_blocks.{k}",
    res="res", attn="attn", downsample="downsample", upsample="upsample", mid=("mid.0", "mid.1", "mid.2"),
    norm_out="norm_out", shortcut="nin_shortcut", attn_norm="norm", attn_qkv=("q", "k", "v"), attn_out="proj_out",
    codebook="quantize.embedding.weight",
)
DIFFUSERS = Layout(
    name="diffusers", encoder_level=lambda i: f"down_blocks.{i}", decoder_level=lambda level, k: f"up_blocks.{k}",
    res="resnets", attn="attentions", downsample="downsamplers.0", upsample="upsamplers.0",
    mid=("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"), norm_out="conv_norm_out",
    shortcut="conv_shortcut", attn_norm="group_norm", attn_qkv=("to_q", "to_k", "to_v"), attn_out="to_out.0",
    codebook="quantize.embedding.weight", linear_attention=True,
)


def _block_names(module: torch.nn.Module, layout: Layout) -> dict[str, tuple[str, ...]]:
    """Leaf module of one of our blocks -> its name(s) in `layout`."""
    if isinstance(module, ResBlock):
        return {"norm1": ("norm1",), "conv1": ("conv1",), "norm2": ("norm2",), "conv2": ("conv2",),
                "shortcut": (layout.shortcut,)}
    if isinstance(module, AttnBlock):
        return {"norm": (layout.attn_norm,), "qkv": layout.attn_qkv, "proj_out": (layout.attn_out,)}
    if isinstance(module, (Downsample, Upsample)):
        return {"conv": ("conv",)}
    raise AssertionError(f"unexpected block {type(module).__name__}")


def _stage_pairs(stage: torch.nn.Sequential, ours: str, theirs: str, layout: Layout,
                 down_or_up: str) -> list[tuple[str, str, torch.nn.Module]]:
    """(our block prefix, their block prefix, block) for one level's Sequential."""
    pairs, res_index, attn_index = [], 0, 0
    for position, block in enumerate(stage):
        if isinstance(block, ResBlock):
            pairs.append((f"{ours}.{position}", f"{theirs}.{layout.res}.{res_index}", block))
            res_index += 1
        elif isinstance(block, AttnBlock):
            pairs.append((f"{ours}.{position}", f"{theirs}.{layout.attn}.{attn_index}", block))
            attn_index += 1
        else:
            pairs.append((f"{ours}.{position}", f"{theirs}.{down_or_up}", block))
    return pairs


def key_map(config: VQModelConfig, layout: Layout) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> their key(s) (three for a fused qkv), for every weight of the model.

    The quantizer's training counters (usage, step, k-means flag) have no counterpart and are left out.
    """
    with torch.device("meta"):  # names and shapes only: no memory, no init time
        model = VQModel(config)
    blocks: list[tuple[str, str, torch.nn.Module]] = []
    levels = len(config.autoencoder.channel_mult)
    for i, stage in enumerate(model.encoder.levels):
        blocks += _stage_pairs(stage, f"encoder.levels.{i}", f"encoder.{layout.encoder_level(i)}", layout,
                               layout.downsample)
    for k, stage in enumerate(model.decoder.levels):
        blocks += _stage_pairs(stage, f"decoder.levels.{k}", f"decoder.{layout.decoder_level(levels - 1 - k, k)}",
                               layout, layout.upsample)
    for part in ("encoder", "decoder"):
        mid = getattr(model, part).mid
        # without mid attention (aMUSEd) the two ResBlocks keep their names (diffusers: resnets.0 / .1)
        names = layout.mid if len(mid) == 3 else (layout.mid[0], layout.mid[2])
        blocks += [(f"{part}.mid.{j}", f"{part}.{name}", block) for j, (name, block) in enumerate(zip(names, mid))]
    mapping: dict[str, tuple[str, ...]] = {}
    for ours, theirs, block in blocks:
        for leaf, their_leaves in _block_names(block, layout).items():
            if getattr(block, leaf, None) is None or isinstance(getattr(block, leaf), torch.nn.Identity):
                continue
            for param in ("weight", "bias"):
                mapping[f"{ours}.{leaf}.{param}"] = tuple(f"{theirs}.{name}.{param}" for name in their_leaves)
    for part in ("encoder", "decoder"):
        for ours, theirs in (("conv_in", "conv_in"), ("norm_out", layout.norm_out), ("conv_out", "conv_out")):
            for param in ("weight", "bias"):
                mapping[f"{part}.{ours}.{param}"] = (f"{part}.{theirs}.{param}",)
    for conv in ("quant_conv", "post_quant_conv"):
        for param in ("weight", "bias"):
            mapping[f"{conv}.{param}"] = (f"{conv}.{param}",)
    mapping["quantizer.weight"] = (layout.codebook,)
    own = set(model.state_dict())
    assert set(mapping) <= own, sorted(set(mapping) - own)
    return mapping


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def import_state(config: VQModelConfig, theirs: Mapping[str, Tensor], layout: Layout,
                 source: str) -> dict[str, Tensor]:
    """Their generator weights -> our full state dict; every key of theirs used exactly once, or an error.

    The quantizer's counters start fresh and its `initialized` flag is set: the codebook is trained, so
    training from it must not re-run k-means.
    """
    mapping = key_map(config, layout)
    wanted = {key for keys in mapping.values() for key in keys}
    missing = sorted(wanted - set(theirs))
    unexpected = sorted(set(theirs) - wanted)
    if missing or unexpected:
        parts = ([f"missing: {_names(missing)}"] if missing else []) + (
            [f"not mapped: {_names(unexpected)}"] if unexpected else [])
        raise ConversionError(f"{source}: the {layout.name} weights do not match the model their config describes; "
                              + "; ".join(parts))
    model = VQModel(config)
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for ours, their_keys in mapping.items():
        tensors = [theirs[key] for key in their_keys]
        value = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        target = state[ours]
        if value.shape != target.shape:
            if value.numel() == target.numel() and value.dim() == 2 and target.dim() == 4:
                value = value.reshape(target.shape)  # diffusers' Linear attention projection = 1x1 conv
            else:
                raise ConversionError(f"{source}: {' + '.join(their_keys)} has shape {tuple(value.shape)}, "
                                      f"the converted config needs {tuple(target.shape)} for {ours}")
        out[ours] = value.detach().to(target.dtype).clone().contiguous()
    for key, value in state.items():  # the quantizer's own counters and flags
        if key not in out:
            out[key] = value.clone()
    out["quantizer.initialized"] = torch.tensor(True)
    return out


def export_state(model_state: Mapping[str, Tensor], config: VQModelConfig, layout: Layout) -> dict[str, Tensor]:
    """Our state dict -> their generator weights (the inverse of import_state on the mapped keys)."""
    out: dict[str, Tensor] = {}
    for ours, their_keys in key_map(config, layout).items():
        value = model_state[ours].detach().cpu()
        parts = value.chunk(len(their_keys), dim=0) if len(their_keys) > 1 else (value,)
        for key, part in zip(their_keys, parts):
            if layout.linear_attention and value.dim() == 4 and (".attentions." in key) and part.shape[2:] == (1, 1):
                part = part.reshape(part.shape[:2])  # a 1x1 conv as diffusers' Linear
            out[key] = part.clone().contiguous()
    return out

