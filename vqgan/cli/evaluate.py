"""Reconstruction metrics of a tokenizer: PSNR, SSIM, LPIPS, rFID and codebook usage, under an evaluation protocol.

    vqgan-evaluate runs/quickstart/tokenizer --out eval/ --data source=embedded
    vqgan-evaluate TOKENIZER --data source=ILSVRC/imagenet-1k eval_split=validation \
        --inception-weights weights-inception-2015-12-05-6726825d.pth       # rFID as the papers report it
    vqgan-evaluate TOKENIZER --images hf:ILSVRC/imagenet-1k --split validation   # a vqgan-fid source
    vqgan-evaluate TOKENIZER --data source=cifar10 image_column=img eval_split=test --protocol native
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.evaluate TOKENIZER ...   # 8 shards

The images are the split of a training config (--data KEY=VALUE, DataConfig fields; --split train|eval)
or a vqgan-fid source (--images DIR or hf:NAME, --split naming the dataset split), prepared by --protocol:
imagenet-val (default: shorter side 256, centre crop 256x256, the protocol of LlamaGen's, Open-MAGVIT2's
and IBQ's rFID tables) or native (as they are, cropped to multiples of f). The rFID is `vqgan-fid SRC
recon:TOKENIZER --protocol P`'s: the same sources, reconstructions and extractor, in exact fp32 (TF32
off during the metric). LPIPS is reported when the VGG16 weights are present and rFID when the
InceptionV3 weights are (both otherwise say why they are missing).

Writes summary.html (one page: figures, reconstructions, usage, codebook t-SNE), metrics.json (figures,
their setup: protocol, split, image count, feature extractor; and notes), metrics.md, code_counts.json,
code_usage.png, codebook_tsne.png and reconstructions.png into --out; the last printed line is the JSON
summary. `vqgan-export --push-to-hub REPO --evaluation OUT/metrics.json --grid OUT/reconstructions.png`
puts the figures, labelled with their setup, into the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

import torch

from vqgan.errors import CommandParser, add_debug_flag, run_command
from vqgan.config import apply_overrides, from_dict
from vqgan.data import DataConfig
from vqgan.image_io import save_image_grid
from vqgan.metrics.fid_run import default_num_workers, metric_processes
from vqgan.metrics.image_metrics import psnr
from vqgan.metrics.inception import FEATURE_LAYERS, load_inception
from vqgan.metrics.plots import plot_code_usage, plot_codebook_tsne
from vqgan.metrics.protocols import PROTOCOLS
from vqgan.metrics.reconstruction import evaluate_reconstructions
from vqgan.metrics.sources import SourceOptions, data_config_source, open_source
from vqgan.metrics.summary_page import write_summary_page
from vqgan.model_card import describe_setup
from vqgan.perceptual import LPIPS, MissingWeightsError
from vqgan.tokenizer import VQTokenizer
from vqgan.utils import atomic_write_text

DEFAULT_HF_SPLIT = "validation"  # --images hf:NAME without --split: ImageNet's held-out split on the hub


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


def markdown_table(metrics: dict, notes: list[str]) -> str:
    def fmt(value):
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser(prog="vqgan-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", help="exported tokenizer folder or hub id")
    parser.add_argument("--data", nargs="*", default=None, metavar="KEY=VALUE",
                        help="DataConfig fields naming the images (default: the embedded photos)")
    parser.add_argument("--images", help="a vqgan-fid image source instead of --data: DIR or hf:NAME_OR_PATH")
    parser.add_argument("--split", default=None, help="--data: train or eval (default eval); --images hf: the "
                        f"dataset split (default {DEFAULT_HF_SPLIT})")
    parser.add_argument("--protocol", default="imagenet-val", choices=tuple(PROTOCOLS),
                        help="preprocessing: imagenet-val (shorter side 256, centre crop; default), imagenet-val-512, "
                        "native (as they are)")
    parser.add_argument("--out", type=Path, default=Path("eval"))
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers per process")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--lpips-weights", default=None, help="vgg16-397923af.pth (default: $VQGAN_VGG16_WEIGHTS / cache)")
    parser.add_argument("--inception-weights", default=None, help="TF-FID InceptionV3 weights (default: torch-fidelity cache)")
    parser.add_argument("--feature-layer", default="2048", choices=FEATURE_LAYERS, help="2048 = pool3, FID's layer")
    parser.add_argument("--no-download", action="store_true", help="never try to download missing weights")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.images is not None and args.data is not None:
        parser.error("give the images once: --data KEY=VALUE (a training config's split) or --images SRC")
    if args.images is not None and not (args.images.startswith("hf:") or Path(args.images).is_dir()):
        parser.error(f"--images {args.images!r} is neither a folder nor hf:NAME_OR_PATH")
    if args.images is not None and args.split is not None and not args.images.startswith("hf:"):
        parser.error("--split names a split of --data or of an hf: dataset; a folder has none")
    if args.images is None and args.split not in (None, "train", "eval"):
        parser.error(f"--split with --data is train or eval, got {args.split!r}")
    return args


def open_images(args: argparse.Namespace, options: SourceOptions, device: torch.device):
    """(the ImageSource to evaluate, the split it is) from --data or --images."""
    if args.images is not None:
        split = options.split if args.images.startswith("hf:") else None
        return open_source(args.images, None, options, device), split
    data = from_dict(DataConfig, apply_overrides({}, args.data or []))
    split = args.split or "eval"
    return data_config_source(data, split, options, device), split


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state, device = metric_processes(args.device)
    options = SourceOptions(batch_size=args.batch_size, max_images=args.max_images, protocol=args.protocol,
                            num_workers=default_num_workers(state) if args.num_workers is None else args.num_workers,
                            split=args.split or DEFAULT_HF_SPLIT)
    source, split = open_images(args, options, device)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer, device=device)
    with state.main_process_first(), warnings.catch_warnings():  # the first process downloads; one copy of warnings
        if not state.is_main_process:
            warnings.simplefilter("ignore")
        lpips, lpips_note = optional_lpips(args.lpips_weights, not args.no_download)
        inception, fid_note = optional_inception(args.inception_weights, args.feature_layer, device, not args.no_download)
    notes = [n for n in (lpips_note, fid_note) if n]
    if lpips is not None:
        lpips = lpips.to(device)
    if state.is_main_process:
        print(f"{source.description}: {source.count} images; {state.num_processes} process(es) on {device}")
    report = evaluate_reconstructions(tokenizer, source, args.protocol, split, state, device, lpips, inception)
    if not state.is_main_process:
        state.wait_for_everyone()
        return 0
    metrics, counts, pairs = report.metrics, report.counts, report.pairs
    if inception is not None and metrics["num_images"] < inception.dim:
        notes.append(f"rFID from {metrics['num_images']} images (< {inception.dim} feature dims) is unreliable")
    setup = dataclasses.asdict(report.setup)
    lines = [describe_setup(setup), *notes]  # what the figures were measured on, then what is missing

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps({"metrics": metrics, "setup": setup, "notes": notes}, indent=2))
    atomic_write_text(out / "metrics.md", markdown_table(metrics, lines))
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
    write_summary_page(out / "summary.html", f"Tokenizer {args.tokenizer}", metrics, lines, figures)
    print(markdown_table(metrics, lines))
    print(f"wrote {out}/summary.html, metrics.json, metrics.md, code_counts.json, reconstructions.png"
          + ("" if args.no_plots else ", code_usage.png, codebook_tsne.png"))
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}), flush=True)
    state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
