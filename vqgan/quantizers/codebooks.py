"""Codebooks of the lookup kinds (vq, ibq, simvq): where the K codes come from and how they change.

    LearnedCodebook   codes = weight, learned by gradient; optional affine reparametrisation
    EMACodebook       codes = EMA of the encoder outputs assigned to each code (no gradient)
    MappedCodebook    codes = frozen random matrix times one learned linear map (SimVQ)

(The implicit grids of fsq and lfq, which store no codes, are in grids.py.)

A codebook's tensors are registered on the quantizer module it serves, under the names checkpoints and
tokenizer folders have always used (`quantizer.weight`, `quantizer.embed_avg`, `quantizer.code_map.*`),
so each method takes that module `q`. `training_state` names the buffers only training reads: they are
kept in training checkpoints and left out of tokenizer folders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.quantizers.distributed import all_reduce_sum, broadcast_from_rank0


def uniform_codes(num_codes: int, width: int) -> Tensor:
    """taming's init: small codes near the origin, so early assignments spread by direction. (K, c)"""
    return torch.empty(num_codes, width).uniform_(-1.0 / num_codes, 1.0 / num_codes)


def masked_write(target: Tensor, rows: Tensor, new: Tensor, mask: Tensor | None) -> None:
    """target[rows] = new where mask (m,) is set (all rows without a mask); fixed shapes, no host sync."""
    new = new.to(target.dtype)
    if mask is not None:
        old = target[rows]
        new = torch.where(mask.view(-1, *[1] * (old.dim() - 1)), new, old)
    target[rows] = new


class _StoredCodes:
    """What every stored codebook shares: optional cosine codes (ViT-VQGAN), no training state, no running
    update, no own learning rate; each codebook overrides what it does differently."""

    training_state: tuple[str, ...] = ()

    def __init__(self, l2_normalize: bool = False):
        self.l2_normalize = l2_normalize

    def unit(self, x: Tensor) -> Tensor:
        """(n, c) rows on the unit sphere for cosine codes, unchanged otherwise."""
        return F.normalize(x, dim=1) if self.l2_normalize else x

    def prepare_rows(self, h: Tensor) -> Tensor:
        """(N, c) -> (N, c): the encoder rows in the space of the codes."""
        return self.unit(h)

    def training_codes(self, q: nn.Module) -> Tensor:
        """The codes a training forward searches and differentiates through."""
        return self.codes(q)

    def update(self, q: nn.Module, h: Tensor, indices: Tensor, counts: Tensor) -> None:
        """After a training forward's assignments (codebooks the gradient moves: nothing to do)."""

    def param_lr_scales(self) -> dict[str, float]:
        return {}

    def reset_training_state(self, q: nn.Module) -> None:
        """Training state consistent with loaded codes (none by default)."""


class LearnedCodebook(_StoredCodes):
    """Codes learned by the gradient of the codebook loss: `weight` (K, c), a Parameter.

    affine_lr: Huh et al. 2023 (arXiv:2305.08842), codes (1 + s) * e + b with s, b learned at affine_lr
    times the model's lr and shared by all codes; None = off. l2_normalize: cosine codes (ViT-VQGAN).
    """

    writable = True  # k-means and restarts may write codes
    gradient_trained = True  # the codebook loss term moves it

    def __init__(self, l2_normalize: bool = False, affine_lr: float | None = None):
        super().__init__(l2_normalize)
        self.affine_lr = affine_lr

    def register(self, q: nn.Module, initial: Tensor) -> None:
        q.weight = nn.Parameter(initial)
        if self.affine_lr is not None:
            width = initial.shape[1]
            q.affine_scale = nn.Parameter(torch.zeros(width))  # codes = (1 + scale) * weight + shift
            q.affine_shift = nn.Parameter(torch.zeros(width))

    def codes(self, q: nn.Module) -> Tensor:
        """(K, c) effective code vectors used for lookup (after affine and normalisation)."""
        codes = q.weight
        if self.affine_lr is not None:
            codes = (1.0 + q.affine_scale) * codes + q.affine_shift
        return self.unit(codes)

    def write(self, q: nn.Module, rows: Tensor, vectors: Tensor, mask: Tensor | None) -> None:
        """Make the effective codes at `rows` equal `vectors` (inverting the affine map)."""
        raw = vectors
        if self.affine_lr is not None:
            raw = (vectors - q.affine_shift) / (1.0 + q.affine_scale)
        masked_write(q.weight, rows, raw, mask)

    def shared_tensors(self, q: nn.Module) -> list[Tensor]:
        """Tensors every rank must hold identically."""
        extra = [q.affine_scale, q.affine_shift] if self.affine_lr is not None else []
        return [q.weight, *extra]

    def param_lr_scales(self) -> dict[str, float]:
        if self.affine_lr is None:
            return {}
        return {"affine_scale": self.affine_lr, "affine_shift": self.affine_lr}


