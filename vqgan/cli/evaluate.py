"""Reconstruction metrics of a tokenizer on a dataset split: PSNR, SSIM, LPIPS, rFID, codebook usage.

    vqgan-evaluate runs/quickstart/tokenizer --out eval/ --data source=embedded image_size=32
    vqgan-evaluate TOKENIZER --data source=cifar10 image_column=img eval_split=test \
        image_size=32 --split eval --inception-weights weights-inception-2015-12-05-6726825d.pth

LPIPS is reported when the VGG16 weights are present and rFID when the InceptionV3 weights are (both
otherwise say why they are missing). Writes summary.html (one page: figures, reconstructions, usage,
codebook t-SNE), metrics.json, metrics.md, code_counts.json, code_usage.png, codebook_tsne.png and
reconstructions.png into --out; the last printed line is the JSON summary. `vqgan-export --push-to-hub
REPO --evaluation OUT/metrics.json --grid OUT/reconstructions.png` puts the figures into the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vqgan.cli.errors import CommandParser, add_debug_flag, run_command
from vqgan.config import apply_overrides, from_dict
from vqgan.data import DataConfig, build_dataloader
from vqgan.grids import save_image_grid
from vqgan.metrics.fid import FeatureStatistics, fid_from_stats
from vqgan.metrics.image_metrics import psnr, ssim
from vqgan.metrics.inception import load_inception
from vqgan.metrics.plots import plot_code_usage, plot_codebook_tsne
from vqgan.metrics.sources import float_to_uint8
from vqgan.metrics.summary_page import write_summary_page
from vqgan.perceptual import LPIPS, MissingWeightsError
from vqgan.quantize_utils import perplexity
from vqgan.tokenizer import VQTokenizer
from vqgan.utils import atomic_write_text, images_from_model_range


def optional_lpips(weights: str | None, allow_download: bool) -> tuple[LPIPS | None, str]:
    try:
        return LPIPS(weights_path=weights, allow_download=allow_download), ""
    except MissingWeightsError as err:
        return None, "LPIPS skipped: " + " ".join(line.strip() for line in str(err).splitlines())


def optional_inception(weights: str | None, layer: str, device: torch.device, allow_download: bool):
    try:
        return load_inception(weights, layer=layer, device=device, download=allow_download), ""
    except FileNotFoundError as err:
        return None, "rFID skipped: " + " ".join(line.strip() for line in str(err).splitlines())


@torch.no_grad()
def evaluate(tokenizer: VQTokenizer, loader, lpips: LPIPS | None, inception, device: torch.device,
             max_images: int | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """-> (metrics, code counts (K,), a few (original, reconstruction) pairs for the grid)."""
    counts = torch.zeros(tokenizer.num_codes, dtype=torch.long)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    real_stats = fake_stats = None
    if inception is not None:
        real_stats, fake_stats = FeatureStatistics(inception.dim, device), FeatureStatistics(inception.dim, device)
    seen, examples = 0, []
    progress = tqdm(total=max_images or len(loader.dataset), desc="evaluate", unit="img")
    for batch in loader:
        images = images_from_model_range(batch["images"].to(device))  # (B, 3, H, W) in [0, 1]
        if max_images is not None:
            images = images[: max_images - seen]
        if len(images) == 0:
            continue  # every file of this batch was unreadable (the data pipeline warned about each)
        ids = tokenizer.encode(images)  # (B, h, w)
        recon = tokenizer.decode(ids).clamp(0, 1)  # (B, 3, H, W)
        counts += torch.bincount(ids.flatten().cpu(), minlength=tokenizer.num_codes)
        sums["psnr"] += float(psnr(recon, images, data_range=1.0).clamp(max=100.0).sum())
        sums["ssim"] += float(ssim(recon, images, data_range=1.0).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(recon * 2 - 1, images * 2 - 1, reduction="none").sum())
        if inception is not None:
            real_stats.update(inception(float_to_uint8(images)))
            fake_stats.update(inception(float_to_uint8(recon)))
        if len(examples) < 8:
            examples.extend(zip(images[: 8 - len(examples)].cpu(), recon.cpu()))
        seen += len(images)
        progress.update(len(images))
        if max_images is not None and seen >= max_images:
            break
    progress.close()
    if seen == 0:
        raise ValueError("the split has no readable image to evaluate")
    metrics = {
        "num_images": seen,
        "psnr": sums["psnr"] / seen,
        "ssim": sums["ssim"] / seen,
        "lpips": sums["lpips"] / seen if lpips is not None else None,
        "rfid": None,
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(perplexity(counts)),
        "num_codes": tokenizer.num_codes,
        "tokens_per_image": int(ids[0].numel()),
    }
    if inception is not None:
        identity = inception.identity
        metrics["rfid"] = fid_from_stats(real_stats.to_stats(identity), fake_stats.to_stats(identity))
    originals, reconstructions = (torch.stack(t) for t in zip(*examples))
    return metrics, counts, torch.cat([originals, reconstructions])


def markdown_table(metrics: dict, notes: list[str]) -> str:
    def fmt(value):
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def run(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="vqgan-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", help="exported tokenizer folder or hub id")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="DataConfig fields")
    parser.add_argument("--split", default="eval", choices=("train", "eval"))
    parser.add_argument("--out", type=Path, default=Path("eval"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--lpips-weights", default=None, help="vgg16-397923af.pth (default: $VQGAN_VGG16_WEIGHTS / cache)")
    parser.add_argument("--inception-weights", default=None, help="TF-FID InceptionV3 weights (default: torch-fidelity cache)")
    parser.add_argument("--feature-layer", default="2048", choices=("64", "192", "768", "2048"))
    parser.add_argument("--no-download", action="store_true", help="never try to download missing weights")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # whole images: centre crops, no flips
    data = from_dict(DataConfig, apply_overrides({"random_crop": False, "hflip": False}, args.data))
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer, device=device)
    loader = build_dataloader(data, args.split, batch_size=args.batch_size, shuffle=False)
    lpips, lpips_note = optional_lpips(args.lpips_weights, not args.no_download)
    inception, fid_note = optional_inception(args.inception_weights, args.feature_layer, device, not args.no_download)
    notes = [n for n in (lpips_note, fid_note) if n]
    if lpips is not None:
        lpips = lpips.to(device)
    metrics, counts, pairs = evaluate(tokenizer, loader, lpips, inception, device, args.max_images)
    if inception is not None and metrics["num_images"] < inception.dim:
        notes.append(f"rFID from {metrics['num_images']} images (< {inception.dim} feature dims) is unreliable")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps({"metrics": metrics, "notes": notes}, indent=2))
    atomic_write_text(out / "metrics.md", markdown_table(metrics, notes))
    atomic_write_text(out / "code_counts.json", json.dumps(counts.tolist()))
    n = len(pairs) // 2
    originals, recon = pairs[:n], pairs[n:]
    scores = psnr(recon, originals, data_range=1.0).tolist()
    save_image_grid(pairs, out / "reconstructions.png", nrow=n,
                    captions=["original"] * n + [f"PSNR {p:.1f} dB" for p in scores])
    if not args.no_plots:
        plot_code_usage(counts.numpy(), out / "code_usage.png")
        plot_codebook_tsne(tokenizer.codebook.cpu().numpy(), counts.numpy(), out / "codebook_tsne.png")
    figures = [(out / "reconstructions.png", "originals (top) and reconstructions (bottom)"),
               (out / "code_usage.png", "code usage, most to least used"),
               (out / "codebook_tsne.png", "t-SNE of the codebook, coloured by usage")]
    write_summary_page(out / "summary.html", f"Tokenizer {args.tokenizer}", metrics, notes, figures)
    print(markdown_table(metrics, notes))
    print(f"wrote {out}/summary.html, metrics.json, metrics.md, code_counts.json, reconstructions.png"
          + ("" if args.no_plots else ", code_usage.png, codebook_tsne.png"))
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
