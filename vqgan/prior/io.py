"""Prior folders: `config.json` (kind + config) and `model.safetensors`; no pickle on either side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from vqgan.config import from_dict, to_dict
from vqgan.folder_format import ExportError, load_state_dict_strict
from vqgan.prior.maskgit import MaskGITConfig, MaskGITPrior
from vqgan.prior.pixelcnn import PixelCNNConfig, PixelCNNPrior
from vqgan.prior.transformer import TransformerConfig, TransformerPrior
from vqgan.prior.var import VARConfig, VARPrior
from vqgan.utils import replace_folder_atomically

FORMAT_VERSION = 1
PRIORS: dict[str, tuple[type, type[nn.Module]]] = {
    "transformer": (TransformerConfig, TransformerPrior),
    "pixelcnn": (PixelCNNConfig, PixelCNNPrior),
    "maskgit": (MaskGITConfig, MaskGITPrior),
    "var": (VARConfig, VARPrior),
}


def prior_kind(model: nn.Module) -> str:
    for kind, (_, cls) in PRIORS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"not a prior: {type(model).__name__}; expected one of {[c.__name__ for _, c in PRIORS.values()]}")


def build_prior(kind: str, config: Any) -> nn.Module:
    if kind not in PRIORS:
        raise ValueError(f"unknown prior kind {kind!r}; choose from {sorted(PRIORS)}")
    return PRIORS[kind][1](config)


def save_prior(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors into `directory`, replacing it only once complete."""
    meta = {"format_version": FORMAT_VERSION, "kind": prior_kind(model), "config": to_dict(model.config)}
    meta.update(extra or {})

    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")

    return replace_folder_atomically(Path(directory), write)


def load_prior(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a prior from its folder -> (model in eval mode, the config.json contents)."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a prior folder "
                                    "(expected config.json and model.safetensors, as train_prior writes)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{config_path}: not valid JSON ({err})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path} has format version {meta['format_version']}, newer than this "
                         f"vqgan's {FORMAT_VERSION}: upgrade vqgan")
    kind = meta.get("kind")
    if kind not in PRIORS:
        raise ValueError(f"{config_path}: unknown prior kind {kind!r}; expected one of {sorted(PRIORS)}")
    model = build_prior(kind, from_dict(PRIORS[kind][0], meta["config"]))
    load_state_dict_strict(model, weights_path)  # missing, unexpected or misshapen tensors: a clear error
    return model.to(device).eval(), meta
