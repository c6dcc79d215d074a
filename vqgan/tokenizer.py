"""A trained VQGAN as a standalone image tokenizer: images in [0, 1] <-> token ids.

The runtime half of a tokenizer (the folder format lives in vqgan/folder_format.py, the card in
vqgan/model_card.py). The API works on images in [0, 1] (B, 3, H, W); the [-1, 1] range inside the
model ("model range", `VQModel.encode_model_range`) stays inside.

    tok = VQTokenizer.from_pretrained("runs/NAME/checkpoints/checkpoint-0010000/tokenizer")
    ids = tok.encode(images)      # (B, H/f, W/f) int64 in [0, K)
    recon = tok.decode(ids)       # (B, 3, H, W) float in [0, 1]
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from vqgan.autoencoder import VQModel, VQModelConfig
from vqgan.folder_format import (
    CARD_NAME,
    CONFIG_NAME,
    GRID_NAME,
    HUB_FILES,
    WEIGHTS_NAME,
    load_state_dict_strict,
    read_tokenizer_config,
    resolve_folder,
    save_state_dict,
    tokenizer_config,
    write_folder_atomically,
)
from vqgan.model_card import model_card
from vqgan.utils import images_from_model_range, images_to_model_range


def _inference(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `method` under inference_mode and return a normal tensor.

    NOTE: the clone matters: an inference-mode tensor cannot enter an autograd graph (e.g. ids fed to
    an nn.Embedding of a prior being trained), and downstream training is what these outputs are for.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = method(*args, **kwargs)
        return out.clone(memory_format=torch.contiguous_format)  # plain NCHW even if a conv chose NHWC

    return wrapper


class VQTokenizer(nn.Module):
    """Images in [0, 1] (B, 3, H, W) <-> token ids (B, H/f, W/f); always in eval mode, no gradients."""

    def __init__(self, config: VQModelConfig, train_summary: Mapping[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.train_summary = dict(train_summary) if train_summary is not None else None
        self.model = VQModel(config)
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VQTokenizer:
        # NOTE: deliberately ignores `mode`: a tokenizer in training mode would update EMA codebooks,
        # usage counters and dropout, so the same image could get different ids.
        return super().train(False)

    # -- construction / persistence -----------------------------------------------------------------

    @classmethod
    def from_model(cls, model: VQModel, train_summary: Mapping[str, Any] | None = None) -> VQTokenizer:
        """A tokenizer holding a copy of `model`'s weights (the model itself is left untouched)."""
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
        model = getattr(model, "module", model)  # DistributedDataParallel wrapper
        tokenizer = cls(model.config, train_summary)
        tokenizer.model.load_state_dict(model.state_dict(), strict=True)
        return tokenizer.to(next(model.parameters()).device)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write config.json, model.safetensors and README.md into `save_directory`, atomically."""
        return write_folder_atomically(save_directory, self.write_files)

    def write_files(self, folder: Path, evaluation: Mapping[str, Any] | None = None,
                    reconstruction_grid: str | Path | None = None) -> None:
        """Write the tokenizer files into an existing `folder` (not atomic; see save_pretrained).

        `evaluation` (metric -> value, e.g. vqgan-evaluate's metrics.json) and a `reconstruction_grid` PNG
        go into the model card; the grid is copied beside it as reconstructions.png.
        """
        folder = Path(folder)
        save_state_dict(self.model, folder / WEIGHTS_NAME)
        config = tokenizer_config(self.config, self.train_summary)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if reconstruction_grid is not None:
            shutil.copyfile(reconstruction_grid, folder / GRID_NAME)
        card = model_card(config, evaluation=evaluation, grid=reconstruction_grid is not None)
        (folder / CARD_NAME).write_text(card, encoding="utf-8")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        evaluation: Mapping[str, Any] | None = None,
        reconstruction_grid: str | Path | None = None,
        commit_message: str = "Upload vqgan tokenizer",
        private: bool | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        api: Any = None,
    ) -> Any:
        """Upload config.json, model.safetensors and the model card (+ reconstructions.png) to `repo_id`.

        `api`: an `huggingface_hub.HfApi` (default: a new one with `token`). Returns the CommitInfo.
        """
        from vqgan.hub import push_folder

        if reconstruction_grid is not None and not Path(reconstruction_grid).is_file():
            raise FileNotFoundError(f"reconstruction grid {reconstruction_grid} does not exist")

        def write(folder: Path) -> None:
            self.write_files(folder, evaluation, reconstruction_grid)

        return push_folder(write, repo_id, (*HUB_FILES, GRID_NAME), commit_message=commit_message,
                           private=private, revision=revision, token=token, api=api)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> VQTokenizer:
        """Load from a local folder (offline) or a Hugging Face Hub repo id; never unpickles."""
        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only, token=token)
        config, data = read_tokenizer_config(folder / CONFIG_NAME)
        tokenizer = cls(config, data.get("train_summary"))
        load_state_dict_strict(tokenizer.model, folder / WEIGHTS_NAME)
        return tokenizer.to(device)

    # -- facts --------------------------------------------------------------------------------------

    @property
    def num_codes(self) -> int:
        return self.config.quantizer.num_codes

    @property
    def code_dim(self) -> int:
        return self.config.quantizer.lookup_dim

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def image_size(self) -> tuple[int, int]:
        """The training resolution (encode accepts any multiple of downsample_factor)."""
        return (self.config.autoencoder.resolution, self.config.autoencoder.resolution)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of an image -> (h, w) of its token grid."""
        f = self.downsample_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be positive multiples of the "
                             f"downsampling factor {f}")
        return height // f, width // f

    def tokens_per_image(self, height: int, width: int) -> int:
        h, w = self.grid_shape(height, width)
        if self.config.quantizer.kind == "msvq":  # one id sequence of Σ s² over the scales
            return self.model.quantizer.tokens_per_image
        return h * w

    @property
    @_inference
    def codebook(self) -> torch.Tensor:
        """(K, code_dim) code vectors of the lookup space (the vectors `embed` returns)."""
        return self.model.quantizer.codebook

    # -- images <-> ids -----------------------------------------------------------------------------

    @_inference
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] or uint8 -> (B, H/f, W/f) int64 ids on the tokenizer's device."""
        x = self._check_images(images)
        ids = self.model.encode_model_range(images_to_model_range(x))  # (B, h, w)
        return ids.long()

    @_inference
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer ids -> (B, 3, h*f, w*f) float32 images in [0, 1]."""
        ids = self._check_ids(ids)
        images = self.model.decode_model_range(ids)  # (B, 3, H, W) in [-1, 1]
        return images_from_model_range(images.float())

    @_inference
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, h, w, code_dim) code vectors, channels-last as sequence models want them."""
        ids = self._check_ids(ids)
        return self.model.quantizer.codebook[ids]  # (B, h, w, code_dim)

    # -- validation ---------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
        channels = self.config.autoencoder.in_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}"
                             + (" (add a batch dimension with images[None])" if images.ndim == 3 else ""))
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0)")
        self.grid_shape(images.shape[2], images.shape[3])
        if images.dtype == torch.uint8:
            return images.to(self.device, torch.float32) / 255.0
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1] or uint8 in [0, 255], got dtype {images.dtype}")
        x = images.to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        low, high = x.min().item(), x.max().item()
        if low < 0.0 or high > 1.0:
            raise ValueError(f"float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                             f"(images in [-1, 1] or [0, 255]? rescale first)")
        return x

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a torch.Tensor (B, h, w), got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor (int64), got dtype {ids.dtype}")
        if self.config.quantizer.kind == "msvq":  # (B, Σ s²) sequences, checked by the quantizer
            self.model.quantizer.split_scales(ids)
        elif ids.ndim != 3:
            raise ValueError(f"ids must have shape (B, h, w), got {tuple(ids.shape)}"
                             + (" (add a batch dimension with ids[None])" if ids.ndim == 2 else ""))
        if ids.numel() == 0:
            raise ValueError(f"ids is empty, shape {tuple(ids.shape)}")
        low, high = ids.min().item(), ids.max().item()
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"ids must lie in [0, {self.num_codes}) (K = {self.num_codes}), "
                             f"got values in [{low}, {high}]")
        return ids.to(self.device, torch.long)


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> VQTokenizer:
    """`VQTokenizer.from_pretrained(name_or_path, **kwargs)`: a folder or Hub repo id (revision=..., device=...)."""
    return VQTokenizer.from_pretrained(name_or_path, **kwargs)
