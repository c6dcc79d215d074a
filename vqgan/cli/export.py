"""Export a training checkpoint as a standalone tokenizer folder (config.json + model.safetensors + README.md).

    vqgan-export runs/NAME/checkpoints/checkpoint-0010000 out/tokenizer
    vqgan-export CKPT OUT --no-ema               # raw weights instead of the EMA
    vqgan-export CKPT OUT --format onnx --onnx-size 256 256   # + encoder/decoder.onnx
    vqgan-export CKPT OUT --push-to-hub me/my-tokenizer --evaluation eval/metrics.json --grid eval/reconstructions.png
    vqgan-export CKPT_OR_TOKENIZER OUT --format diffusers    # a folder diffusers.VQModel.from_pretrained loads
    vqgan-export CKPT_OR_TOKENIZER OUT --format llamagen     # LlamaGen weights (safetensors) + its ModelArgs JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vqgan.errors import CommandParser, add_debug_flag, run_command
from vqgan.export import export_checkpoint
from vqgan.tokenizer import VQTokenizer


def run(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="vqgan-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="a runs/NAME/checkpoints/checkpoint-NNNNNNN folder "
                        "(or, with --format diffusers / llamagen, a tokenizer folder too)")
    parser.add_argument("out_dir", type=Path, help="tokenizer folder to write (replaced atomically if it exists)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export generator_ema.safetensors (default) or, with --no-ema, generator.safetensors")
    parser.add_argument("--format", choices=("safetensors", "onnx", "diffusers", "llamagen"), default="safetensors",
                        help="onnx: also write encoder.onnx (images -> ids) and decoder.onnx (ids -> images); "
                             "diffusers / llamagen: the other project's folder instead of ours")
    parser.add_argument("--onnx-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="fixed image size of the ONNX graphs (default: the training resolution)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the tokenizer to this Hub repo")
    parser.add_argument("--evaluation", type=Path, help="vqgan-evaluate's metrics.json: figures for the model card")
    parser.add_argument("--grid", type=Path, help="a reconstruction grid PNG for the model card")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.onnx_size is not None and args.format != "onnx":
        parser.error("--onnx-size needs --format onnx")
    if (args.evaluation or args.grid or args.revision or args.private) and not args.push_to_hub:
        parser.error("--evaluation, --grid, --revision and --private go with --push-to-hub")
    evaluation = read_evaluation(args.evaluation) if args.evaluation else None  # fail before any work
    if args.grid is not None and not args.grid.is_file():
        raise FileNotFoundError(f"--grid {args.grid} does not exist")

    if args.format in ("diffusers", "llamagen"):
        if args.push_to_hub:
            parser.error("--push-to-hub uploads vqgan tokenizer folders, not --format diffusers / llamagen")
        return export_foreign(args.checkpoint_dir, args.out_dir, args.format, args.ema)
    out = export_checkpoint(args.checkpoint_dir, args.out_dir, use_ema=args.ema, onnx=args.format == "onnx",
                            onnx_image_size=tuple(args.onnx_size) if args.onnx_size else None)
    tokenizer = VQTokenizer.from_pretrained(out)  # proves the folder loads on its own
    h, w = tokenizer.image_size
    print(f"exported {'EMA' if args.ema else 'raw'} weights of {args.checkpoint_dir} -> {out}")
    print(f"K={tokenizer.num_codes}, code_dim={tokenizer.code_dim}, f={tokenizer.downsample_factor}, "
          f"{h}x{w} -> {tokenizer.tokens_per_image(h, w)} tokens; files: "
          + ", ".join(sorted(p.name for p in out.iterdir())))
    if args.push_to_hub:
        commit = tokenizer.push_to_hub(args.push_to_hub, evaluation=evaluation, reconstruction_grid=args.grid,
                                       revision=args.revision, private=args.private or None)
        print(f"pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    return 0


def export_foreign(source: Path, out_dir: Path, fmt: str, use_ema: bool) -> int:
    """A training checkpoint or a tokenizer folder -> a diffusers / LlamaGen folder."""
    from vqgan.convert.export_formats import export_tokenizer
    from vqgan.export import load_checkpoint
    from vqgan.folder_format import is_tokenizer_folder

    if source.is_dir() and is_tokenizer_folder(source):
        tokenizer = VQTokenizer.from_pretrained(source)
    else:
        model, summary = load_checkpoint(source, use_ema)
        tokenizer = VQTokenizer.from_model(model, summary)
    out = export_tokenizer(tokenizer, out_dir, fmt)
    print(f"exported {source} as a {fmt} folder -> {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def read_evaluation(path: Path) -> dict:
    """metrics.json of vqgan-evaluate -> {metric: value, ..., "notes": [...], "setup": {...}} for the model card."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--evaluation {path} does not exist (vqgan-evaluate writes OUT/metrics.json)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--evaluation {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"--evaluation {path} is not vqgan-evaluate's metrics.json (no 'metrics' object)")
    evaluation = {**data["metrics"], "notes": list(data.get("notes", []))}
    if isinstance(data.get("setup"), dict):  # protocol, split, image count, extractor: labels the rFID in the card
        evaluation["setup"] = data["setup"]
    return evaluation


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
