"""A trained VQGAN as a standalone image tokenizer: `config.json` + `model.safetensors`, images <-> token ids.

The exported folder is everything a downstream program needs (the layout of diffusers' `VQModel`,
huggingface/diffusers `models/autoencoders/vq_model.py`): the model config as JSON, the weights as
safetensors, and a short model card. Loading never unpickles, so a folder from an untrusted source
cannot run code. The API works on images in [0, 1] (B, 3, H, W); the [-1, 1] range inside the model
stays inside.

    tok = VQTokenizer.from_pretrained("runs/NAME/checkpoints/checkpoint-0010000/tokenizer")
    ids = tok.encode(images)      # (B, H/f, W/f) int64 in [0, K)
    recon = tok.decode(ids)       # (B, 3, H, W) float in [0, 1]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vqgan.autoencoder import VQModel, VQModelConfig
from vqgan.config import from_dict, to_dict
from vqgan.utils import images_from_model_range, images_to_model_range, replace_folder_atomically

FORMAT_NAME = "vqgan-tokenizer"
FORMAT_VERSION = 1  # bump when config.json or the weight names change meaning; older readers refuse newer files
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
ONNX_FILES = ("encoder.onnx", "decoder.onnx")  # optional, written by vqgan.onnx_export
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_CONFIG_KEYS = frozenset(
    {"format", "format_version", "model", "num_codes", "code_dim", "downsample_factor", "image_size",
     "in_channels", "value_range", "train_summary"}
)


class ExportError(ValueError):
    """A tokenizer folder or checkpoint that cannot be loaded or written as asked."""


# ---------------------------------------------------------------------------------------------------
# config.json


def tokenizer_config(config: VQModelConfig, train_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of config.json: the model config plus the derived facts a downstream user needs."""
    resolution = config.autoencoder.resolution
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": to_dict(config),
        "num_codes": config.quantizer.num_codes,
        "code_dim": config.quantizer.lookup_dim,
        "downsample_factor": config.downsample_factor,
        "image_size": [resolution, resolution],  # the training resolution; any multiple of f works
        "in_channels": config.autoencoder.in_channels,
        "value_range": [0.0, 1.0],  # of images at the API (float), uint8 [0, 255] also accepted by encode
        "train_summary": dict(train_summary) if train_summary is not None else None,
    }


def parse_tokenizer_config(data: Mapping[str, Any], source: str = CONFIG_NAME) -> VQModelConfig:
    """config.json content -> VQModelConfig; a newer format, an unknown key or an inconsistency is an error."""
    if not isinstance(data, Mapping):
        raise ExportError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise ExportError(f"{source}: not a vqgan tokenizer config (format={data.get('format')!r}, "
                          f"expected {FORMAT_NAME!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"{source}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{source}: format_version {version} is newer than this vqgan supports "
            f"(format_version {FORMAT_VERSION}); upgrade vqgan to load this tokenizer"
        )
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ExportError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(_CONFIG_KEYS))}")
    if "model" not in data:
        raise ExportError(f"{source}: missing the 'model' section (the VQModelConfig)")
    try:
        config = from_dict(VQModelConfig, data["model"], "model")
    except ValueError as err:  # ConfigError, or a config class's own range check
        raise ExportError(f"{source}: {err}") from None
    # The derived fields are for readers that do not parse the model config; they must agree with it.
    expected = tokenizer_config(config)
    for key in ("num_codes", "code_dim", "downsample_factor", "in_channels"):
        if key in data and data[key] != expected[key]:
            raise ExportError(f"{source}: {key}={data[key]!r} contradicts the model config ({expected[key]!r})")
    return config


