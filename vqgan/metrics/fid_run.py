"""vqgan-fid: FID between two image sources, with the TF-FID InceptionV3 features torch-fidelity and torchmetrics use.

    vqgan-fid SRC1 SRC2 [--save-stats ref.npz]        # FID, and optionally keep SRC1's statistics
    vqgan-fid SRC --save-stats ref.npz                 # statistics only
    vqgan-fid hf:imagenet-1k --split validation --protocol imagenet-val --save-stats imagenet_val256.npz
    vqgan-fid imagenet_val256.npz recon:TOKENIZER --images hf:imagenet-1k --split validation --protocol imagenet-val
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.fid SRC1 SRC2   # same numbers, 8 shards

A source is DIR (a folder of images), FILE.npz (--save-stats output), hf:NAME_OR_PATH (a `datasets`
dataset), recon:TOKENIZER (its reconstructions of --images, default: the other source: rFID) or
prior:PRIOR (--num-samples samples: gFID); see vqgan/metrics/sources.py.

rFID compares reconstructions with the images they were made from: a statistics file whose recorded
source (dataset, split, protocol) differs from the reconstructed images is refused unless
--allow-different-reference. --protocol imagenet-val is the papers' preprocessing (shorter side 256,
centre crop; vqgan/metrics/protocols.py). The last line printed is JSON: {"fid": ..., "count1": ..., "count2": ...}.
"""
# This module is the body of the vqgan-fid command (vqgan/cli/fid.py adds the one-line user errors); it lives in
# the library because vqgan.probe scores its gFID with it, passing the user's own vqgan-fid options through.

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vqgan.errors import CommandParser, add_debug_flag
from vqgan.metrics.protocols import PROTOCOLS

if TYPE_CHECKING:
    from accelerate import PartialState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from vqgan.metrics.inception import FEATURE_LAYERS

    parser = CommandParser(prog="vqgan-fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SRC", help="one or two sources (see above)")
    parser.add_argument("--save-stats", type=Path, help="write the statistics of the first source to this .npz")
    parser.add_argument("--protocol", default="native", choices=tuple(PROTOCOLS),
                        help="preprocessing: native (as they are) or imagenet-val (shorter side 256, centre crop)")
    parser.add_argument("--allow-different-reference", action="store_true",
                        help="rFID against statistics of other images than the ones reconstructed")
    parser.add_argument("--inception-weights", type=Path, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--no-download", action="store_true", help="never fetch the weights; fail instead")
    parser.add_argument("--feature-layer", default="2048", choices=FEATURE_LAYERS, help="2048 = pool3, FID's layer")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass per process")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers per process")
    parser.add_argument("--max-images", type=int, help="use only the first N images of a folder or dataset")
    parser.add_argument("--split", default="train", help="hf: dataset split")
    parser.add_argument("--config", help="hf: dataset configuration name")
    parser.add_argument("--image-column", help="hf: image column (default: the first Image feature)")
    parser.add_argument("--images", help="recon: the images to reconstruct (default: the other source)")
    parser.add_argument("--num-samples", type=int, help="prior: number of samples")
    parser.add_argument("--seed", type=int, default=0, help="prior: batch b samples with seed + b (any process count)")
    parser.add_argument("--prior-tokenizer", help="prior: tokenizer that decodes the samples (default: the prior's own)")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="prior: decode with a tokenizer other than the one that made the prior's tokens (warns)")
    parser.add_argument("--temperature", type=float, default=1.0, help="prior: sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="prior: keep the k most likely codes")
    parser.add_argument("--top-p", type=float, default=None, help="prior: nucleus sampling mass")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="prior: classifier-free guidance scale")
    parser.add_argument("--steps", type=int, default=12, help="prior: MaskGIT's parallel decoding steps")
    parser.add_argument("--mask-schedule", default="cosine", help="prior: MaskGIT's mask schedule")
    parser.add_argument("--choice-temperature", type=float, default=4.5, help="prior: MaskGIT's re-masking noise")
    parser.add_argument("--device", help="default: this process's accelerator device, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU: faster, not bit-comparable")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of each image source "
                        "(torch-fidelity's: 10 splits, shuffled with seed 2020)")
    parser.add_argument("--prc", action="store_true", help="also precision/recall of SRC2 (generated) against SRC1 "
                        "(real), torch-fidelity's k=3 manifolds, on the FID layer's Inception features")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if len(args.sources) > 2:
        parser.error(f"expected one or two sources, got {len(args.sources)}")
    if len(args.sources) == 1 and args.save_stats is None and not args.isc:
        parser.error("with one source, pass --save-stats PATH or --isc (or give a second source to compute FID)")
    if args.prc and (len(args.sources) != 2 or any(src.endswith(".npz") for src in args.sources)):
        parser.error("--prc needs two image sources (statistics files hold no per-image features)")
    return args


def check_reference(stats_source: str, stats_path: str, other: object, allow: bool) -> None:
    """rFID: the reference statistics must describe the very images that were reconstructed."""
    from vqgan.metrics.sources import ImageSource

    if allow or not isinstance(other, ImageSource) or not other.description.startswith("reconstructions by "):
        return
    reconstructed = other.description.split(" of ", 1)[1]
    if stats_source and stats_source != reconstructed:
        raise ValueError(f"mismatched statistics: {stats_path} holds '{stats_source}' but the reconstructions are of "
                         f"'{reconstructed}'; use the same split and --protocol for both (or pass "
                         "--allow-different-reference)")


