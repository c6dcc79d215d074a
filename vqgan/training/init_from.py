"""`model.init_from: PATH_OR_REPO`: start training from a tokenizer folder (ours, or one vqgan-convert wrote).

The folder's config.json is the base of `model.*`: a recipe sets only what it changes for training
(quantizer remedies, beta, dropout, resolution). What decides the weights' names and shapes must stay
the folder's; a recipe that changes it is refused, naming each field. The generator starts from the
folder's weights, the codebook included; a folder holds no training state, so the quantizer's starts
fresh, consistent with the loaded codes: the codebook counts as initialised, so k-means does not re-run
(unless the recipe turns `quantizer.kmeans_init` on over a folder that had it off), and an EMA codebook's
running sums restart from the codes (each code as if it had absorbed one vector). The discriminator
starts fresh, or from the folder's discriminator.safetensors (vqgan-convert --keep-discriminator);
`loss.disc_start` is its warm-up either way. A resumed run loads its checkpoint over all of this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from vqgan.autoencoder import VQModelConfig
from vqgan.config import ConfigError, to_dict
from vqgan.folder_format import (
    CONFIG_NAME,
    DISCRIMINATOR_NAME,
    WEIGHTS_NAME,
    read_tokenizer_config,
    resolve_folder,
)
from vqgan.training_state import reset_training_state, with_own_training_state

# Training options: free to change when fine-tuning. Every other model field is architecture.
_FREE_AUTOENCODER = ("dropout", "gradient_checkpointing", "resolution", "attn_resolutions")
_ARCHITECTURE_QUANTIZER = ("kind", "num_codes", "dim", "code_dim", "l2_normalize", "use_ema", "affine_reparam",
                           "fsq_levels")


def read_init_folder(init_from: str) -> tuple[Path, VQModelConfig]:
    folder = resolve_folder(init_from)
    config, _ = read_tokenizer_config(folder / CONFIG_NAME)
    return folder, config


def merge_model_section(model: Mapping[str, Any], init_from: str) -> dict[str, Any]:
    """The recipe's `model` section (without init_from) laid over the folder's config, section by section."""
    _, base_config = read_init_folder(init_from)
    merged = to_dict(base_config)
    for section, values in model.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _attention_levels(config: VQModelConfig) -> tuple[int, ...]:
    ae = config.autoencoder
    return tuple(i for i, res in enumerate(ae.level_resolutions) if res in ae.attn_resolutions)


def architecture_mismatches(config: VQModelConfig, source: VQModelConfig) -> list[str]:
    """'field: recipe X, init_from Y' for each weight-shaping field that differs."""
    wrong = []
    for name, value in to_dict(config.autoencoder).items():
        if name not in _FREE_AUTOENCODER and value != getattr(source.autoencoder, name) and not (
                isinstance(value, list) and tuple(value) == tuple(getattr(source.autoencoder, name))):
            wrong.append(f"model.autoencoder.{name}: recipe {value}, init_from {getattr(source.autoencoder, name)}")
    if _attention_levels(config) != _attention_levels(source):
        wrong.append(f"model.autoencoder.attn_resolutions: recipe {config.autoencoder.attn_resolutions} puts attention "
                     f"at levels {_attention_levels(config)}, init_from at {_attention_levels(source)}")
    for name in _ARCHITECTURE_QUANTIZER:
        mine, theirs = getattr(config.quantizer, name), getattr(source.quantizer, name)
        if mine != theirs:
            wrong.append(f"model.quantizer.{name}: recipe {mine}, init_from {theirs}")
    return wrong


def check_architecture(config: VQModelConfig, init_from: str) -> None:
    _, source = read_init_folder(init_from)
    wrong = architecture_mismatches(config, source)
    if wrong:
        raise ConfigError(f"model.init_from={init_from}: the recipe's model does not match the folder's weights: "
                          + "; ".join(wrong) + " (leave these out of the recipe: they come from the folder)")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    state = with_own_training_state(module, state)  # a folder's training state is never read
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing {', '.join(missing[:6])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:6])}"] if unexpected else []) + (
            [f"shape {', '.join(shapes[:6])}"] if shapes else [])
        raise ConfigError(f"{where}: the weights do not fit the model of the recipe: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_initial_weights(model: nn.Module, discriminator: nn.Module, config: VQModelConfig, discriminator_config: Any,
                         init_from: str) -> str:
    """Load the folder's generator (and discriminator, if it has one) into the fresh modules; returns a note."""
    folder, source = read_init_folder(init_from)
    state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    _load_strict(model, state, f"model.init_from={init_from}")
    reset_training_state(model)  # e.g. the codebook counts as initialised, EMA sums follow the codes
    if config.quantizer.kmeans_init and not source.quantizer.kmeans_init:
        model.quantizer.initialized.fill_(False)  # asked for: k-means over the first batch's encoder outputs
        model.quantizer.refresh_flags()
    note = f"generator from {init_from}"
    disc_path = folder / DISCRIMINATOR_NAME
    if disc_path.is_file():
        with safe_open(str(disc_path), "pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("config", "{}"))
        if saved and saved != to_dict(discriminator_config):
            raise ConfigError(f"model.init_from={init_from}: its discriminator is {saved}, the recipe's "
                              f"{to_dict(discriminator_config)}; set discriminator.* to match, or remove "
                              f"{DISCRIMINATOR_NAME} to start D fresh")
        _load_strict(discriminator, load_file(str(disc_path), device="cpu"), str(disc_path))
        note += ", discriminator from its discriminator.safetensors"
    else:
        note += ", discriminator fresh"
    return note

