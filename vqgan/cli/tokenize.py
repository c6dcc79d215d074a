"""Encode an image dataset into a token dataset for prior training (runs under `accelerate launch`).

    vqgan-tokenize runs/quickstart/tokenizer runs/quickstart/tokens
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.tokenize TOKENIZER OUT \
        --data source=cifar10 image_column=img label_column=label image_size=32 --split train --hflip-rows

The output is a folder of token shards, one set per process (`tokens-*.npy` (n, h, w), `labels-*.npy`
when the source has labels), with tokenizer.json listing them: K, the grid, the tokenizer (absolute
folder, or hub id and commit), its fingerprint (vqgan.prior.tokenizer_identity) and the encoder precision. Any data.source works, `wds:` shards and streaming=true included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from vqgan.errors import CommandParser, add_debug_flag, run_command
from vqgan.config import apply_overrides, from_dict
from vqgan.data import DataConfig
from vqgan.prior.tokenize import ENCODE_PRECISIONS, tokenize_dataset


def run(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="vqgan-tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", help="exported tokenizer folder or hub id (owner/name)")
    parser.add_argument("--revision", default=None, help="hub id: branch, tag or commit (default: main); the commit "
                        "it resolves to is recorded with the tokens")
    parser.add_argument("out", type=Path, help="token dataset folder to write (replaced atomically)")
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                        help="DataConfig fields, e.g. source=cifar10 image_column=img image_size=32")
    parser.add_argument("--split", default="train", choices=("train", "eval"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hflip-rows", action="store_true", help="also store the flipped images' tokens as rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=ENCODE_PRECISIONS,
                        help="encoder precision, recorded in the metadata: fp32 gives VQTokenizer.encode's ids on any "
                        "device; bf16 (autocast) is faster on GPUs and may change ids near ties")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    # tokens of whole images: centre crops and no flips unless the caller asks otherwise
    defaults = {"random_crop": False, "hflip": False}
    data = from_dict(DataConfig, apply_overrides(defaults, args.data))
    accelerator = Accelerator()
    metadata = tokenize_dataset(accelerator, args.tokenizer, data, args.out, args.split, args.batch_size,
                                args.hflip_rows, args.seed, precision=args.precision, revision=args.revision)
    if accelerator.is_main_process:
        print(f"wrote {metadata['num_rows']} token grids of {metadata['grid']} (K={metadata['num_codes']}) to "
              f"{args.out}; {metadata['skipped_files']} unreadable files skipped")
        print(json.dumps(metadata))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
