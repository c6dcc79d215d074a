"""Helpers for the converter tests: Lightning-style checkpoints written without Lightning, float64
comparisons, codebooks seeded from encoder outputs."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

CALLBACK_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextmanager
def fake_lightning_callback_class() -> Iterator[type]:
    """A class that pickles under Lightning's ModelCheckpoint name, without Lightning installed."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", CALLBACK_MODULE]
    saved = {name: sys.modules.get(name) for name in names}
    cls = type("ModelCheckpoint", (), {"__module__": CALLBACK_MODULE})
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[CALLBACK_MODULE].ModelCheckpoint = cls
    try:
        yield cls
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_lightning_checkpoint(state_dict: Mapping[str, torch.Tensor], path: Path, **extra: Any) -> Path:
    """A pytorch_lightning 1.x .ckpt as taming / latent-diffusion / SEED-Voken write them."""
    with fake_lightning_callback_class() as callback:
        ckpt = {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
                "state_dict": OrderedDict((k, v.detach().clone()) for k, v in state_dict.items()),
                "callbacks": {callback: {"best_model_score": torch.tensor(0.25), "best_model_path": "best.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
                "lr_schedulers": [], **extra}
        torch.save(ckpt, path)
    return path


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def seed_codebook(encoder_rows: torch.Tensor, num_codes: int, generator: torch.Generator) -> torch.Tensor:
    """(N, d) encoder outputs -> (K, d) codes: the rows themselves, then jittered copies of them.

    Random codes far from every encoder output make each nearest-code decision a near tie; codes among
    the encoder outputs make the comparison of indices mean something.
    """
    rows = encoder_rows.detach().double()
    picks = torch.randint(0, rows.shape[0], (num_codes,), generator=generator)
    scale = rows.std(dim=0, keepdim=True)  # (1, d)
    jitter = torch.randn(num_codes, rows.shape[1], generator=generator, dtype=torch.float64) * scale * 0.3
    codes = rows[picks] + jitter
    codes[: min(num_codes, rows.shape[0])] = rows[: min(num_codes, rows.shape[0])]
    return codes


def seeded_state(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for a state-dict layout (sorted key order, one CPU generator).

    The upstream fixtures store key names, shapes and outputs, not weights: the test and the fixture
    script regenerate the weights with this function. Conv/linear weights ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2); usage buffers (LlamaGen's codebook_used) are zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if "codebook_used" in name:
            out[name] = torch.zeros(shape)
        elif leaf == "bias":
            out[name] = noise * 0.05
        elif len(shape) == 1:  # GroupNorm scale
            out[name] = 1.0 + noise * 0.1
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[name] = noise / fan_in**0.5
    return out


def llamagen_vq16_folder(folder: Path) -> Path:
    """A tokenizer folder with the config that `vqgan-convert --from llamagen` gives LlamaGen's VQ-16.

    The config is read off VQ-16's key layout (names and shapes recorded with LlamaGen's code in the
    fixture) by the converter's own functions, on meta tensors; model.safetensors is an empty stand-in,
    since loading a recipe reads only config.json.
    """
    import json as _json

    from safetensors import safe_open

    from vqgan.autoencoder import VQModelConfig
    from vqgan.convert.common import infer_autoencoder, infer_quantizer
    from vqgan.convert.keymap import LLAMAGEN
    from vqgan.folder_format import tokenizer_config

    fixture = Path(__file__).parent / "fixtures" / "upstream" / "llamagen_tiny.safetensors"
    with safe_open(str(fixture), "pt") as handle:
        shapes = _json.loads(handle.metadata()["vq16_shapes"])
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = VQModelConfig(infer_autoencoder(state, LLAMAGEN, resolution=256, source="VQ-16"),
                           infer_quantizer(state, LLAMAGEN, l2_normalize=True, source="VQ-16"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(_json.dumps(tokenizer_config(config)))
    (folder / "model.safetensors").write_bytes(b"")
    return folder
