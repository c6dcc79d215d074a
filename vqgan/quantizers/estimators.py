"""Gradient estimators: how the task gradient crosses the non-differentiable code choice, and the
codebook / commitment losses that go with each. Every estimator's forward value is exactly the selected
codes, so `indices_to_codes(indices)` reproduces a training forward's `quantized` bit for bit.

    VQEstimator    straight-through (VQ-VAE) or the rotation trick, optional synchronized update
    IBQEstimator   IBQ's softmax straight-through, reaching every code
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from vqgan.quantizers.search import chunk_rows

_EPS = 1e-6
# Shifted logits below this count as probability exactly 0 (e^-30 ~ 1e-13 of the row's largest; at most
# K e^-30 of the row's mass is dropped). On CPU, the tiny exps of a peaked softmax would otherwise go down
# exp's slow underflow path and make every later product a slow denormal (measured 3x slower at K=16384).
_SOFTMAX_FLOOR = -30.0

# (output rows with the value of h_q, codebook loss, commitment loss, their weighted sum)
EstimatorOutput = tuple[Tensor, Tensor, Tensor, Tensor]


def straight_through(h: Tensor, h_q: Tensor) -> Tensor:
    """(N, d), (N, d) -> value h_q, identity gradient to h (VQ-VAE, arXiv:1711.00937).

    Same gradient as h + (h_q - h).detach(), but the value is h_q exactly.
    """
    return h_q.detach() + (h - h.detach())


def rotation_trick(z: Tensor, z_q: Tensor) -> Tensor:
    """(N, d), (N, d) -> (N, d) with the value of z_q and the gradient of the rotation trick.

    Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick" (arXiv:2410.06424):
    q~ = sg[(||q|| / ||e||) R] e with R = I - 2 r r^T + 2 q^ e^T, r = (e^ + q^) / ||e^ + q^||, the
    rotation taking e^ to q^ in their common plane. R is applied as two rank-one updates, never as a
    (d, d) matrix per vector. The gradient to z is (||q||/||e||) R^T g: rotated, and its norm scaled
    by ||q|| / ||e||. NOTE: the value is z_q + (x - x), exactly z_q, so eval round trips are exact.
    """
    with torch.no_grad():
        z_norm = z.norm(dim=1, keepdim=True).clamp_min(_EPS)  # (N, 1)
        q_norm = z_q.norm(dim=1, keepdim=True)  # (N, 1)
        z_hat = z / z_norm
        q_hat = z_q / q_norm.clamp_min(_EPS)
        r = F.normalize(z_hat + q_hat, dim=1, eps=_EPS)  # (N, d); ill-defined only if z^ = -q^
        scale = q_norm / z_norm  # (N, 1)
    rotated = z - 2.0 * r * (r * z).sum(1, keepdim=True) + 2.0 * q_hat * (z_hat * z).sum(1, keepdim=True)
    rotated = scale * rotated  # (N, d), equals z_q up to rounding
    return z_q.detach() + (rotated - rotated.detach())


@dataclass(frozen=True)
class VQEstimator:
    """VQ-VAE's losses, codebook + beta * commitment, and a pass-through for the task gradient.

    `codebook_term` is False for a codebook no gradient moves (EMA): its term is then 0. `sync_nu`:
    Huh et al. 2023 (arXiv:2305.08842), the selected codes also get nu times the task gradient.
    """

    beta: float
    pass_through: Callable[[Tensor, Tensor], Tensor] = straight_through  # or rotation_trick
    codebook_term: bool = True
    sync_nu: float = 0.0

    def __call__(self, h: Tensor, h_q: Tensor, codes: Tensor, indices: Tensor) -> EstimatorOutput:
        codebook_loss = F.mse_loss(h_q, h.detach()) if self.codebook_term else h.new_zeros(())
        commitment_loss = F.mse_loss(h, h_q.detach())
        out = self.pass_through(h, h_q)
        if self.sync_nu > 0:
            out = out + self.sync_nu * (h_q - h_q.detach())
        return out, codebook_loss, commitment_loss, codebook_loss + self.beta * commitment_loss


@dataclass(frozen=True)
class IBQEstimator:
    """Index Backpropagation (Shi et al. 2024, arXiv:2412.02692) as SEED-Voken's `IndexPropagationQuantize`.

    The output's value is the selected code; its gradient is that of onehot_st E with onehot_st = hard +
    softmax(z E^T) - sg[softmax(z E^T)]: the selected code gets the task gradient as in VQ, and through
    the softmax's logits every code and z get gradient too. The loss is SEED-Voken's
        mse(z_q, z) + mse(z, sg[e]) + beta * mse(e, sg[z])
    (z_q: the output, so the first term also reaches every code through the softmax).
    """

    beta: float
    chunk_size: int

    def __call__(self, h: Tensor, h_q: Tensor, codes: Tensor, indices: Tensor) -> EstimatorOutput:
        out = h_q  # value exactly the selected codes; the task gradient reaches them as in VQ
        if torch.is_grad_enabled() and (h.requires_grad or codes.requires_grad):
            out = h_q + softmax_logits_gradient(h, codes, self.chunk_size)
        codebook_loss = F.mse_loss(h_q, h.detach())
        commitment_loss = F.mse_loss(h, h_q.detach())
        loss = F.mse_loss(out, h) + commitment_loss + self.beta * codebook_loss
        return out, codebook_loss, commitment_loss, loss


# -- IBQ's softmax gradient, chunked: 4 matmuls of the search's size in backward, no (N, K) matrix --------


def _softmax_(logits: Tensor) -> Tensor:
    """Row softmax of (r, K) logits, in place, entries below e^_SOFTMAX_FLOOR of the row's largest set to 0."""
    shifted = logits.sub_(logits.amax(dim=1, keepdim=True))
    negligible = shifted < _SOFTMAX_FLOOR
    p = shifted.clamp_(min=_SOFTMAX_FLOOR).exp_().masked_fill_(negligible, 0.0)
    return p.div_(p.sum(dim=1, keepdim=True))


