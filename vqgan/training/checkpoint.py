"""Checkpoint folders: atomic save through Accelerate, newest-complete lookup for `resume=auto`, pruning.

A checkpoint is written into a hidden temporary folder and renamed into place only once every file is
on disk, so a run killed while saving leaves the previous checkpoint loadable. `train_state.json` is
written last and holds the step counter; a folder without it is never resumed from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from vqgan.utils import atomic_write_text

PREFIX = "checkpoint-"
STATE_FILE = "train_state.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def read_train_state(path: Path) -> dict[str, Any]:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(state_file.read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (ordered by the step stored inside each)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and (path / STATE_FILE).is_file():
            found.append((read_train_state(path)["step"], path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    train_state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    keep_last: int = 3,
) -> Path:
    """Save Accelerate's state plus our own files into root/checkpoint-STEP, atomically; keep the last K."""
    root = Path(root)
    final = root / checkpoint_name(train_state["step"])
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        atomic_write_text(tmp / STATE_FILE, json.dumps(train_state, indent=2))
        if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`resume`: "" (start fresh), "auto" (newest complete checkpoint under root, if any) or a path."""
    if resume == "":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume}: no such checkpoint folder (use 'auto', '' or a "
                                "runs/NAME/checkpoints/checkpoint-NNNNNNN folder)")
    read_train_state(path)  # raises a clear error for an incomplete folder
    return path


def save_modules(folder: Path, modules: dict[str, nn.Module | None]) -> None:
    """State outside Accelerate's (EMA weights, LeCAM averages) as safetensors files: {file name: module}."""
    for name, module in modules.items():
        if module is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, Path(folder) / name)


def resume(accelerator: Accelerator, resume_setting: str, root: Path, state: dict[str, Any],
           modules: dict[str, nn.Module | None]) -> Path | None:
    """Restore Accelerate's state, the train state (into `state`) and `modules` from the checkpoint to resume."""
    path = resolve_resume(resume_setting, root)
    if path is None:
        return None
    accelerator.load_state(str(path))
    state.update(read_train_state(path))
    for name, module in modules.items():
        if module is not None:
            module.load_state_dict(load_file(path / name, device=str(accelerator.device)))
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return path
