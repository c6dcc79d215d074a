"""Sample token grids from a trained prior and decode them into images.

    vqgan-sample runs/prior_quickstart/prior --out samples/ --num-samples 16 --temperature 0.9 --top-k 100
    vqgan-sample PRIOR --tokenizer TOKENIZER --labels 3 --cfg-scale 2.0 --top-p 0.95 --seed 1

Writes grid.png, one sample_NNNN.png per sample and tokens.json. Temperature 0 is greedy decoding. A next-scale
(var) prior samples one scale a step through its multi-scale tokenizer; tokens.json then holds (N, sum s^2) ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vqgan.errors import CommandParser, add_debug_flag, run_command
from vqgan.prior.generate import generate_images, save_samples
from vqgan.prior.pretrained import from_pretrained as load_prior
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.tokenizer_identity import load_matching_tokenizer


def run(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="vqgan-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prior", help="prior folder (runs/NAME/prior or a checkpoint's prior/) or Hub repo id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id; default: the one the prior was "
                        "trained on (its tokenizer_hash must match either way)")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="decode with a tokenizer other than the one that made the prior's tokens (warns)")
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance (transformer; var: ramped from 1 at the coarsest scale)")
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="class id(s), cycled over the samples")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix each step (reference path)")
    parser.add_argument("--steps", type=int, default=12, help="maskgit: parallel decoding steps")
    parser.add_argument("--mask-schedule", default="cosine", help="maskgit: cosine, linear, square, cubic, sqrt, log, exp")
    parser.add_argument("--choice-temperature", type=float, default=4.5, help="maskgit: re-masking randomness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    config = SamplingConfig(num_samples=args.num_samples, batch_size=args.batch_size, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                            use_kv_cache=not args.no_kv_cache, seed=args.seed, steps=args.steps,
                            mask_schedule=args.mask_schedule, choice_temperature=args.choice_temperature)
    prior, meta = load_prior(args.prior, device=args.device)
    if not (args.tokenizer or meta.get("tokenizer")):
        raise ValueError(f"{args.prior} does not record its tokenizer: pass --tokenizer")
    tokenizer = load_matching_tokenizer(args.tokenizer, meta, f"prior {args.prior}", device=args.device,
                                        allow_mismatch=args.allow_tokenizer_mismatch,
                                        override="--allow-tokenizer-mismatch")
    labels = None
    if args.labels:
        labels = [args.labels[i % len(args.labels)] for i in range(args.num_samples)]
    tokens, images = generate_images(prior, tokenizer, config, labels)
    grid = save_samples(images, tokens, args.out)
    print(f"{len(images)} samples of {tuple(tokens.shape[1:])} tokens -> {grid} (and {args.out}/sample_*.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
