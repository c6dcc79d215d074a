"""Images to files: PNGs written atomically, readable captioned grids, [0, 1] floats <-> uint8 pixels.

Training (reconstruction grids), sampling (sample PNGs) and evaluation (reference folders, FID inputs) all write
images through here, so this module sits below all of them and imports none of them.

Grids: small images enlarged (nearest neighbour, pixels stay visible) and captioned. A 32 px reconstruction
grid written at its own size is a few dozen pixels wide; here every cell is at least `min_cell` pixels,
enlarged by an integer factor so that no pixel is blurred, with a caption (step, PSNR) below it. PIL and
torchvision only: training and sampling import this without matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import save_image

from vqgan.utils import atomic_write_bytes, to_numpy

MIN_CELL = 96  # pixels: the smallest readable cell on a screen


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, 3, H, W) -> uint8 rounded as torchvision's save_image, so in-memory FID = FID of PNGs."""
    return (images.clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8)


def save_png_atomic(images01: torch.Tensor, path: Path, nrow: int) -> None:
    """Images (N, 3, H, W) in [0, 1] -> one PNG at `path` (torchvision's grid, `nrow` per row), written atomically."""
    buffer = io.BytesIO()
    save_image(images01, buffer, format="png", nrow=nrow, padding=2)
    atomic_write_bytes(path, buffer.getvalue())


def render_image_grid(images, nrow: int = 8, captions: list[str] | None = None, min_cell: int = MIN_CELL,
                      pad: int = 2) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] -> one RGB PIL image, nrow per row, each with an optional caption below.

    Small images are enlarged by ceil(min_cell / min(H, W)) with nearest-neighbour resampling.
    """
    images = to_numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W), got {images.shape}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    if captions is not None and len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    n, _, h, w = images.shape
    scale = max(1, -(-min_cell // min(h, w)))  # ceil
    font = ImageFont.load_default()
    caption_h = 0 if captions is None else 14 * (1 + max(caption.count("\n") for caption in captions))
    cell_w, cell_h = w * scale + pad, h * scale + caption_h + pad
    cols, rows = min(nrow, n), -(-n // nrow)
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (np.clip(rearrange(images, "n c h w -> n h w c"), 0, 1) * 255 + 0.5).astype(np.uint8)
    for i in range(n):
        tile = Image.fromarray(pixels[i] if pixels.shape[-1] == 3 else pixels[i, ..., 0])
        tile = tile.resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
        x, y = pad + (i % nrow) * cell_w, pad + (i // nrow) * cell_h
        canvas.paste(tile, (x, y))
        if captions is not None:
            draw.multiline_text((x + 1, y + h * scale + 1), captions[i], fill="black", font=font, spacing=2)
    return canvas


def save_image_grid(images, path: str | Path, nrow: int = 8, captions: list[str] | None = None,
                    min_cell: int = MIN_CELL, pad: int = 2) -> Path:
    """`render_image_grid` written atomically as a PNG at `path`."""
    canvas = render_image_grid(images, nrow, captions, min_cell, pad)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
