"""Decoding: image bytes -> upright 8-bit RGB -> shorter side resized -> (3, S, S) crop in [-1, 1].

Images are decoded here, not by `datasets`, so that one corrupt or truncated file costs one item (the
callers catch what `decode_image` raises), and every source, the shard tool and the metrics decode alike.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from vqgan.errors import DataError
from vqgan.utils import images_to_model_range

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16-bit and float data rescaled, not clipped."""
    mode = image.mode
    if mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit): 16-bit data, 65535 -> 255
        # NOTE: Pillow's own convert("L") clips these at 255, turning most 16-bit images white.
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(values)
    if mode == "F":  # floats: [0, 1] data is scaled to [0, 255], anything else is taken as [0, 255]
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return _gray_to_rgb(values * 255.0 if values.max(initial=0.0) <= 1.0 else values)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in image.info:
        # White, not dropping alpha: pixels under alpha 0 hold arbitrary colours (often black or garbage),
        # and a transparent background is shown on white by nearly every viewer. P goes through RGBA so that
        # a palette's transparent index is honoured.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    return image.convert("RGB")  # RGB (a copy), 1, L, CMYK, YCbCr, LAB, HSV


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def open_image(image: dict[str, Any]) -> Image.Image:
    """Lazy PIL image from a `datasets.Image(decode=False)` cell ({"bytes", "path"}); reads only the header."""
    if image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if image.get("path"):
        return Image.open(image["path"])
    raise DataError(f"image cell has neither bytes nor a path: {image!r}")


def decode_image(image: dict[str, Any], min_short_side: int | None = None) -> Image.Image:
    """Fully decoded, upright RGB image; raises (OSError, ValueError, ...) on a corrupt or truncated file.

    min_short_side: the image is about to be resized so that its shorter side is this; a JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 scale whose shorter side still reaches it (libjpeg's DCT
    scaling, "draft" mode: a 4x smaller decode is several times faster), and the resize does the rest.
    """
    with open_image(image) as pil:
        if min_short_side is not None and pil.format == "JPEG" and min(pil.size) > 2 * min_short_side:
            scale = min_short_side / min(pil.size)
            pil.draft("RGB", (math.ceil(pil.width * scale), math.ceil(pil.height * scale)))
        pil.load()  # NOTE: the decode happens here; truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
        return to_rgb(ImageOps.exif_transpose(pil))  # camera JPEGs store rotation as an EXIF tag


def resized_pixels(image: Image.Image, size: int, resize: int | None) -> torch.Tensor:
    """RGB image -> (3, H', W') uint8 with the shorter side resized (to `resize`, or up to `size` if smaller)."""
    pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8
    short = min(pixels.shape[-2:])
    # NOTE: with resize None an image smaller than the crop is scaled up to fit, not skipped: build_dataset
    # has already checked that some images are large enough, so these are rare stragglers.
    target = resize if resize is not None else (size if short < size else None)
    if target is not None and target != short:
        pixels = TF.resize(pixels, [target], antialias=True)  # shorter side -> target
    return pixels


def crop_pixels(pixels: torch.Tensor, size: int, random_crop: bool, hflip: bool, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float in [-1, 1]: random or centre crop, maybe flip."""
    height, width = pixels.shape[-2:]
    if random_crop:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        pixels = TF.crop(pixels, top, left, size, size)
    else:
        pixels = TF.center_crop(pixels, [size, size])
    if hflip and rng.random() < 0.5:
        pixels = TF.horizontal_flip(pixels)
    return images_to_model_range(TF.to_dtype(pixels, torch.float32, scale=True))  # (3, S, S) in [-1, 1]


def crop_to_tensor(
    image: Image.Image, size: int, resize: int | None, random_crop: bool, hflip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """RGB image -> (3, size, size) float in [-1, 1]: resize the shorter side, crop, maybe flip."""
    return crop_pixels(resized_pixels(image, size, resize), size, random_crop, hflip, rng)

