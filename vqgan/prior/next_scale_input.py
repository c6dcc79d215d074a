"""What the next-scale prior reads: the tokenizer side's input for scale k, built from the ids of scales < k.

VAR (Tian et al. 2024, arXiv:2404.02905) feeds step k of its prior not the ids of scale k-1 but the
tokenizer's own partial reconstruction: the codes of every earlier scale, each upsampled to the
largest scale (bicubic) and passed through that scale's phi, summed into f_hat, then area-downsampled
to s_k x s_k (FoundationVision/VAR models/quant.py, `idxBl_to_var_input` for training and
`get_next_autoregressive_input` for sampling). That mapping belongs to the multi-scale quantizer, so
the prior asks for it through one small protocol, `NextScaleInput`; `ResidualPyramidInput` is the
reference implementation (codebook + optional phi) the tests use and the quantizer can delegate to.

Token layout: one flat (B, L) sequence, L = sum(s * s for s in scales), scale after scale, each
scale's s x s grid in raster order (VAR's `idx_Bl` lists concatenated).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

# VAR's released tokenizer and prior (vae_ch160v4096z32, VAR-d16..d30): 10 scales, 680 tokens.
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@runtime_checkable
class NextScaleInput(Protocol):
    """The tokenizer side of the next-scale prior (the multi-scale quantizer implements it).

    scales: the side s_k of each scale's s_k x s_k grid, coarse to fine.
    next_scale_input(ids_per_scale, k): ids_per_scale[i] is (B, s_i * s_i) long for i < k (more may be
    given and must be ignored), 1 <= k < len(scales) -> (B, s_k * s_k, C) float, the prior's input
    for the positions of scale k (C = the prior's input_dim, the tokenizer's latent width). It must
    depend on ids_per_scale[:k] only.

    Optional: teacher_forcing_input(ids) with ids (B, L) flat -> (B, L - s_0^2, C), the inputs of
    scales 1..K-1 concatenated in one pass (VAR's idxBl_to_var_input); it must equal the loop over
    next_scale_input that `teacher_forcing_input` below runs when it is absent.
    """

    scales: tuple[int, ...]

    def next_scale_input(self, ids_per_scale: Sequence[Tensor], k: int) -> Tensor: ...


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Scales as a tuple of positive, strictly increasing ints, or a ValueError saying what is wrong."""
    scales = tuple(scales)
    if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of ints >= 1, got {scales}")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must increase strictly, coarse to fine, got {scales}")
    return scales


def scale_bounds(scales: Sequence[int]) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale's positions in the flat sequence."""
    bounds, begin = [], 0
    for s in scales:
        bounds.append((begin, begin + s * s))
        begin += s * s
    return bounds


def scale_levels(scales: Sequence[int]) -> Tensor:
    """(L,) long: the scale index of each position of the flat sequence."""
    return torch.cat([torch.full((s * s,), k, dtype=torch.long) for k, s in enumerate(scales)])


def split_scales(ids: Tensor, scales: Sequence[int]) -> list[Tensor]:
    """(B, L') flat ids covering the first scales whose sizes sum to L' -> [(B, s_k * s_k)] per scale."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L') flat ids, got shape {tuple(ids.shape)}")
    sizes = [s * s for s in scales]
    total, count = 0, 0
    while count < len(sizes) and total < ids.shape[1]:
        total, count = total + sizes[count], count + 1
    if total != ids.shape[1]:
        raise ValueError(f"ids must be (B, L') with L' a sum of the first scales' sizes {sizes}, "
                         f"got shape {tuple(ids.shape)}")
    return list(ids.split(sizes[:count], dim=1))


def teacher_forcing_input(inputs: NextScaleInput, ids_per_scale: Sequence[Tensor], upto: int | None = None) -> Tensor:
    """The inputs of scales 1 .. upto-1 (default: all) concatenated -> (B, L_upto - s_0^2, C)."""
    upto = len(inputs.scales) if upto is None else upto
    # the tokenizer's one pass reads every scale's ids (the last one's unused): only when all are given
    if upto == len(inputs.scales) == len(ids_per_scale) and hasattr(inputs, "teacher_forcing_input"):
        return inputs.teacher_forcing_input(torch.cat(list(ids_per_scale[:upto]), dim=1))
    parts = [inputs.next_scale_input(ids_per_scale, k) for k in range(1, upto)]
    if not parts:
        first = ids_per_scale[0]
        return torch.zeros(first.shape[0], 0, 0, device=first.device)  # no scale after the first: nothing to embed
    return torch.cat(parts, dim=1)


# phi(h, k): the scale-k residual conv applied to the upsampled codes h (B, C, S, S); None = identity.
Phi = Callable[[Tensor, int], Tensor]


class ResidualPyramidInput:
    """Reference `NextScaleInput` from a codebook (K, C) and an optional phi, as VAR's `idxBl_to_var_input`.

    f_hat_k = sum_{i<k} phi(bicubic_up(codebook[ids_i] as (B, C, s_i, s_i) -> S x S), i), S = scales[-1]
    (the largest scale is used as is, as in VAR); input_k = area_down(f_hat_k -> s_k x s_k).
    """

    def __init__(self, codebook: Tensor, scales: Sequence[int], phi: Phi | None = None):
        if codebook.dim() != 2:
            raise ValueError(f"codebook must be (K, C), got shape {tuple(codebook.shape)}")
        self.codebook = codebook
        self.scales = check_scales(scales)
        self.input_dim = int(codebook.shape[1])
        self.phi = phi

    def upsampled_codes(self, ids: Tensor, i: int) -> Tensor:
        """(B, s_i^2) ids of scale i -> (B, C, S, S): its codes brought to the largest scale, through phi."""
        side, largest = self.scales[i], self.scales[-1]
        codes = rearrange(self.codebook[ids], "b (h w) c -> b c h w", h=side)            # (B, C, s_i, s_i)
        if side != largest:
            codes = F.interpolate(codes, size=(largest, largest), mode="bicubic")        # (B, C, S, S)
        return codes if self.phi is None else self.phi(codes, i)

    def next_scale_input(self, ids_per_scale: Sequence[Tensor], k: int) -> Tensor:
        if not 1 <= k < len(self.scales):
            raise ValueError(f"k must lie in [1, {len(self.scales)}), got {k}")
        if len(ids_per_scale) < k:
            raise ValueError(f"the input of scale {k} needs the ids of scales 0..{k - 1}, got {len(ids_per_scale)}")
        f_hat = sum(self.upsampled_codes(ids_per_scale[i], i) for i in range(k))        # (B, C, S, S)
        side = self.scales[k]
        down = F.interpolate(f_hat, size=(side, side), mode="area")                     # (B, C, s_k, s_k)
        return rearrange(down, "b c h w -> b (h w) c")


def check_inputs_fit(model, inputs: NextScaleInput) -> None:
    """Refuse a NextScaleInput with other scales than the prior's (`model`: a VARPrior; a wrong code width
    fails in its `embed`)."""
    c = model.config
    if not isinstance(inputs, NextScaleInput):
        raise TypeError(f"{type(inputs).__name__} is not a NextScaleInput: it needs `scales` and "
                        "`next_scale_input(ids_per_scale, k)` (vqgan.prior.next_scale_input)")
    if tuple(inputs.scales) != c.scales:
        raise ValueError(f"the tokenizer's next-scale input has scales {tuple(inputs.scales)}; the VAR prior "
                         f"expects scales {c.scales}")
