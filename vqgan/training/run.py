"""A run's frame: the command line, the Accelerator, the run folder, the shared-filesystem check, cadence."""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list

from vqgan.config import save_config, to_dict
from vqgan.training.checkpoint import register_portable_weights


def parse_recipe_args(prog: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`RECIPE.yaml [key=value ...]`, the command line of both training entry points; `prog` names the command.

    (argparse's default, the script's file name, would say train.py under `python -m`, a console command and
    tools/train.py alike.)
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def build_accelerator(run_dir: Path, mixed_precision: str, tracker: str) -> Accelerator:
    """The Accelerator both training loops use; mixed_precision "launcher" defers to `accelerate launch`.

    Gradient accumulation is the engine's own (vqgan.training.window), not Accelerate's: a window is
    a fixed number of micro-batches from an endless stream, so it never shortens at an epoch end and a
    resume finds the same windows.
    """
    accelerator = Accelerator(
        mixed_precision=None if mixed_precision == "launcher" else mixed_precision,
        log_with=None if tracker == "none" else tracker,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # schedulers step once per optimizer step, by the loop
        # use_seedable_sampler: the same shuffle on resume; non_blocking: host-to-GPU copies of pinned batches
        # overlap the step (vqgan.data pins them on CUDA)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    register_portable_weights(accelerator)  # checkpoints resume on any number of processes
    return accelerator


def use_deterministic_kernels(enabled: bool) -> None:
    """GPU runs: deterministic cuDNN/cuBLAS kernels, so that a resumed run can be bitwise equal to one left alone.

    On CPU every kernel used here is deterministic already. On CUDA, atomics in convolution backward
    and index_add_ make even two uninterrupted runs differ in the last bits unless this is on; it
    costs some speed. warn_only: an op without a deterministic kernel warns instead of stopping.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def check_shared_filesystem(accelerator: Accelerator, folder: Path) -> None:
    """Fail at start, on every process, unless every process sees the main process's files in `folder`.

    Checkpoints are written once, by the main process, and every process resumes from them: on
    several nodes the run folder must be on a filesystem they share (NFS, Lustre, a mounted bucket).
    Without one, the other nodes would find nothing at resume; say so now rather than days later.
    """
    folder = Path(folder)
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(token)
    probe = folder / f".shared-check-{token[0]}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    accelerator.wait_for_everyone()
    seen = probe.is_file() and probe.read_text() == token[0]
    missing = torch.tensor([0.0 if seen else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        missing = accelerator.reduce(missing, reduction="sum")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    if missing.item() > 0:
        raise RuntimeError(
            f"{int(missing.item())} of {accelerator.num_processes} processes cannot see files the main process "
            f"writes in {folder.absolute()}: checkpoints would not be found there at resume. Put run_dir on a "
            "filesystem every node mounts at the same path (NFS, Lustre, a shared bucket mount)."
        )


def finished_summary(accelerator: Accelerator, step: int, steps: int, run_dir: Path) -> dict[str, Any] | None:
    """The saved summary of a run already complete at `step` of `steps` (said once), or None to go on training."""
    summary_file = Path(run_dir) / "summary.json"
    if step < steps or not summary_file.is_file():
        return None
    accelerator.print(f"{run_dir} is already complete at step {step} of {steps}: nothing to train "
                      "(raise train.steps to continue it, or set train.resume='' to start over)")
    return json.loads(summary_file.read_text())


def start_run(accelerator: Accelerator, config: Any, run_dir: Path, project: str) -> None:
    """Save the resolved config in the run folder and open the trackers."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    accelerator.init_trackers(project, config=tracker_config(config))


def tracker_config(config: Any) -> dict[str, Any]:
    """Flat {section/key: scalar} view of a config for TensorBoard's hparams (which takes scalars only)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}/{key}" if prefix else key, child)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", to_dict(config))
    return flat


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, eval, checkpoint) runs after optimizer step `step` of `last`."""
    return (every > 0 and step % every == 0) or step == last


def compile_in_place(*modules: torch.nn.Module) -> None:
    """torch.compile each module in place (nn.Module.compile): its state_dict keys stay as they were.

    `torch.compile(module)` returns a wrapper whose keys carry `_orig_mod.`, which the EMA, the
    checkpoints and the exported tokenizer would then inherit. Data-dependent Python (the quantizer's
    k-means, the distributed calls) breaks the graph there and runs eagerly.
    """
    # The adaptive GAN weight differentiates the generator's graph twice before its backward
    # (retain_graph=True), which AOTAutograd's donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    for module in modules:
        module.compile()
