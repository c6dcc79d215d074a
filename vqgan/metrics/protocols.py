"""Evaluation protocols: the preprocessing an image gets before FID features, named so numbers can be compared.

`imagenet-val` is the protocol of the rFID / gFID tables in LlamaGen (2.19 rFID for its f16 tokenizer),
Open-MAGVIT2 (1.17) and IBQ (1.00): ImageNet val (50k images), shorter side resized to 256, centre crop
256x256. The resize is ADM's `center_crop_arr` (openai/guided-diffusion `guided_diffusion/image_datasets.py`,
reused verbatim by LlamaGen `dataset/augmentation.py`): halve with a box filter while the shorter side is
at least twice the target, then one bicubic resize, then the centre crop. Another crop or reference set
gives another number (LlamaGen's tokenizer scored against ADM's virtual reference batch reads 4.28, not 2.19).
"""

from __future__ import annotations

from PIL import Image

# protocol name -> side of the square crop (None: images as they are)
PROTOCOLS: dict[str, int | None] = {"native": None, "imagenet-val": 256, "imagenet-val-512": 512}


def check_protocol(name: str) -> int | None:
    """The crop size of protocol `name`; an unknown name is an error listing the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's resize-then-centre-crop: shorter side -> `size` (box halvings, then bicubic), centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, protocol: str) -> Image.Image:
    """An RGB PIL image prepared as `protocol` prescribes (unchanged for 'native')."""
    size = check_protocol(protocol)
    image = image.convert("RGB")
    return image if size is None else center_crop_arr(image, size)
