"""Training checkpoint -> standalone tokenizer folder (`export_checkpoint`, `load_checkpoint`).

The folder format is vqgan/folder_format.py, the runtime tokenizer vqgan/tokenizer.py and the model card
vqgan/model_card.py. Their names were once re-exported from here (`from vqgan.export import VQTokenizer`);
those imports still work until vqgan 0.2 but warn (DeprecationWarning naming the real module).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import vqgan.folder_format as folder_format
import vqgan.model_card as model_cards
import vqgan.tokenizer as tokenizers
from vqgan.autoencoder import VQModel, VQModelConfig
from vqgan.config import from_dict
from vqgan.utils import deprecated_names

REMOVAL_VERSION = "0.2"
# the names once re-exported from here -> their module; `from vqgan.export import NAME` warns until REMOVAL_VERSION
_MOVED: dict[str, str] = {
    **{name: "vqgan.folder_format" for name in (
        "CARD_NAME", "CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "HUB_FILES", "ONNX_FILES", "PICKLE_SUFFIXES",
        "WEIGHTS_NAME", "ExportError", "load_state_dict_strict", "parse_tokenizer_config", "read_tokenizer_config",
        "tokenizer_config", "write_folder_atomically")},
    "model_card": "vqgan.model_card",
    "VQTokenizer": "vqgan.tokenizer",
}
__getattr__ = deprecated_names(__name__, _MOVED, REMOVAL_VERSION)


def load_checkpoint(checkpoint_dir: str | Path, use_ema: bool = True) -> tuple[VQModel, dict[str, Any] | None]:
    """A training checkpoint folder (contracts.md layout) -> (VQModel with its weights, train summary)."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise folder_format.ExportError(f"checkpoint folder {ckpt} does not exist")
    config_path = ckpt / "vqmodel_config.json"
    if not config_path.is_file():
        raise folder_format.ExportError(f"{ckpt} has no vqmodel_config.json; is it a checkpoint-NNNNNNN folder of a training run?")
    try:
        config = from_dict(VQModelConfig, json.loads(config_path.read_text(encoding="utf-8")))
    except ValueError as err:  # JSONDecodeError, ConfigError, a config class's own range check
        raise folder_format.ExportError(f"{config_path}: {err}") from None
    weights = ckpt / ("generator_ema.safetensors" if use_ema else "generator.safetensors")
    if not weights.is_file():
        hint = (" (the run kept no EMA; export the raw weights with --no-ema / use_ema=False)" if use_ema
                else "")
        raise folder_format.ExportError(f"{ckpt} has no {weights.name}{hint}")
    model = VQModel(config)
    folder_format.load_state_dict_strict(model, weights)
    summary_path = ckpt / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    if summary is not None:
        summary = {**summary, "weights": "EMA" if use_ema else "raw (no EMA)"}
    return model, summary


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    use_ema: bool = True,
    onnx: bool = False,
    onnx_image_size: tuple[int, int] | None = None,
) -> Path:
    """Export a training checkpoint as a tokenizer folder; `onnx` adds encoder.onnx and decoder.onnx.

    The ONNX graphs take a fixed image size, `onnx_image_size` (default: the training resolution).
    """
    model, summary = load_checkpoint(checkpoint_dir, use_ema)
    tokenizer = tokenizers.VQTokenizer.from_model(model, summary)
    del model
    if not onnx:
        return tokenizer.save_pretrained(out_dir)

    from vqgan.onnx_export import export_onnx

    size = onnx_image_size or tokenizer.image_size
    tokenizer.grid_shape(*size)  # fail before writing anything

    def write(folder: Path) -> None:
        tokenizer.write_files(folder)
        export_onnx(tokenizer, folder, size)
        config = folder_format.tokenizer_config(tokenizer.config, tokenizer.train_summary)
        card = model_cards.model_card(config, onnx_image_size=size)
        (folder / folder_format.CARD_NAME).write_text(card, encoding="utf-8")

    return folder_format.write_folder_atomically(out_dir, write)
