"""vqgan: adversarial VQGAN image tokenizers and the discrete priors that sample from them.

    from vqgan import VQTokenizer
    tok = VQTokenizer.from_pretrained("runs/quickstart/tokenizer")  # or a Hub repo id
    ids = tok.encode(images)            # images (B, 3, H, W) in [0, 1] -> (B, H/f, W/f) int64

Range convention: everything named encode/decode here (VQTokenizer) works on images in [0, 1]; the
model-level `VQModel.encode_model_range` / `decode_model_range` work on [-1, 1] and say so in their names.

The names below load lazily (PEP 562 module __getattr__), so `import vqgan` imports neither torch nor
any submodule; a name's module is imported the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    # tokenizer
    "VQTokenizer": ("vqgan.tokenizer", "VQTokenizer"),
    "load_tokenizer": ("vqgan.tokenizer", "load_tokenizer"),
    "export_checkpoint": ("vqgan.export", "export_checkpoint"),
    "ExportError": ("vqgan.folder_format", "ExportError"),
    # model and its parts
    "VQModel": ("vqgan.autoencoder", "VQModel"),
    "VQModelConfig": ("vqgan.autoencoder", "VQModelConfig"),
    "AutoencoderConfig": ("vqgan.autoencoder", "AutoencoderConfig"),
    "VectorQuantizer": ("vqgan.quantizers", "VectorQuantizer"),
    "QuantizerConfig": ("vqgan.quantizers", "QuantizerConfig"),
    "QuantizerOutput": ("vqgan.quantizers", "QuantizerOutput"),
    "PRESETS": ("vqgan.presets", "PRESETS"),
    "preset": ("vqgan.presets", "preset"),
    # priors
    "TransformerPrior": ("vqgan.prior.transformer", "TransformerPrior"),
    "TransformerConfig": ("vqgan.prior.transformer", "TransformerConfig"),
    "MaskGITPrior": ("vqgan.prior.maskgit", "MaskGITPrior"),
    "MaskGITConfig": ("vqgan.prior.maskgit", "MaskGITConfig"),
    "PixelCNNPrior": ("vqgan.prior.pixelcnn", "PixelCNNPrior"),
    "PixelCNNConfig": ("vqgan.prior.pixelcnn", "PixelCNNConfig"),
    "SamplingConfig": ("vqgan.prior.sampling", "SamplingConfig"),
    "sample_prior": ("vqgan.prior.sampling", "sample_prior"),
    "load_prior": ("vqgan.prior.pretrained", "from_pretrained"),
    "save_prior": ("vqgan.prior.io", "save_prior"),
    "push_prior_to_hub": ("vqgan.prior.pretrained", "push_to_hub"),
    "generate_images": ("vqgan.prior.generate", "generate_images"),
    # configs
    "load_config": ("vqgan.config", "load_config"),
    "ConfigError": ("vqgan.config", "ConfigError"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqgan' has no attribute {name!r}; public names: {', '.join(sorted(_EXPORTS))}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # cache: the next access is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from vqgan.autoencoder import AutoencoderConfig, VQModel, VQModelConfig
    from vqgan.config import ConfigError, load_config
    from vqgan.export import export_checkpoint
    from vqgan.folder_format import ExportError
    from vqgan.presets import PRESETS, preset
    from vqgan.prior.generate import generate_images
    from vqgan.prior.io import save_prior
    from vqgan.prior.maskgit import MaskGITConfig, MaskGITPrior
    from vqgan.prior.pixelcnn import PixelCNNConfig, PixelCNNPrior
    from vqgan.prior.pretrained import from_pretrained as load_prior
    from vqgan.prior.pretrained import push_to_hub as push_prior_to_hub
    from vqgan.prior.sampling import SamplingConfig, sample_prior
    from vqgan.prior.transformer import TransformerConfig, TransformerPrior
    from vqgan.quantizers import QuantizerConfig, QuantizerOutput, VectorQuantizer
    from vqgan.tokenizer import VQTokenizer, load_tokenizer
