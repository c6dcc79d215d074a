"""Pieces of the training loops that are not the loop: recipe reading, image grids, held-out evaluation."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torchvision.utils import make_grid, save_image

from vqgan.config import save_config, to_dict
from vqgan.metrics.image_metrics import psnr
from vqgan.quantize_utils import perplexity
from vqgan.utils import atomic_write_bytes, images_from_model_range


def parse_recipe_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`RECIPE.yaml [key=value ...]`, the command line of both training entry points."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def build_accelerator(run_dir: Path, mixed_precision: str, grad_accum_steps: int, tracker: str) -> Accelerator:
    """The Accelerator both training loops use; mixed_precision "launcher" defers to `accelerate launch`."""
    return Accelerator(
        mixed_precision=None if mixed_precision == "launcher" else mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with=None if tracker == "none" else tracker,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # schedulers step once per optimizer step, by the loop
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # the same shuffle on resume
    )


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


def count_anywhere(value: int | bool, accelerator: Accelerator) -> int:
    """Sum of a per-process count (or flag) over all processes, so every process takes the same branch."""
    total = torch.tensor([float(value)], device=accelerator.device)
    return int(accelerator.reduce(total, reduction="sum").item())


def save_png_atomic(images01: torch.Tensor, path: Path, nrow: int) -> None:
    buffer = io.BytesIO()
    save_image(images01, buffer, format="png", nrow=nrow, padding=2)
    atomic_write_bytes(path, buffer.getvalue())


def log_image_grid(accelerator: Accelerator, inputs: torch.Tensor, reconstructions: torch.Tensor, folder: Path,
                   step: int, max_images: int = 8) -> Path:
    """A PNG with inputs on the top row and reconstructions below, in the run folder and the tracker."""
    n = min(max_images, inputs.shape[0])
    pairs = torch.cat([inputs[:n], reconstructions[:n]]).detach().float().cpu()  # (2n, 3, H, W)
    images01 = images_from_model_range(pairs)
    path = Path(folder) / f"reconstructions_{step:07d}.png"
    save_png_atomic(images01, path, nrow=n)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"reconstructions": make_grid(images01, nrow=n).unsqueeze(0).numpy()}, step=step)
    return path


@torch.no_grad()
def evaluate_reconstruction(model: torch.nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
    """Held-out PSNR (dB, images in [0, 1]), codebook usage over the split and code perplexity.

    Runs on the main process only: the held-out split is small, and the quantizer does no collective
    communication in eval mode, so the other processes simply wait at the next barrier.
    """
    if not accelerator.is_main_process:
        return {}
    was_training = model.training
    model.eval()
    psnrs, counts = [], None
    for batch in loader:
        images = batch["images"].to(accelerator.device)
        with accelerator.autocast():
            decoded, quant = model(images)
        recon = model.to_images(decoded.float())
        psnrs.append(psnr(images_from_model_range(recon), images_from_model_range(images), data_range=1.0))
        hist = torch.bincount(quant.indices.flatten(), minlength=model.config.quantizer.num_codes)
        counts = hist if counts is None else counts + hist
    model.train(was_training)
    if counts is None:
        return {}
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(perplexity(counts)),
        "num_images": int(sum(p.numel() for p in psnrs)),
    }
