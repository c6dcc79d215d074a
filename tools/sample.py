"""Sample token grids from a trained prior and decode them into images.

    python tools/sample.py runs/prior_quickstart/prior --out samples/ --num-samples 16 --temperature 0.9 --top-k 100
    python tools/sample.py PRIOR --tokenizer TOKENIZER --labels 3 --cfg-scale 2.0 --top-p 0.95 --seed 1

Writes grid.png, one sample_NNNN.png per sample and tokens.json. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from vqgan.export import VQTokenizer  # noqa: E402
from vqgan.prior.generate import generate_images, save_samples  # noqa: E402
from vqgan.prior.io import load_prior  # noqa: E402
from vqgan.prior.sampling import SamplingConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prior", type=Path, help="prior folder (runs/NAME/prior or a checkpoint's prior/)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder; default: the one the prior was trained on")
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (transformer)")
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="class id(s), cycled over the samples")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix each step (reference path)")
    parser.add_argument("--steps", type=int, default=12, help="maskgit: parallel decoding steps")
    parser.add_argument("--mask-schedule", default="cosine", help="maskgit: cosine, linear, square, cubic, sqrt, log, exp")
    parser.add_argument("--choice-temperature", type=float, default=4.5, help="maskgit: re-masking randomness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        config = SamplingConfig(num_samples=args.num_samples, batch_size=args.batch_size, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                                use_kv_cache=not args.no_kv_cache, seed=args.seed, steps=args.steps,
                                mask_schedule=args.mask_schedule, choice_temperature=args.choice_temperature)
        prior, meta = load_prior(args.prior, device=args.device)
        tokenizer_path = args.tokenizer or meta.get("tokenizer")
        if not tokenizer_path:
            raise ValueError(f"{args.prior} does not record its tokenizer: pass --tokenizer")
        tokenizer = VQTokenizer.from_pretrained(tokenizer_path, device=args.device)
        labels = None
        if args.labels:
            labels = [args.labels[i % len(args.labels)] for i in range(args.num_samples)]
        tokens, images = generate_images(prior, tokenizer, config, labels)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    grid = save_samples(images, tokens, args.out)
    print(f"{len(images)} samples of {tuple(tokens.shape[1:])} tokens -> {grid} (and {args.out}/sample_*.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