def _softmax_logits_backward(
    h: Tensor, codes: Tensor, grad: Tensor, chunk_size: int, need_h: bool = True, need_codes: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients to h (N, c) and codes (K, c) of sum(grad * p E) through p's logits, p = softmax(h E^T).

    Chunk by chunk of rows: recompute p, then d/dp = grad E^T, the softmax backward, and the matmuls
    back to h and to every code (each skipped when its gradient is not needed).
    """
    grad_h = []
    grad_codes = torch.zeros_like(codes) if need_codes else None
    rows = chunk_rows(h.shape[0], codes.shape[0], codes.shape[1], chunk_size, h.device)
    codes_t = codes.t()  # (c, K)
    for start in range(0, h.shape[0], rows):
        h_rows, g_rows = h[start : start + rows], grad[start : start + rows]  # (r, c)
        p = _softmax_(h_rows @ codes_t)  # (r, K)
        dl = g_rows @ codes_t  # (r, K): d loss / d p
        # softmax backward in place: d loss / d logits = p * (dl - sum(p * dl))
        dl.sub_((p * dl).sum(dim=1, keepdim=True)).mul_(p)
        if need_h:
            grad_h.append(dl @ codes)
        if need_codes:
            grad_codes.addmm_(dl.t(), h_rows)
    return (torch.cat(grad_h) if need_h else None), grad_codes


class _SoftmaxLogitsGradient(torch.autograd.Function):
    """(N, c), (K, c) -> (N, c) zeros whose gradient is that of (p - sg[p]) E, p = softmax(h E^T)."""

    @staticmethod
    def forward(ctx, h: Tensor, codes: Tensor, chunk_size: int) -> Tensor:
        ctx.save_for_backward(h, codes)
        ctx.chunk_size = chunk_size
        return torch.zeros_like(h)

    @staticmethod
    @once_differentiable  # in-place chunk arithmetic: no double backward (refused loudly, not wrong)
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        h, codes = ctx.saved_tensors
        need_h, need_codes = ctx.needs_input_grad[:2]
        # fp32 like the forward, even when backward runs inside an autocast region
        with torch.autocast(device_type=h.device.type, enabled=False):
            grad_h, grad_codes = _softmax_logits_backward(h, codes, grad.to(h.dtype), ctx.chunk_size,
                                                          need_h, need_codes)
        return grad_h, grad_codes, None


def softmax_logits_gradient(h: Tensor, codes: Tensor, chunk_size: int) -> Tensor:
    """Zeros (N, c) carrying the logits-path gradient of softmax(h E^T) E to h and to every code."""
    return _SoftmaxLogitsGradient.apply(h, codes, chunk_size)
