"""Pieces of the tokenizer loop that are not the loop: the logged reconstruction grid and the held-out evaluation.

Writing images is vqgan/image_io.py's (sampling uses it too); this module only chooses what the loop shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from vqgan.image_io import render_image_grid, save_image_grid
from vqgan.metrics.image_metrics import capped_psnr, psnr
from vqgan.quantizers.entropy import perplexity
from vqgan.utils import images_from_model_range


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


def batches_of_process(loader: DataLoader, rank: int, world: int) -> tuple[list[int], DataLoader]:
    """(global batch numbers, a DataLoader of those batches) for process `rank` of `world`.

    Batch b of the loader's single-process order (unshuffled) goes whole to process b mod world, so every
    image is computed with the same batch companions, and so to the same bits, on any number of processes.
    """
    count, size = len(loader.dataset), loader.batch_size
    batches = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
    numbers = list(range(rank, len(batches), world))
    shard = DataLoader(loader.dataset, batch_sampler=[batches[b] for b in numbers], num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return numbers, shard


@torch.no_grad()
def evaluate_reconstruction(model: torch.nn.Module, loader, accelerator: Accelerator) -> dict[str, float]:
    """Held-out PSNR (dB, images in [0, 1], capped), codebook usage over the split and code perplexity.

    Every process evaluates its share of the (unshuffled) eval loader's batches (`batches_of_process`) and
    gets the same result: the per-image PSNRs are gathered and averaged in the single-process order, and
    the code histograms are integer sums, so the figures are identical on any number of processes. (On
    rank 0 alone, a 50k-image eval kept the others waiting in a collective past NCCL's timeout.) The
    quantizer does no collective communication in eval mode, so uneven shares are fine.
    """
    was_training = model.training
    model.eval()
    numbers, batches = batches_of_process(loader, accelerator.process_index, accelerator.num_processes)
    num_codes = model.config.quantizer.num_codes
    counts = torch.zeros(num_codes, dtype=torch.long, device=accelerator.device)  # (K,)
    psnrs: list[tuple[int, torch.Tensor]] = []  # (global batch number, (B',) float64 PSNRs)
    for number, batch in zip(numbers, batches):
        images = batch["images"].to(accelerator.device)
        if images.shape[0] == 0:
            continue  # every file of this batch was unreadable (the data pipeline warned about each)
        with accelerator.autocast():
            decoded, quant = model(images)
        recon = model.to_images(decoded.float())
        scores = capped_psnr(images_from_model_range(recon), images_from_model_range(images), data_range=1.0)
        psnrs.append((number, scores.double().cpu()))
        counts += torch.bincount(quant.indices.flatten(), minlength=num_codes)
    model.train(was_training)
    every = sorted(gather_object(psnrs), key=lambda item: item[0])  # all processes' batches, in batch order
    counts = accelerator.reduce(counts, reduction="sum").cpu()
    if not every:
        return {}
    per_image = torch.cat([scores for _, scores in every])  # (N,) in the single-process order
    return {
        "psnr": float(per_image.mean()),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(perplexity(counts)),
        "num_images": per_image.numel(),
    }
