"""Checkpoint folders: atomic multi-process save, newest-complete resume, pruning, config drift.

A checkpoint is written into a hidden temporary folder by every process (Accelerate's state: model,
optimizer, scheduler and scaler files from the main process, one RNG file per process), then ours
(safetensors of the EMA and other modules, the resolved config, the exported tokenizer), and is
renamed into place by the main process only after a barrier, so every rank's files are inside.
`train_state.json` is written last and holds the step counter; a folder without it is never resumed
from. Old folders are renamed aside before they are deleted, so a kill mid-prune leaves no
half-deleted folder that still looks complete. A kill at any moment leaves the previous checkpoint.

Module files here hold whole state dicts, training-only state included (generator.safetensors: the
quantizer's usage counters, restart candidates, EMA sums, k-means flag; vqgan/training_state.py), which
a resume needs and a tokenizer folder leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME, broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import nn

from vqgan.config import ConfigError
from vqgan.training.state import TrainState
from vqgan.utils import atomic_write_text

PREFIX = "checkpoint-"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"  # the resolved config the weights were trained with
CHANGES_FILE = "config_changes.jsonl"  # in the run folder: what each resume changed
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


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


def _remove(folder: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden folder, never a partial checkpoint."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Delete the temporary and half-deleted folders a killed run left (main process, at start)."""
    if Path(root).is_dir():
        for path in Path(root).iterdir():
            if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)


def save_modules(folder: Path, modules: Mapping[str, nn.Module | None]) -> None:
    """State outside Accelerate's (EMA weights, LeCAM averages) as safetensors files: {file name: module}."""
    for name, module in modules.items():
        if module is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, Path(folder) / name)


# The wrappers whose key prefixes a state dict picks up: DistributedDataParallel's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped_key(key: str) -> str:
    """'module._orig_mod.encoder.conv.weight' -> 'encoder.conv.weight' (leading wrapper prefixes only)."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_model_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Load `weights` into `model` whether either side carries wrapper prefixes (a DDP run's checkpoint into a
    plain model, and the reverse); strict, except for tied tensors saved once (safetensors keeps one name)."""
    own = model.state_dict()
    own_names = {unwrapped_key(k): k for k in own}
    renamed = {}
    for key, value in weights.items():
        if unwrapped_key(key) not in own_names:
            raise RuntimeError(f"cannot resume from {source}: it holds {key!r}, which this model does not have "
                               "(a checkpoint of another architecture?)")
        renamed[own_names[unwrapped_key(key)]] = value
    model.load_state_dict(renamed, strict=False)
    loaded = {own[k].untyped_storage().data_ptr() for k in renamed} - {0}  # 0: empty tensors share no storage
    missing = [k for k in own if k not in renamed and own[k].untyped_storage().data_ptr() not in loaded]
    if missing:
        raise RuntimeError(f"cannot resume from {source}: it lacks {missing[:5]} ({len(missing)} tensors) of this model")


def register_portable_weights(accelerator: Accelerator) -> None:
    """Make Accelerate's model files hold unwrapped names, so any number of processes resumes any checkpoint.

    Under DDP, `save_state` would write the wrapper's names (`module.encoder...`), which a one-process
    run cannot load, and the reverse. The save hook strips the wrapper prefixes; the load hook loads
    each model itself through `load_model_weights` (which also reads checkpoints written with prefixes)
    and takes them out of Accelerate's list, as its docs allow. Optimizer, scheduler and scaler states
    hold no module names and load on any number of processes as they are.
    """
    def save_unwrapped(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], folder: str) -> None:
        for i, state_dict in enumerate(weights):
            # an OrderedDict, as state_dict() returns: Accelerate drops tied duplicates from those before safetensors
            weights[i] = OrderedDict((unwrapped_key(k), v) for k, v in state_dict.items())

    def load_unwrapped(models: list[nn.Module], folder: str) -> None:
        for i, model in enumerate(models):
            path = Path(folder) / (f"{SAFE_MODEL_NAME}.safetensors" if i == 0 else f"{SAFE_MODEL_NAME}_{i}.safetensors")
            if not path.is_file():
                raise FileNotFoundError(f"cannot resume from {folder}: {path.name} is missing")
            load_model_weights(model, load_file(path), path)
        models.clear()  # loaded: Accelerate's own loader skips them

    accelerator.register_save_state_pre_hook(save_unwrapped)
    accelerator.register_load_state_pre_hook(load_unwrapped)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    state: TrainState,
    config: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    keep_last: int = 3,
) -> Path:
    """Save Accelerate's state, our files and the resolved `config` into root/checkpoint-STEP atomically.

    Called by every process. `write_extra(folder)` runs on the main process inside a forked RNG, so
    whatever it does (building a model to export draws random initial weights) cannot change what the
    run draws next.
    """
    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG file is in tmp before the folder is renamed
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            with torch.random.fork_rng(devices=[]):
                if write_extra is not None:
                    write_extra(tmp)
            atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2))
            atomic_write_text(tmp / STATE_FILE, json.dumps(state.to_dict(), indent=2))
            if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
                _remove(final)
            os.replace(tmp, final)
            for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
                _remove(old)
        except Exception as err:  # a full disk, a failed export: every process stops, none waits forever
            error = err
            shutil.rmtree(tmp, ignore_errors=True)
    if any_process(accelerator, error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"the main process failed to write {final} (its error is in its log); stopping")
    return final


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


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


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every key whose value differs (or exists on one side)."""
    old, new = flatten(saved), flatten(current)
    missing = object()
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def is_frozen(key: str, frozen: Sequence[str]) -> bool:
    """A key (or a section prefix ending in '.') that changes what the saved weights mean."""
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in frozen)


def check_config_drift(checkpoint: Path, current: Mapping[str, Any], frozen: Sequence[str],
                       ignore: Sequence[str] = ("train.resume",)) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume whose config changes a frozen key; -> the allowed changes (to print and record)."""
    config_file = Path(checkpoint) / CONFIG_FILE
    if not config_file.is_file():
        return {}  # a checkpoint written before configs were kept in it: nothing to compare
    changes = {k: v for k, v in config_changes(json.loads(config_file.read_text()), current).items()
               if k not in ignore}
    refused = {k: v for k, v in changes.items() if is_frozen(k, frozen)}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        raise ConfigError(
            f"cannot resume {checkpoint}: these keys change what its weights mean:\n{lines}\n"
            f"Put them back, or start a new run: another run_dir, or train.resume='' (which moves this run's "
            f"checkpoints aside)."
        )
    return changes


