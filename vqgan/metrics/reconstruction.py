"""A tokenizer's reconstruction metrics over an image source: PSNR, SSIM, LPIPS, rFID and code usage.

The images are an ImageSource of vqgan/metrics/sources.py prepared by an evaluation protocol, reconstructed
by `sources.reconstruct` (what `recon:` does) and fed to the same extractor and float64 statistics, so the
rFID here is `vqgan-fid SRC recon:TOKENIZER --protocol P`'s number. Each process takes its shard of the
source; per-image figures are gathered in the source's order and code counts summed, so a launch on N
processes reports what one process does (up to the rounding of images batched with other companions).
The metric runs in exact fp32: TF32 off for matmuls and cuDNN, the flags restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from vqgan.image_io import float_to_uint8
from vqgan.metrics.fid import FeatureStatistics, fid_from_stats
from vqgan.metrics.image_metrics import capped_psnr, ssim
from vqgan.metrics.inception import InceptionFeatures
from vqgan.metrics.protocols import check_protocol
from vqgan.metrics.sources import ImageSource, exact_float32, gather_in_order, reconstruct
from vqgan.quantizers.entropy import perplexity
from vqgan.utils import is_distributed

NUM_EXAMPLES = 8  # image pairs kept for the reconstruction grid


@dataclass(frozen=True)
class EvaluationSetup:
    """What a reconstruction figure was measured on: without it an rFID cannot be compared with another."""

    protocol: str  # vqgan.metrics.protocols name: the preprocessing every image got
    crop: int | None  # the protocol's square side in pixels (None: images as they are)
    images: str  # the source's description (dataset, split, protocol)
    split: str | None  # the split evaluated (None for a folder)
    num_images: int
    feature_extractor: str | None  # the FID features (network, layer, weights sha256); None: rFID skipped
    float32: str = "exact (TF32 off for matmuls and cuDNN)"


@dataclass(frozen=True)
class ReconstructionReport:
    metrics: dict  # num_images, psnr, ssim, lpips, rfid, usage, perplexity, num_codes, tokens_per_image
    counts: torch.Tensor  # (K,) int64 code histogram over all images
    pairs: torch.Tensor  # (2n, 3, H, W) floats in [0, 1]: n originals, then their reconstructions
    setup: EvaluationSetup


def evaluate_reconstructions(
    tokenizer, source: ImageSource, protocol: str, split: str | None, state: PartialState, device: torch.device,
    lpips=None, extractor: InceptionFeatures | None = None,
) -> ReconstructionReport:
    """Stream this process's shard of `source` through the tokenizer; every process returns the whole report,
    the rFID on the main process only (its O(D^3) square root once)."""
    indices = list(source.shard_indices(state.process_index, state.num_processes))
    counts = torch.zeros(tokenizer.num_codes, dtype=torch.long, device=device)  # (K,)
    real = fake = None
    if extractor is not None:
        real, fake = FeatureStatistics(extractor.dim, device), FeatureStatistics(extractor.dim, device)
    per_image: list[torch.Tensor] = []  # each (B, 3) float64: PSNR, SSIM, LPIPS
    examples: list[tuple[torch.Tensor, torch.Tensor]] = []
    tokens_per_image = 0
    progress = tqdm(total=len(indices), desc="evaluate", unit="img", disable=not state.is_main_process)
    with exact_float32(), torch.inference_mode():
        for images in source.shard(state.process_index, state.num_processes):  # uint8 (B, 3, H, W)
            images = images.to(device)
            seen, ids, recon = reconstruct(tokenizer, images)  # uint8 crops, (B, h, w), floats (B, 3, H', W')
            originals = seen.float() / 255.0
            scores = [capped_psnr(recon, originals, data_range=1.0), ssim(recon, originals, data_range=1.0)]
            scores.append(lpips(recon * 2 - 1, originals * 2 - 1, reduction="none") if lpips is not None
                          else torch.zeros_like(scores[0]))
            per_image.append(torch.stack(scores, dim=1).double().cpu())
            counts += torch.bincount(ids.flatten(), minlength=tokenizer.num_codes)
            tokens_per_image = tokens_per_image or int(ids[0].numel())
            if extractor is not None:  # references uncropped, as vqgan-fid's reference statistics are
                real.update(extractor(images))
                fake.update(extractor(float_to_uint8(recon)))
            if len(examples) < NUM_EXAMPLES and (not examples or examples[0][0].shape == originals.shape[1:]):
                examples.extend(zip(originals[: NUM_EXAMPLES - len(examples)].cpu(), recon.cpu()))
            progress.update(len(images))
    progress.close()
    local = torch.cat(per_image) if per_image else torch.zeros(0, 3, dtype=torch.float64)
    if len(local) != len(indices):
        raise RuntimeError(f"process {state.process_index} evaluated {len(local)} images, expected {len(indices)}")
    ordered = gather_in_order(local, indices)  # (N, 3) in the source's order, whatever the number of processes
    sizes = torch.tensor([tokens_per_image], device=device)
    if is_distributed():  # code counts are integer sums; a process without images has no token grid to report
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    counts = counts.cpu()
    metrics = {
        "num_images": len(ordered),
        "psnr": float(ordered[:, 0].mean()),
        "ssim": float(ordered[:, 1].mean()),
        "lpips": float(ordered[:, 2].mean()) if lpips is not None else None,
        "rfid": None,
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(perplexity(counts)),
        "num_codes": tokenizer.num_codes,
        "tokens_per_image": int(sizes.item()),
    }
    if extractor is not None:
        real, fake = real.all_reduce(), fake.all_reduce()
        if state.is_main_process:  # the O(D^3) square root once, not on every process
            identity = extractor.identity
            reference = real.to_stats(identity, source.description)
            metrics["rfid"] = fid_from_stats(reference, fake.to_stats(identity, f"reconstructions of {source.description}"))
    setup = EvaluationSetup(protocol, check_protocol(protocol), source.description, split, len(ordered),
                            extractor.identity.describe() if extractor is not None else None)
    originals, recons = (torch.stack(t) for t in zip(*examples)) if examples else (torch.zeros(0), torch.zeros(0))
    return ReconstructionReport(metrics, counts, torch.cat([originals, recons]), setup)
