"""Read other projects' checkpoints without running their pickles.

Released tokenizers ship as pickles: Lightning `.ckpt` files (state_dict, optimizer states, callback
state keyed by the callback's class) and LlamaGen `.pt` files (its training `argparse.Namespace`).
Unpickling can call any importable function, so a checkpoint from the internet could run code.
`torch.load(weights_only=True)` allows tensors, containers and primitive types only; on top of it we
allow the few harmless classes these files hold, each by its full name. Classes of libraries we
neither need nor import (Lightning's callbacks) load as an inert stand-in that keeps its state as
data and has no behaviour. Anything else is refused with an error naming the class, before it is
called. safetensors files hold tensors only and are read directly.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need an unknown class or function to unpickle."""


class InertObject:
    """Stand-in for a class we allow by name but never import: holds its arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Classes that appear as dict keys or holders of plain data in Lightning checkpoints (pytorch_lightning 1.x
# keys `callbacks` by the callback class; 2.x by a string, which needs nothing).
_LIGHTNING_CALLBACKS = ("model_checkpoint.ModelCheckpoint", "lr_monitor.LearningRateMonitor",
                        "early_stopping.EarlyStopping", "progress.tqdm_progress.TQDMProgressBar")
INERT_CLASSES: tuple[str, ...] = tuple(
    f"{package}.callbacks.{name}" for package in ("pytorch_lightning", "lightning.pytorch")
    for name in _LIGHTNING_CALLBACKS
)


def _numpy_globals() -> list[Any]:
    """numpy scalars (Lightning's best_model_score in old checkpoints) are a dtype and raw bytes."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's wheels here
        return []
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed the package
    scalar = core.multiarray.scalar
    found: list[Any] = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("Float32DType", "Float64DType", "Int64DType", "Int32DType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            found.append(getattr(np.dtypes, name))
    return found


def allowed_globals() -> list[Any]:
    """Everything beyond torch's own weights_only set that a checkpoint may name."""
    return [argparse.Namespace, *_numpy_globals(), *((InertObject, name) for name in INERT_CLASSES)]


_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path: str | Path) -> Any:
    """torch.load(path) with weights_only=True and the allowlist above; unknown classes are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        match = _GLOBAL_NAME.search(text)
        if match:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it needs the class or function {match.group(1)}, which is not on the "
                f"allowlist of harmless types (tensors, containers, argparse.Namespace, numpy scalars, Lightning "
                f"callback state); unpickling it could run arbitrary code"
            ) from None
        if isinstance(err, (OSError, EOFError, RuntimeError)) or "pickl" in type(err).__name__.lower():
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise UnsafeCheckpointError(f"{path} is not a readable torch checkpoint "
                                        f"({type(err).__name__}: {detail[:200]})") from None
        raise


def read_state_dict_file(path: str | Path) -> Mapping[str, Any]:
    """A safetensors file -> its tensors; a torch pickle (.ckpt / .pt / .pth / .bin) -> its top-level object."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return load_file(str(path), device="cpu")
    return safe_torch_load(path)
