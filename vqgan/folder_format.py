"""The tokenizer folder format: config.json schema, safetensors weights, pickle refusal, atomic folders.

The format half of a tokenizer, kept apart from the runtime model (vqgan/tokenizer.py) the way diffusers
keeps its ConfigMixin / ModelMixin I/O apart from the models (huggingface/diffusers `configuration_utils.py`,
`modeling_utils.py`). A folder is `config.json` + `model.safetensors` (+ a model card); loading never
unpickles, so a folder from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors.torch import load_file, save_file
from torch import nn

from vqgan.autoencoder import VQModelConfig
from vqgan.config import from_dict, to_dict
from vqgan.training_state import inference_state, with_own_training_state
from vqgan.utils import replace_folder_atomically

FORMAT_NAME = "vqgan-tokenizer"
# Bump when config.json or the weight names change meaning; older readers refuse newer files.
# 2: model.safetensors holds only what inference reads (no quantizer training state); 1 still loads.
FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# optional: a discriminator to fine-tune with (vqgan-convert --keep-discriminator; read by model.init_from)
DISCRIMINATOR_NAME = "discriminator.safetensors"
GRID_NAME = "reconstructions.png"  # optional: a reconstruction grid the model card shows
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


def check_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ExportError(
            f"refusing to load {path}: it is a pickle file ({path.suffix}), and unpickling can run arbitrary "
            f"code. vqgan tokenizers load only {CONFIG_NAME} + {WEIGHTS_NAME}; export a training checkpoint "
            f"with `vqgan-export CHECKPOINT_DIR OUT_DIR`"
        )


def load_state_dict_strict(module: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into `module`; missing, unexpected or misshapen tensors are an error.

    Training-only state (declared by each module, vqgan/training_state.py) is never read from the file:
    folders of format 1 written before this version carry it, newer ones do not; either way the module
    keeps its own.
    """
    path = Path(path)
    check_pickle(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None
    own = module.state_dict()
    state = with_own_training_state(module, state)
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


def save_state_dict(module: nn.Module, path: str | Path) -> None:
    """`module`'s inference weights (its training-only state left out) as contiguous CPU tensors in one
    safetensors file, tagged with the format."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in inference_state(module).items()}
    save_file(state, str(path), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})


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
        if any(out_dir.iterdir()) and not is_tokenizer_folder(out_dir):
            raise ExportError(f"output {out_dir} exists, is not empty and is not a vqgan tokenizer folder; "
                              f"refusing to replace it (choose another folder or remove it)")
    return replace_folder_atomically(out_dir, write)


def is_tokenizer_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def resolve_folder(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local tokenizer folder, or the snapshot of a Hub repo holding only the safe files."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        check_pickle(path)
        raise ExportError(f"{path} is a file; pass the tokenizer folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if path.is_dir():
        return check_folder(path)
    from vqgan.hub import HubError, download_folder, is_repo_id  # only here: local loading needs no hub client

    text = str(name_or_path)
    if isinstance(name_or_path, Path) or not is_repo_id(text):
        raise ExportError(f"tokenizer folder {text} does not exist (and is not a Hub repo id such as 'owner/name')")

    try:
        folder = download_folder(text, HUB_FILES, what="tokenizer", **hub_kwargs)
    except HubError as err:
        raise ExportError(str(err)) from None
    return check_folder(folder, hub_id=text)


def check_folder(folder: Path, hub_id: str | None = None) -> Path:
    name = hub_id or str(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            check_pickle(folder / pickles[0])
        hint = ""
        if (folder / "vqmodel_config.json").is_file():
            hint = " (this looks like a training checkpoint: export it with vqgan-export)"
        raise ExportError(f"{name} has no {WEIGHTS_NAME}{hint}; pickled weights are never loaded")
    if not (folder / CONFIG_NAME).is_file():
        raise ExportError(f"{name} has {WEIGHTS_NAME} but no {CONFIG_NAME}; the model is rebuilt from the config")
    return folder