class EMACodebook(_StoredCodes):
    """Codes as an EMA of the encoder outputs assigned to them, Laplace-smoothed counts (VQ-VAE appendix
    A.1, VQ-VAE-2 arXiv:1906.00446). `weight` is a buffer; `cluster_size` (K,) and `embed_avg` (K, c) are
    the running sums only training reads."""

    writable = True
    gradient_trained = False  # an EMA codebook is a buffer: no codebook loss term
    training_state = ("cluster_size", "embed_avg")

    def __init__(self, decay: float, epsilon: float, l2_normalize: bool = False):
        super().__init__(l2_normalize)
        self.decay, self.epsilon = decay, epsilon

    def register(self, q: nn.Module, initial: Tensor) -> None:
        q.register_buffer("weight", initial)
        # Each code starts as if it had absorbed one vector at its own position: no bias toward 0.
        q.register_buffer("cluster_size", torch.ones(initial.shape[0]))
        q.register_buffer("embed_avg", initial.clone())

    def codes(self, q: nn.Module) -> Tensor:
        return self.unit(q.weight)

    def training_codes(self, q: nn.Module) -> Tensor:
        return self.codes(q).clone()  # NOTE: `update` writes the buffer in place after the search

    def write(self, q: nn.Module, rows: Tensor, vectors: Tensor, mask: Tensor | None) -> None:
        masked_write(q.weight, rows, vectors, mask)
        masked_write(q.cluster_size, rows, torch.ones_like(q.cluster_size[rows]), mask)
        masked_write(q.embed_avg, rows, vectors, mask)

    @torch.no_grad()
    def update(self, q: nn.Module, h: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA codebook from this batch's assignments (counts already summed over ranks)."""
        sums = torch.zeros_like(q.embed_avg).index_add_(0, indices, h)  # (K, c)
        all_reduce_sum(sums)
        decay, eps, num_codes = self.decay, self.epsilon, q.weight.shape[0]
        q.cluster_size.mul_(decay).add_(counts.float(), alpha=1.0 - decay)
        q.embed_avg.mul_(decay).add_(sums, alpha=1.0 - decay)
        # Laplace smoothing keeps a code with ~0 mass from dividing by ~0 (VQ-VAE-2 / sonnet).
        total = q.cluster_size.sum()
        smoothed = (q.cluster_size + eps) / (total + num_codes * eps) * total
        q.weight.copy_(q.embed_avg / smoothed.unsqueeze(1))

    def shared_tensors(self, q: nn.Module) -> list[Tensor]:
        return [q.weight, q.cluster_size, q.embed_avg]

    @torch.no_grad()
    def reset_training_state(self, q: nn.Module) -> None:
        """Running sums for loaded codes: each code as if it had absorbed one vector at its position."""
        q.cluster_size.fill_(1.0)
        q.embed_avg.copy_(q.weight)


class MappedCodebook(_StoredCodes):
    """SimVQ (Zhu et al. 2024, arXiv:2411.02038): codes = C W^T + b, C (K, c) a frozen random buffer
    `weight`, W and b one learned linear map `code_map`. Every step's codebook gradient moves W, so every
    code moves with it and none is left dead: nothing is ever written into C."""

    writable = False  # no k-means, no restarts: the map does their job
    gradient_trained = True

    def register(self, q: nn.Module, initial: Tensor) -> None:
        q.register_buffer("weight", initial)  # frozen: no gradient, no optimizer state
        q.code_map = nn.Linear(initial.shape[1], initial.shape[1])

    def codes(self, q: nn.Module) -> Tensor:
        return self.unit(q.code_map(q.weight))

    def write(self, q: nn.Module, rows: Tensor, vectors: Tensor, mask: Tensor | None) -> None:
        raise RuntimeError("a SimVQ codebook is frozen codes times a learned map; no code is written directly")

    def shared_tensors(self, q: nn.Module) -> list[Tensor]:
        return [q.weight, q.code_map.weight, q.code_map.bias]


Codebook = LearnedCodebook | EMACodebook | MappedCodebook


def broadcast_codebook(codebook: Codebook, q: nn.Module) -> None:
    """Give every rank rank 0's codebook tensors, whatever seed each rank was built with."""
    for tensor in codebook.shared_tensors(q):
        broadcast_from_rank0(tensor.data)
