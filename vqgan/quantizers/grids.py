"""Implicit grid codebooks (fsq, lfq): every code is a point of a product grid, so nothing is stored or
learned; the index is the number whose digits are the per-channel levels (first channel lowest).

    ScalarLevels   L_i levels per channel, rows bounded by a shifted tanh (FSQ, arXiv:2309.15505)
    SignBits       two levels per channel, -1 and +1: the sign (LFQ, MAGVIT-v2 arXiv:2310.05737)

Like the stored codebooks (codebooks.py), a grid registers its tensors on the quantizer module `q` it
serves, non-persistent: they derive from the config, so no checkpoint or folder holds them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqgan.quantizers.estimators import straight_through

# tanh's range is widened by this much so that its end points round to the outer levels, and the even-L
# shift atanh(0.5 / half) stays finite at L = 2 (as vector-quantize-pytorch; the paper's code uses tan).
_BOUND_EPS = 1e-3


class ScalarLevels:
    """L_i levels per channel; codes in [-1, 1] (digit - L // 2) / (L // 2); rows in level units."""

    def __init__(self, levels: tuple[int, ...]):
        self.levels = levels

    def register(self, q: nn.Module) -> None:
        levels = torch.tensor(self.levels, dtype=torch.long)  # (c,)
        q.register_buffer("levels", levels, persistent=False)
        q.register_buffer("basis", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0),
                          persistent=False)  # (c,) place value of each digit

    @staticmethod
    def half_width(q: nn.Module) -> Tensor:
        return (q.levels // 2).float()  # (c,)

    def prepare_rows(self, q: nn.Module, h: Tensor) -> Tensor:
        """(N, c) -> (N, c) bounded so that rounding gives exactly L_i values per channel."""
        levels = q.levels.float()
        half = (levels - 1.0) * (1.0 + _BOUND_EPS) / 2.0
        offset = torch.where(q.levels % 2 == 1, 0.0, 0.5)  # even L: the grid is shifted by a half
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def search(self, q: nn.Module, h: Tensor) -> Tensor:
        digits = torch.round(h).long() + q.levels // 2  # (N, c) in [0, L_i)
        return (digits * q.basis).sum(dim=1)

    def codes_for(self, q: nn.Module, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(1) // q.basis) % q.levels  # (N, c)
        return (digits - q.levels // 2).float() / self.half_width(q)

    def pass_through(self, q: nn.Module, rows: Tensor, codes: Tensor) -> Tensor:
        """Value exactly `codes` (x - x == 0); identity gradient to the rows, in code units."""
        return codes + (rows - rows.detach()) / self.half_width(q)

    def level_values(self, rows: Tensor) -> list[Tensor]:
        """Per channel the (L_i,) values its rows round to (digit - L // 2), for the entropy penalty."""
        return [(torch.arange(level, device=rows.device) - level // 2).to(rows.dtype) for level in self.levels]


class SignBits:
    """b channels of two levels: code bit i = (row_i > 0), code value -1 or +1."""

    def __init__(self, bits: int):
        self.bits = bits

    def register(self, q: nn.Module) -> None:
        q.register_buffer("powers", 2 ** torch.arange(self.bits), persistent=False)  # (b,) channel i = bit i

    def prepare_rows(self, q: nn.Module, h: Tensor) -> Tensor:
        return h

    def search(self, q: nn.Module, h: Tensor) -> Tensor:
        return ((h > 0).long() * q.powers).sum(dim=1)

    def codes_for(self, q: nn.Module, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(1) // q.powers) % 2  # (N, b)
        return bits.float() * 2.0 - 1.0

    def pass_through(self, q: nn.Module, rows: Tensor, codes: Tensor) -> Tensor:
        return straight_through(rows, codes)  # value exactly the codes, identity gradient

    def level_values(self, rows: Tensor) -> list[Tensor]:
        return [rows.new_tensor([-1.0, 1.0])] * self.bits  # digit 0 = -1, digit 1 = +1 (bit i of the index)


Grid = ScalarLevels | SignBits
