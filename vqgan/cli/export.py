"""Export a training checkpoint as a standalone tokenizer folder (config.json + model.safetensors + README.md).

    vqgan-export runs/NAME/checkpoints/checkpoint-0010000 out/tokenizer
    vqgan-export CKPT OUT --no-ema               # raw weights instead of the EMA
    vqgan-export CKPT OUT --format onnx --onnx-size 256 256   # + encoder/decoder.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqgan.export import export_checkpoint
from vqgan.tokenizer import VQTokenizer
from vqgan.cli.errors import add_debug_flag, run_command


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqgan-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="a runs/NAME/checkpoints/checkpoint-NNNNNNN folder")
    parser.add_argument("out_dir", type=Path, help="tokenizer folder to write (replaced atomically if it exists)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export generator_ema.safetensors (default) or, with --no-ema, generator.safetensors")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="onnx: also write encoder.onnx (images -> ids) and decoder.onnx (ids -> images)")
    parser.add_argument("--onnx-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="fixed image size of the ONNX graphs (default: the training resolution)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.onnx_size is not None and args.format != "onnx":
        parser.error("--onnx-size needs --format onnx")

    out = export_checkpoint(args.checkpoint_dir, args.out_dir, use_ema=args.ema, onnx=args.format == "onnx",
                            onnx_image_size=tuple(args.onnx_size) if args.onnx_size else None)
    tokenizer = VQTokenizer.from_pretrained(out)  # proves the folder loads on its own
    h, w = tokenizer.image_size
    print(f"exported {'EMA' if args.ema else 'raw'} weights of {args.checkpoint_dir} -> {out}")
    print(f"K={tokenizer.num_codes}, code_dim={tokenizer.code_dim}, f={tokenizer.downsample_factor}, "
          f"{h}x{w} -> {tokenizer.tokens_per_image(h, w)} tokens; files: "
          + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