def record_changes(run_dir: Path, checkpoint: Path, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Append one line of what a resume changed to RUN_DIR/config_changes.jsonl (main process)."""
    line = json.dumps({"step": step, "checkpoint": str(checkpoint),
                       "changes": {k: {"was": a, "now": b} for k, (a, b) in changes.items()}})
    path = Path(run_dir) / CHANGES_FILE
    previous = path.read_text() if path.is_file() else ""
    atomic_write_text(path, previous + line + "\n")


# What to put back when a checkpoint lacks one of our extra files.
EXTRA_FILE_SETTINGS = {"generator_ema.safetensors": "train.ema_decay > 0", "prior_ema.safetensors": "train.ema_decay > 0",
                       "lecam.safetensors": "loss.lecam_weight > 0"}


def set_aside(root: Path) -> Path | None:
    """Move an earlier run's checkpoints out of the way (train.resume=''), never deleting them."""
    if not list_checkpoints(root):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = root.with_name(f"{root.name}.replaced-{stamp}")
    os.replace(root, aside)
    return aside


def processes_saved(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint` (Accelerate saves one random_states_RANK.pkl per process)."""
    return len(list(Path(checkpoint).glob("random_states_*.pkl")))


def resume(accelerator: Accelerator, resume_setting: str, root: Path, state: TrainState,
           modules: Mapping[str, nn.Module | None], config: Mapping[str, Any], frozen: Sequence[str],
           run_dir: Path, check_state: Callable[[TrainState], None] | None = None) -> Path | None:
    """Restore Accelerate's state, the train state and `modules` from the checkpoint to resume, if any.

    The main process picks the checkpoint and tells the others (so all load the same one, even on a
    filesystem whose listings lag). The config is checked first: a change to a `frozen` key is
    refused naming the keys; other changes are printed and appended to RUN_DIR/config_changes.jsonl.
    `check_state(state)` runs once the train state is loaded, before anything is printed or recorded: it
    may convert the data position to this run's layout or refuse it (vqgan.training.batches.restore_position).
    `resume=""` starts over: an earlier run's checkpoints are moved to checkpoints.replaced-TIME.
    """
    chosen: list[Any] = [None]
    if accelerator.is_main_process:
        clean_leftovers(root)
        if resume_setting == "":
            aside = set_aside(root)
            if aside is not None:
                accelerator.print(f"train.resume='': starting over; the earlier checkpoints are in {aside}")
        path = resolve_resume(resume_setting, root)
        chosen = [None if path is None else str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    accelerator.wait_for_everyone()
    if chosen[0] is None:
        return None
    path = Path(chosen[0])
    changes = check_config_drift(path, config, frozen)
    for name, module in modules.items():
        if module is not None and not (path / name).is_file():
            setting = EXTRA_FILE_SETTINGS.get(name, "the setting that made it")
            raise FileNotFoundError(f"cannot resume {path}: it has no {name}, so the run was trained without "
                                    f"{setting}; put that setting back, or start over with train.resume=''")
    if accelerator.scaler is not None and not (path / "scaler.pt").is_file():
        raise FileNotFoundError(f"cannot resume {path} in fp16: it was trained without fp16 (no scaler.pt); "
                                "resume with the precision it was trained in (train.mixed_precision)")
    accelerator.load_state(str(path))  # the models through register_portable_weights' hook
    state.load(read_train_state(path))
    if check_state is not None:
        check_state(state)
    for name, module in modules.items():
        if module is not None:
            module.load_state_dict(load_file(path / name))  # onto the module's own device
    accelerator.print(f"resumed from {path} at step {state.step}")
    saved_processes = processes_saved(path)
    if saved_processes not in (0, accelerator.num_processes):
        # Accelerate restores random_states_RANK.pkl where that file exists and leaves the other ranks as
        # seeded; nothing the run draws depends on it, since every window seeds itself (vqgan.training.rng).
        accelerator.print(f"{path} was written by {saved_processes} processes, this run has "
                          f"{accelerator.num_processes}: weights, optimizer, lr schedule and scaler resume as saved "
                          "(the lr is not rescaled for the new effective batch)")
    if changes:
        accelerator.print("config changed since that checkpoint (allowed; recorded in "
                          f"{Path(run_dir) / CHANGES_FILE}):\n" +
                          "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        if accelerator.is_main_process:
            record_changes(run_dir, path, state.step, changes)
    return path
