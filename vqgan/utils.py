"""Small helpers shared across the toolkit. Each lives here once."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move it to `out_dir`: a reader sees the old folder or the new one, whole.

    Files get the usual permissions (mkdtemp and safetensors create owner-only ones).
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            # POSIX rename cannot replace a non-empty folder: move the old one aside, then swap.
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "x")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "x", out_dir)  # put the previous folder back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def format_count(n: int) -> str:
    """12_345_678 -> '12.35M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def images_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> [-1, 1], the range inside the models."""
    return images * 2.0 - 1.0


def images_from_model_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def as_grid(grid: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A token grid (h, w) from an int (square) or a pair; anything else is a ValueError."""
    pair = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid}")
    return pair


def to_numpy(array) -> "np.ndarray":
    """A tensor (any device, any float dtype) or array-like -> a NumPy array (bf16 goes through float32)."""
    import numpy as np

    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.is_floating_point() else array).numpy()
    return np.asarray(array)


def deprecated_names(module: str, moved: dict[str, str], removal: str) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) for names that moved: `moved[name]` is their module now.

    Importing one still works but warns (DeprecationWarning) with the new module and the version that drops it;
    the module itself must not bind these names, or the lookup never reaches here.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is deprecated and will be removed in vqgan {removal}: "
                      f"import it from {moved[name]} instead", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
