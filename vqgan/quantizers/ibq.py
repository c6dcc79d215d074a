"""kind="ibq": Index Backpropagation Quantization (Shi et al. 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", arXiv:2412.02692), as TencentARC/SEED-Voken's
`IndexPropagationQuantize`.

The index is the argmax of the logits z.e over the K codes. The output's value is the selected code;
its gradient is that of onehot_st E with onehot_st = hard + softmax(z E^T) - sg[softmax(z E^T)]: the
selected code gets the task gradient as in VQ, and through the softmax's logits every code and z get
gradient too, so the whole codebook keeps being trained. The loss is SEED-Voken's:
    mse(z_q, z) + mse(z, sg[e]) + beta * mse(e, sg[z])
(z_q: the output, so the first term also reaches every code through the softmax). Codes start as
N(0, 1), as there (nn.Embedding's init): the softmax gradient scales with the codes' spread, so taming's
tiny uniform init would leave the encoder without gradient.

The softmax part of the gradient is one autograd function whose forward value is exactly zero and
whose backward recomputes the (rows, K) softmax chunk by chunk: 4 matmuls of the search's size in
backward, and no (N, K) matrix in either pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from vqgan.quantize_utils import chunk_rows, entropy_penalty, nearest_code
from vqgan.quantizers.config import QuantizerConfig
from vqgan.quantizers.vq import VectorQuantizer


# Shifted logits below this count as probability exactly 0 (e^-30 ~ 1e-13 of the row's largest; at most
# K e^-30 of the row's mass is dropped). On CPU, the tiny exps of a peaked softmax would otherwise go down
# exp's slow underflow path and make every later product a slow denormal (measured 3x slower at K=16384).
_SOFTMAX_FLOOR = -30.0


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


class IndexBackpropQuantizer(VectorQuantizer):
    """Inner-product argmax with a softmax straight-through that reaches every code."""

    uses_kmeans = False

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        with torch.no_grad():
            self.weight.normal_()  # SEED-Voken's init (see the module docstring)

    def search(self, h: Tensor) -> Tensor:
        return nearest_code(h, self.codebook.detach(), self.config.chunk_size, inner_product=True)

    def export_search(self, h: Tensor) -> Tensor:
        return (h @ self.codebook.float().t()).argmax(dim=1)

    def _search_codes(self, h: Tensor, codes: Tensor) -> Tensor:
        return nearest_code(h, codes, self.config.chunk_size, inner_product=True)

    def _estimator(
        self, h: Tensor, h_q: Tensor, codes: Tensor, indices: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = h_q  # value exactly the selected codes; the task gradient reaches them as in VQ
        if torch.is_grad_enabled() and (h.requires_grad or codes.requires_grad):
            out = h_q + softmax_logits_gradient(h, codes, self.config.chunk_size)
        codebook_loss = F.mse_loss(h_q, h.detach())
        commitment_loss = F.mse_loss(h, h_q.detach())
        loss = F.mse_loss(out, h) + commitment_loss + self.config.beta * codebook_loss
        return out, codebook_loss, commitment_loss, loss

    def _entropy(self, h: Tensor, codes: Tensor) -> Tensor:
        return entropy_penalty(h, codes, self.config.entropy_temperature, self.config.chunk_size, inner_product=True)

    def _restart_vectors(self, rows: Tensor, dead: Tensor) -> Tensor:
        """Restarted codes: the candidate rows' directions at the live codes' mean norm.

        Under an argmax of z.e a code's norm decides how many rows it wins. A row copied as it is (and
        the error-weighted draw favours long rows) would take the rows of every code near it, and a short
        one would win none: restarts that kept the rows' norms collapsed the tiny tokenizer (0.4 % of codes
        used, in a side run), these reach 98.4 % (benchmarks/results/quantizer_fidelity.md).
        """
        live = (~dead).float()  # (K,)
        live_count = live.sum()
        live_norm = (self.codebook.detach().norm(dim=1) * live).sum() / live_count.clamp_min(1.0)
        norm = torch.where(live_count > 0, live_norm, rows.norm(dim=1).mean())  # no live code: the rows' own
        return F.normalize(rows, dim=1) * norm
