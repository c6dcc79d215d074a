"""Reconstruct images through an exported tokenizer: original | reconstruction side by side, with PSNR.

    vqgan-reconstruct TOKENIZER a.png b.jpg --out recon/              # center-crop to a multiple of f
    vqgan-reconstruct TOKENIZER *.png --out recon/ --size 256         # resize+crop to 256x256
    vqgan-reconstruct TOKENIZER *.png --out recon/ --check-bf16       # fp32 vs bf16 autocast

TOKENIZER is a folder written by vqgan-export (or a Hub repo id). Writes one PNG per
input plus metrics.json and metrics.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vqgan.errors import CommandParser, add_debug_flag, run_command
from vqgan.tokenizer import VQTokenizer

GAP = 4  # white pixels between original and reconstruction


def load_image(path: Path, factor: int, size: int | None = None) -> torch.Tensor:
    """Read an image as RGB uint8 (3, H, W): resized+center-cropped to size x size, else cropped to multiples of f."""
    try:
        with Image.open(path) as handle:
            image = handle.convert("RGB")  # convert() decodes the whole file, so truncation surfaces here
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    if size is not None:
        if size <= 0 or size % factor:
            raise ValueError(f"--size {size} must be a positive multiple of the downsampling factor {factor}")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        target_w = target_h = size
    else:
        target_w, target_h = image.width // factor * factor, image.height // factor * factor
        if target_w == 0 or target_h == 0:
            raise ValueError(f"image {path} is {image.width}x{image.height}, smaller than the downsampling "
                             f"factor {factor}; use --size")
    left, top = (image.width - target_w) // 2, (image.height - target_h) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (peak 1)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def side_by_side(original: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 original and [0, 1] reconstruction -> one RGB image, original | reconstruction."""
    recon = (reconstruction.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
    gap = torch.full((3, original.shape[1], GAP), 255, dtype=torch.uint8)
    row = torch.cat([original.cpu(), gap, recon], dim=2)  # (3, H, 2W + GAP)
    return Image.fromarray(row.permute(1, 2, 0).numpy())


def bf16_report(tokenizer: VQTokenizer, images: torch.Tensor, ids: torch.Tensor, recon: torch.Tensor) -> dict:
    """Differences of a bf16-autocast pass from the fp32 one: ids, end-to-end image, and decoder alone."""
    with torch.autocast(device_type=tokenizer.device.type, dtype=torch.bfloat16):
        ids_bf16 = tokenizer.encode(images)
        recon_bf16 = tokenizer.decode(ids_bf16)
        recon_same_ids = tokenizer.decode(ids)
    return {
        "id_mismatch": (ids_bf16 != ids).float().mean().item(),
        "max_abs_diff": (recon_bf16 - recon).abs().max().item(),
        "decoder_max_abs_diff": (recon_same_ids - recon).abs().max().item(),
    }


def _json_number(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None  # strict JSON has no Infinity


def run(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="vqgan-reconstruct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", help="tokenizer folder (vqgan-export) or Hub repo id")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs and metrics.json/.md")
    parser.add_argument("--size", type=int, default=None, help="resize shorter side and center-crop to SIZE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--check-bf16", action="store_true",
                        help="also run under bf16 autocast; report the fraction of differing ids and max image diff")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    tokenizer = VQTokenizer.from_pretrained(args.tokenizer, device=args.device)
    f = tokenizer.downsample_factor
    originals = [load_image(path, f, args.size) for path in args.images]  # all read before any work
    print(f"tokenizer {args.tokenizer}: K={tokenizer.num_codes}, f={f}, device={tokenizer.device}")

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (path, original) in enumerate(zip(args.images, originals)):
        images = original[None]  # (1, 3, H, W) uint8; one at a time since sizes may differ
        ids = tokenizer.encode(images)  # (1, h, w)
        recon = tokenizer.decode(ids)  # (1, 3, H, W) in [0, 1]
        target = images.to(recon.device, torch.float32) / 255.0
        name = f"{index:03d}_{path.stem}.png"
        side_by_side(original, recon[0]).save(args.out / name)
        row = {"input": str(path), "output": name, "size": list(original.shape[1:]), "tokens": ids[0].numel(),
               "psnr": psnr(recon, target)}
        line = f"{path}: {row['size'][0]}x{row['size'][1]}, {row['tokens']} tokens, PSNR {row['psnr']:.2f} dB"
        if args.check_bf16:
            row["bf16"] = bf16_report(tokenizer, images, ids, recon)
            line += (f" | bf16: {100 * row['bf16']['id_mismatch']:.2f}% ids differ, "
                     f"max |image diff| {row['bf16']['max_abs_diff']:.4f} "
                     f"(decoder alone {row['bf16']['decoder_max_abs_diff']:.4f})")
        print(line)
        rows.append(row)

    finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    summary = {"tokenizer": str(args.tokenizer), "mean_psnr": sum(finite) / len(finite) if finite else math.inf,
               "images": rows}
    if args.check_bf16:
        weights = [r["tokens"] for r in rows]
        summary["bf16"] = {
            "id_mismatch": sum(r["bf16"]["id_mismatch"] * n for r, n in zip(rows, weights)) / sum(weights),
            "max_abs_diff": max(r["bf16"]["max_abs_diff"] for r in rows),
            "decoder_max_abs_diff": max(r["bf16"]["decoder_max_abs_diff"] for r in rows),
        }
    (args.out / "metrics.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    (args.out / "metrics.md").write_text(_markdown(summary))
    print(f"mean PSNR {summary['mean_psnr']:.2f} dB over {len(rows)} image(s)")
    if args.check_bf16:
        b = summary["bf16"]
        print(f"bf16 autocast: {100 * b['id_mismatch']:.2f}% of ids differ from fp32, max |image diff| "
              f"{b['max_abs_diff']:.4f} (decoder alone {b['decoder_max_abs_diff']:.4f})")
    print(f"wrote {len(rows)} PNG(s), metrics.json and metrics.md to {args.out}")
    return 0


def _jsonable(value):
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _markdown(summary: dict) -> str:
    bf16 = "bf16" in summary
    head = "| image | size | tokens | PSNR (dB) |" + (" bf16 ids differ | bf16 max diff |" if bf16 else "")
    lines = [f"# Reconstructions by {summary['tokenizer']}", "", head,
             "|" + " --- |" * (6 if bf16 else 4)]
    for r in summary["images"]:
        line = f"| {r['output']} | {r['size'][0]}x{r['size'][1]} | {r['tokens']} | {r['psnr']:.2f} |"
        if bf16:
            line += f" {100 * r['bf16']['id_mismatch']:.2f}% | {r['bf16']['max_abs_diff']:.4f} |"
        lines.append(line)
    lines += ["", f"Mean PSNR: {summary['mean_psnr']:.2f} dB"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