def read_tokenizer_config(path: str | Path) -> tuple[VQModelConfig, dict[str, Any]]:
    """Read config.json -> (VQModelConfig, the raw JSON object)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    return parse_tokenizer_config(data, str(path)), data


# ---------------------------------------------------------------------------------------------------
# weights


def _check_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ExportError(
            f"refusing to load {path}: it is a pickle file ({path.suffix}), and unpickling can run arbitrary "
            f"code. vqgan tokenizers load only {CONFIG_NAME} + {WEIGHTS_NAME}; export a training checkpoint "
            f"with `python tools/export_tokenizer.py CHECKPOINT_DIR OUT_DIR`"
        )


def load_state_dict_strict(module: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into `module`; missing, unexpected or misshapen tensors are an error."""
    path = Path(path)
    _check_pickle(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:

        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = ([f"missing keys: {names(missing)}"] if missing else []) + (
            [f"unexpected keys: {names(unexpected)}"] if unexpected else [])
        raise ExportError(f"{path}: weights do not match the model built from the config; " + "; ".join(parts))
    for key, tensor in state.items():
        if tensor.shape != own[key].shape:
            raise ExportError(f"{path}: {key} has shape {tuple(tensor.shape)}, the config builds "
                              f"{tuple(own[key].shape)}")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------
# atomic folders


def write_folder_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `out_dir`; an existing `out_dir` is replaced only then.

    Refuses to replace a non-empty folder that is not a vqgan tokenizer, so a typo cannot wipe data.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"output {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not _is_tokenizer_folder(out_dir):
            raise ExportError(f"output {out_dir} exists, is not empty and is not a vqgan tokenizer folder; "
                              f"refusing to replace it (choose another folder or remove it)")
    return replace_folder_atomically(out_dir, write)


def _is_tokenizer_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------
# the tokenizer


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

    def write_files(self, folder: Path) -> None:
        """Write the tokenizer files into an existing `folder` (not atomic; see save_pretrained)."""
        folder = Path(folder)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT_NAME,
                                                                 "format_version": str(FORMAT_VERSION)})
        config = tokenizer_config(self.config, self.train_summary)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / CARD_NAME).write_text(model_card(config), encoding="utf-8")

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
        folder = _resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
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
        ids = self.model.encode(images_to_model_range(x))  # (B, h, w)
        return ids.long()

    @_inference
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer ids -> (B, 3, h*f, w*f) float32 images in [0, 1]."""
        ids = self._check_ids(ids)
        images = self.model.decode_indices(ids)  # (B, 3, H, W) in [-1, 1]
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
        if ids.ndim != 3:
            raise ValueError(f"ids must have shape (B, h, w), got {tuple(ids.shape)}"
                             + (" (add a batch dimension with ids[None])" if ids.ndim == 2 else ""))
        if ids.numel() == 0:
            raise ValueError(f"ids is empty, shape {tuple(ids.shape)}")
        low, high = ids.min().item(), ids.max().item()
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"ids must lie in [0, {self.num_codes}) (K = {self.num_codes}), "
                             f"got values in [{low}, {high}]")
        return ids.to(self.device, torch.long)


def _resolve_folder(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local tokenizer folder, or the snapshot of a Hub repo holding only the safe files."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        _check_pickle(path)
        raise ExportError(f"{path} is a file; pass the tokenizer folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if path.is_dir():
        return _check_folder(path)
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ExportError(f"tokenizer folder {text} does not exist (and is not a Hub repo id such as 'owner/name')")
    from huggingface_hub import snapshot_download  # only here: local loading needs no hub client

    try:
        folder = snapshot_download(repo_id=text, allow_patterns=list(HUB_FILES), **hub_kwargs)
    except Exception as err:  # offline, unknown repo, bad id: all mean the same to the caller
        raise ExportError(f"{text} is not a local folder and could not be fetched from the Hub: {err}") from err
    return _check_folder(Path(folder), hub_id=text)


def _check_folder(folder: Path, hub_id: str | None = None) -> Path:
    name = hub_id or str(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _check_pickle(folder / pickles[0])
        hint = ""
        if (folder / "vqmodel_config.json").is_file():
            hint = " (this looks like a training checkpoint: export it with tools/export_tokenizer.py)"
        raise ExportError(f"{name} has no {WEIGHTS_NAME}{hint}; pickled weights are never loaded")
    if not (folder / CONFIG_NAME).is_file():
        raise ExportError(f"{name} has {WEIGHTS_NAME} but no {CONFIG_NAME}; the model is rebuilt from the config")
    return folder


# ---------------------------------------------------------------------------------------------------
# model card


def model_card(config: Mapping[str, Any], onnx_image_size: tuple[int, int] | None = None) -> str:
    """A short README.md: what the tokenizer is, how to load it, what it was trained on."""
    f, k, d = config["downsample_factor"], config["num_codes"], config["code_dim"]
    size = config["image_size"]
    h, w = size[0] // f, size[1] // f
    extra_files = ONNX_FILES if onnx_image_size else ()
    lines = [
        "---",
        "library_name: vqgan",
        "tags: [image-tokenizer, vqgan, vq-vae]",
        "---",
        "",
        "# VQGAN image tokenizer",
        "",
        f"- codebook: K = {k} codes of dimension {d}",
        f"- downsampling factor f = {f}: a {size[0]}x{size[1]} image becomes {h}x{w} = {h * w} tokens",
        "- images at the API: float in [0, 1] (or uint8), shape (B, 3, H, W), H and W multiples of f",
        f"- files: {CONFIG_NAME} (format {config['format_version']}), {WEIGHTS_NAME}"
        + "".join(f", {name}" for name in extra_files),
        "",
        "## Use",
        "",
        "```python",
        "from vqgan.export import VQTokenizer",
        "",
        'tok = VQTokenizer.from_pretrained("path/to/this/folder")  # or a Hub repo id',
        "ids = tok.encode(images)          # (B, H/f, W/f) int64 in [0, K)",
        "recon = tok.decode(ids)           # (B, 3, H, W) float in [0, 1]",
        "vectors = tok.embed(ids)          # (B, H/f, W/f, code_dim)",
        "```",
        "",
        "Loading reads only JSON and safetensors; nothing is unpickled.",
    ]
    if onnx_image_size:
        oh, ow = onnx_image_size
        lines += ["", f"The ONNX graphs take {oh}x{ow} images and any batch size: `encoder.onnx` maps `images` "
                      f"(float [0, 1], (B, 3, {oh}, {ow})) to `ids` (int64, (B, {oh // f}, {ow // f})); "
                      "`decoder.onnx` maps `ids` back to `images`."]
    summary = config.get("train_summary")
    lines += ["", "## Training", ""]
    if summary:
        for key in ("step", "images_seen", "data", "weights"):
            if key in summary:
                lines.append(f"- {key.replace('_', ' ')}: {summary[key]}")
        metrics = summary.get("metrics") or summary.get("eval") or {}
        if metrics:
            lines += ["", "| held-out metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {_fmt(value)} |" for name, value in sorted(metrics.items())]
    else:
        lines.append("Unknown (exported from a model without a training summary).")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------
# training checkpoint -> tokenizer folder


def load_checkpoint(checkpoint_dir: str | Path, use_ema: bool = True) -> tuple[VQModel, dict[str, Any] | None]:
    """A training checkpoint folder (contracts.md layout) -> (VQModel with its weights, train summary)."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise ExportError(f"checkpoint folder {ckpt} does not exist")
    config_path = ckpt / "vqmodel_config.json"
    if not config_path.is_file():
        raise ExportError(f"{ckpt} has no vqmodel_config.json; is it a checkpoint-NNNNNNN folder of a training run?")
    try:
        config = from_dict(VQModelConfig, json.loads(config_path.read_text(encoding="utf-8")))
    except ValueError as err:  # JSONDecodeError, ConfigError, a config class's own range check
        raise ExportError(f"{config_path}: {err}") from None
    weights = ckpt / ("generator_ema.safetensors" if use_ema else "generator.safetensors")
    if not weights.is_file():
        hint = (" (the run kept no EMA; export the raw weights with --no-ema / use_ema=False)" if use_ema
                else "")
        raise ExportError(f"{ckpt} has no {weights.name}{hint}")
    model = VQModel(config)
    load_state_dict_strict(model, weights)
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
    tokenizer = VQTokenizer.from_model(model, summary)
    del model
    if not onnx:
        return tokenizer.save_pretrained(out_dir)

    from vqgan.onnx_export import export_onnx

    size = onnx_image_size or tokenizer.image_size
    tokenizer.grid_shape(*size)  # fail before writing anything

    def write(folder: Path) -> None:
        tokenizer.write_files(folder)
        export_onnx(tokenizer, folder, size)
        config = tokenizer_config(tokenizer.config, tokenizer.train_summary)
        (folder / CARD_NAME).write_text(model_card(config, onnx_image_size=size), encoding="utf-8")

    return write_folder_atomically(out_dir, write)
