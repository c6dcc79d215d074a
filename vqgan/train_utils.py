"""Pieces of the tokenizer loop that are not the loop: image grids and the held-out evaluation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torchvision.utils import save_image

from vqgan.grids import render_image_grid, save_image_grid
from vqgan.metrics.image_metrics import psnr
from vqgan.quantize_utils import perplexity
from vqgan.utils import atomic_write_bytes, images_from_model_range


def save_png_atomic(images01: torch.Tensor, path: Path, nrow: int) -> None:
    buffer = io.BytesIO()
    save_image(images01, buffer, format="png", nrow=nrow, padding=2)
    atomic_write_bytes(path, buffer.getvalue())


def log_image_grid(accelerator: Accelerator, inputs: torch.Tensor, reconstructions: torch.Tensor, folder: Path,
                   step: int, max_images: int = 8) -> Path:
    """A readable PNG: inputs on the top row, reconstructions below captioned with step and PSNR; also logged."""

    n = min(max_images, inputs.shape[0])
    originals = images_from_model_range(inputs[:n].detach().float().cpu()).clamp(0, 1)
    recon = images_from_model_range(reconstructions[:n].detach().float().cpu()).clamp(0, 1)
    scores = psnr(recon, originals, data_range=1.0).tolist()
    captions = ["input"] * n + [f"step {step}\nPSNR {p:.1f} dB" for p in scores]
    images01 = torch.cat([originals, recon])  # (2n, 3, H, W)
    path = save_image_grid(images01, Path(folder) / f"reconstructions_{step:07d}.png", nrow=n, captions=captions)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            grid = np.asarray(render_image_grid(images01, nrow=n, captions=captions))  # (H, W, 3) uint8
            tracker.log_images({"reconstructions": grid[None]}, step=step, dataformats="NHWC")
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