def extra_metrics(per_image: list, args: argparse.Namespace) -> dict:
    """Inception Score of each image source and precision/recall, computed by torch-fidelity's own functions."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    result = {}
    for i, out in enumerate(per_image, start=1):
        if args.isc and out is not None:
            splits = min(10, len(out.logits))  # torch-fidelity's 10; fewer images would leave empty splits (NaN)
            isc = isc_features_to_metric(out.logits, splits=splits, shuffle=True, rng_seed=2020)
            result[f"isc{i}"], result[f"isc{i}_std"] = isc["inception_score_mean"], isc["inception_score_std"]
            print(f"Inception Score of {args.sources[i - 1]}: {result[f'isc{i}']:.4f} +- {result[f'isc{i}_std']:.4f}")
    if args.prc:
        real, generated = per_image[0].features, per_image[1].features
        prc = prc_features_to_metric(generated, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True,
                                     verbose=False)
        result.update(precision=prc["precision"], recall=prc["recall"])
        print(f"precision {prc['precision']:.4f}, recall {prc['recall']:.4f} ({args.sources[1]} against {args.sources[0]})")
    return result


def metric_processes(device: str | None) -> tuple[PartialState, torch.device]:
    """(the processes sharing a metric, this process's device): one under python, N under accelerate launch."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from vqgan.utils import is_distributed

    # NOTE: PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU; without cpu=True a CPU launch comes up
    # as one process per rank that each think they are alone.
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if is_distributed() and torch.distributed.get_world_size() != state.num_processes:
        raise RuntimeError(f"{torch.distributed.get_world_size()} ranks but accelerate sees {state.num_processes}")
    return state, torch.device(device) if device else state.device


def default_num_workers(state: PartialState) -> int:
    """Decoding workers per process: the CPU cores shared out, at most 4."""
    return min(4, max(0, (os.cpu_count() or 1) // state.num_processes - 1))


def run(argv: list[str] | None = None) -> dict:
    """The command without its error handling: -> {"fid", "count1", "count2"} (and "stats")."""
    from vqgan.metrics.fid import fid_from_stats, load_stats, save_stats
    from vqgan.metrics.inception import LOGITS_LAYER, InceptionFeatures, extractor_identity, resolve_weights_path
    from vqgan.metrics.sources import ImageSource, SourceOptions, exact_float32, open_source, source_statistics

    args = parse_args(argv)
    state, device = metric_processes(args.device)
    num_workers = default_num_workers(state) if args.num_workers is None else args.num_workers
    options = SourceOptions(
        batch_size=args.batch_size, num_workers=num_workers, max_images=args.max_images, protocol=args.protocol,
        split=args.split, config=args.config, image_column=args.image_column, images=args.images,
        num_samples=args.num_samples, seed=args.seed, prior_tokenizer=args.prior_tokenizer,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
        steps=args.steps, mask_schedule=args.mask_schedule, choice_temperature=args.choice_temperature)
    with state.main_process_first():  # only the first process may download the weights
        weights = resolve_weights_path(args.inception_weights, download=not args.no_download)
    sources = [
        open_source(spec, args.sources[1 - i] if len(args.sources) == 2 else None, options, device)
        for i, spec in enumerate(args.sources)
    ]
    extractor = None
    if any(isinstance(source, ImageSource) for source in sources):
        with warnings.catch_warnings():
            if not state.is_main_process:  # one copy of load-time warnings is enough
                warnings.simplefilter("ignore")
            extra = (LOGITS_LAYER,) if args.isc else ()
            extractor = InceptionFeatures(weights, args.feature_layer, extra_layers=extra).to(device).eval()
    # the identity of the bytes the extractor loaded (its one read of the file); only statistics: hash the file
    identity = extractor.identity if extractor is not None else extractor_identity(weights, args.feature_layer)
    stats = [load_stats(s, identity) if isinstance(s, str) else None for s in sources]
    per_image: list = [None] * len(sources)
    for i, loaded in enumerate(stats):
        if loaded is not None and len(sources) == 2:
            check_reference(loaded.source, sources[i], sources[1 - i], args.allow_different_reference)
    if state.is_main_process:
        print(f"features: {identity.describe()}; {state.num_processes} process(es) on {device}")
    for i, source in enumerate(sources):
        if isinstance(source, ImageSource):
            with exact_float32():
                out = source_statistics(source, extractor, state, device, args.bf16 and device.type == "cuda",
                                        keep_features=args.prc, keep_logits=args.isc)
            stats[i], per_image[i] = out.stats, out
    result: dict = {"count1": stats[0].count}
    if state.is_main_process:  # the O(D^3) square root once, not on every process
        if any(s.count <= s.mu.shape[0] for s in stats):
            print(f"NOTE: fewer images than feature dimensions ({stats[0].mu.shape[0]}): singular covariances, and FID "
                  "is biased upward at small counts; published FIDs typically use 50k images")
        if len(stats) == 2:
            result = {"fid": fid_from_stats(stats[0], stats[1]), "count1": stats[0].count, "count2": stats[1].count}
            print(f"FID: {result['fid']:.6f}  ({args.sources[0]}: {result['count1']} images, "
                  f"{args.sources[1]}: {result['count2']} images)")
        result.update(extra_metrics(per_image, args))
        if args.save_stats is not None:
            save_stats(args.save_stats, stats[0])
            print(f"statistics of {args.sources[0]} ({stats[0].count} images) -> {args.save_stats}")
            result["stats"] = str(args.save_stats)
        print(json.dumps(result), flush=True)
    state.wait_for_everyone()
    return result
