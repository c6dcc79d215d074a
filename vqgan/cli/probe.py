"""vqgan-probe: the AR probe of a tokenizer (GigaTok, arXiv:2504.08736): NLL bits/token and gFID of a fixed small GPT.

    vqgan-probe runs/quickstart/tokenizer --out probe/ --data source=embedded image_size=32 num_eval_images=64
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.probe TOKENIZER --out probe/ \
        --data source=ILSVRC/imagenet-1k eval_split=validation image_size=256 resize=256 -- --inception-weights W.pth

Tokenizes --data's train split, trains the standard probe transformer (vqgan.probe.PROBE_DEFAULTS: dim 256,
depth 6, 5000 steps of batch 64) on it, tokenizes the eval split for the held-out NLL, samples --num-samples
grids and scores them with FID against the eval split's images. Arguments after `--` go to vqgan-fid
(e.g. --inception-weights, --feature-layer). Writes probe.json, probe.md and the prior run into --out.
Compare tokenizers only at one probe setting (the defaults, or one --steps/--dim for all of them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vqgan.errors import CommandParser, add_debug_flag, run_command


def run(argv: list[str] | None = None) -> int:
    from vqgan.config import apply_overrides, from_dict
    from vqgan.data import DataConfig
    from vqgan.probe import PROBE_DEFAULTS, ProbeConfig, probe_table, run_probe

    argv = list(argv or [])
    fid_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = CommandParser(prog="vqgan-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", help="tokenizer folder or Hub repo id")
    parser.add_argument("--out", type=Path, required=True, help="folder for probe.json, probe.md and the prior run")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="DataConfig fields")
    for field in ("steps", "batch_size", "dim", "depth", "heads", "num_samples", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(PROBE_DEFAULTS, field),
                            help=f"probe {field} (default {getattr(PROBE_DEFAULTS, field)})")
    parser.add_argument("--top-k", type=int, default=PROBE_DEFAULTS.top_k, help="sampling top-k (default: none)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    data = from_dict(DataConfig, apply_overrides({}, args.data))
    probe = ProbeConfig(steps=args.steps, batch_size=args.batch_size, dim=args.dim, depth=args.depth, heads=args.heads,
                        num_samples=args.num_samples, seed=args.seed, top_k=args.top_k)
    result = run_probe(args.tokenizer, data, args.out, probe, tuple(fid_args))
    print(probe_table(result))
    print(json.dumps({k: result[k] for k in ("bits_per_token", "gfid", "num_codes", "grid")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
