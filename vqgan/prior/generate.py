"""Prior samples -> tokenizer -> images on disk (a PNG grid and one PNG per sample)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from vqgan.tokenizer import VQTokenizer
from vqgan.prior.next_scale_input import NextScaleInput
from vqgan.prior.sampling import SamplingConfig, generator_from_config, sample_prior
from vqgan.prior.var import VARPrior
from vqgan.image_io import save_image_grid, save_png_atomic


def check_prior_matches_tokenizer(prior: nn.Module, tokenizer: VQTokenizer) -> None:
    if prior.config.num_codes != tokenizer.num_codes:
        raise ValueError(f"the prior samples K={prior.config.num_codes} codes but the tokenizer has "
                         f"K={tokenizer.num_codes}: pair the prior with the tokenizer its tokens came from")


def next_scale_inputs(tokenizer: VQTokenizer, input_dim: int) -> NextScaleInput:
    """The tokenizer's msvq quantizer, frozen: the next-scale prior's input at each scale (VAR's f_hat, area-down)."""
    kind = tokenizer.config.quantizer.kind
    if kind != "msvq":
        raise ValueError(f"the next-scale prior (var) reads a multi-scale tokenizer (kind msvq); this one is kind {kind}")
    quantizer = tokenizer.model.quantizer
    if quantizer.config.dim != input_dim:
        raise ValueError(f"the var prior's input_dim is {input_dim} but the tokenizer's latent (its msvq dim) is "
                         f"{quantizer.config.dim}: set var.input_dim={quantizer.config.dim}")
    return quantizer.eval().requires_grad_(False)


@torch.no_grad()
def generate_images(prior: nn.Module, tokenizer: VQTokenizer, config: SamplingConfig,
                    labels: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (token grids (N, h, w) or the var prior's (N, L) sequences, images (N, 3, H, W) in [0, 1])."""
    check_prior_matches_tokenizer(prior, tokenizer)
    # the next-scale prior samples through its tokenizer: each scale's input is the msvq quantizer's f_hat so far
    inputs = next_scale_inputs(tokenizer, prior.config.input_dim) if isinstance(prior, VARPrior) else None
    # A CPU generator: the samplers draw their few uniforms per step on it and move them, so a seed gives
    # the same random stream on CPU and GPU (gFID then differs across devices by float rounding only).
    tokens = sample_prior(prior, config, labels=labels, generator=generator_from_config(config, "cpu"), inputs=inputs)
    images = torch.cat([tokenizer.decode(chunk.to(tokenizer.device)).cpu()
                        for chunk in tokens.split(config.batch_size)])
    return tokens, images


def save_samples(images: torch.Tensor, tokens: torch.Tensor, out_dir: str | Path, nrow: int | None = None) -> Path:
    """Write grid.png, sample_NNNN.png each and tokens.json into `out_dir`; returns the grid path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    captions = [f"sample {i}" for i in range(len(images))]
    grid = save_image_grid(images.clamp(0, 1), out_dir / "grid.png", nrow=nrow, captions=captions)  # readable size
    for i, image in enumerate(images):
        save_png_atomic(image.unsqueeze(0), out_dir / f"sample_{i:04d}.png", nrow=1)
    (out_dir / "tokens.json").write_text(json.dumps(tokens.tolist()))
    return grid
