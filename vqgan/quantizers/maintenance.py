"""Codebook maintenance of the lookup kinds, run in training mode only: the first forward's
initialisation (k-means on the batch, or rank 0's codes on every rank) and dead-code restarts.

Each is chosen by a kind (vq.py, ibq.py, simvq.py); the buffers it adds to the quantizer are named in
its `training_state`, since inference never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.quantizers.codebooks import broadcast_codebook
from vqgan.quantizers.distributed import all_gather_rows, broadcast_from_rank0, is_rank0
from vqgan.quantizers.kmeans import kmeans

# -- first training forward ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncInit:
    """First training forward: every rank takes rank 0's codebook (codes stay as built)."""

    def __call__(self, q: nn.Module, h: Tensor) -> None:
        broadcast_codebook(q.codebook_store, q)


@dataclass(frozen=True)
class KMeansInit:
    """First training forward: every code set to k-means centres of this batch (SoundStream,
    arXiv:2107.03312), all ranks' rows solved on rank 0; `spherical` for cosine codes."""

    iters: int
    spherical: bool = False

    def __call__(self, q: nn.Module, h: Tensor) -> None:
        num_codes, chunk_size = q.config.num_codes, q.config.chunk_size
        data = all_gather_rows(h)  # (N_total, c)
        if is_rank0():
            centres = kmeans(data, num_codes, self.iters, chunk_size, self.spherical)
        else:
            centres = data.new_empty(num_codes, q.config.lookup_dim)
        broadcast_from_rank0(centres)
        q.write_codes(torch.arange(num_codes, device=h.device), centres)
        broadcast_codebook(q.codebook_store, q)  # affine parameters and any other codebook state


# -- dead-code restarts ---------------------------------------------------------------------------------
# Where a restarted code goes, from its candidate rows (K, c), the dead mask (K,) and the quantizer.
Placement = Callable[[Tensor, Tensor, nn.Module], Tensor]


def as_drawn(rows: Tensor, dead: Tensor, q: nn.Module) -> Tensor:
    """The candidate rows themselves (Jukebox)."""
    return rows


def unit_length(rows: Tensor, dead: Tensor, q: nn.Module) -> Tensor:
    """The candidate rows normalised, for codes on the unit sphere."""
    return F.normalize(rows, dim=1)


def at_live_norm(rows: Tensor, dead: Tensor, q: nn.Module) -> Tensor:
    """The candidate rows' directions at the live codes' mean norm (for an inner-product search).

    Under an argmax of z.e a code's norm decides how many rows it wins. A row copied as it is (and
    the error-weighted draw favours long rows) would take the rows of every code near it, and a short
    one would win none: restarts that kept the rows' norms collapsed the tiny tokenizer (0.4 % of codes
    used, in a side run), these reach 98.4 % (benchmarks/results/quantizer_fidelity.md).
    """
    live = (~dead).float()  # (K,)
    live_count = live.sum()
    live_norm = (q.codebook.detach().norm(dim=1) * live).sum() / live_count.clamp_min(1.0)
    norm = torch.where(live_count > 0, live_norm, rows.norm(dim=1).mean())  # no live code: the rows' own
    return F.normalize(rows, dim=1) * norm


@dataclass(frozen=True)
class DeadCodeRestart:
    """Reseed a code unused for `threshold` training forwards (Jukebox arXiv:2005.00341, "random restarts").

    The reseed happens after the lookup: candidates are drawn from this batch's rows (`draw`, after the
    lookup) and written before the next batch's lookup (`restart`), so a restarted code is scored only on
    data it was not copied from. The candidates are a buffer, `restart_rows`, so a resume restarts
    identically. source "error": rows drawn with probability ~ their squared quantization error
    (k-means++'s D^2 rule): codes go where the codebook is worst; "random": uniformly.
    """

    threshold: int
    source: Literal["error", "random"] = "error"
    place: Placement = as_drawn
    training_state = ("restart_rows",)

    def register(self, q: nn.Module, num_codes: int, width: int) -> None:
        q.register_buffer("restart_rows", torch.zeros(num_codes, width))

    @torch.no_grad()
    def restart(self, q: nn.Module) -> None:
        """Reseed codes unused for `threshold` forwards from the previous batch's candidates.

        The i-th dead code (in code order) takes the i-th candidate in draw order, so the rows drawn
        first (the largest errors, under "error") are used first; fixed shapes, no host sync.
        """
        num_codes = q.config.num_codes
        dead = (q.step - q.last_used_step) >= self.threshold  # (K,), same on all ranks
        rank = (torch.cumsum(dead.long(), 0) - 1).clamp(min=0)  # (K,) position among the dead codes
        rows = self.place(q.restart_rows[rank], dead, q)  # (K, c)
        q.write_codes(torch.arange(num_codes, device=rows.device), rows, mask=dead)

    @torch.no_grad()
    def draw(self, q: nn.Module, h: Tensor, h_q: Tensor, finite: Tensor) -> None:
        """Pick K candidate rows of this batch for the next step's restarts (rank 0's rows, broadcast).

        Fixed shapes, no host sync: K candidates in draw order, distinct rows while N >= K (the batch's
        rows in turn otherwise).
        """
        num_codes, n = q.config.num_codes, h.shape[0]
        if is_rank0():
            if self.source == "error":
                weights = (h - h_q).square().sum(dim=1) * finite  # (N,), non-finite rows never drawn
            else:
                weights = finite.float()
            # The floor keeps every weight positive, so a draw always exists (an all-zero batch included).
            weights = weights + weights.max().clamp_min(1.0) * 1e-12
            order = torch.multinomial(weights, min(n, num_codes), replacement=False)  # (min(N, K),)
            vectors = h[order[torch.arange(num_codes, device=h.device) % order.shape[0]]]  # (K, c)
        else:
            vectors = h.new_empty(num_codes, h.shape[1])
        broadcast_from_rank0(vectors)
        q.restart_rows.copy_(vectors)
