"""kind="msvq": multi-scale residual quantization, VAR's tokenizer (Tian et al. 2024, arXiv:2404.02905, sec. 3.2).

One shared codebook (K, D) quantizes the latent f (B, D, H, W) coarse to fine. For each scale s_k (the last
equals H = W):

    r_k = area(f - f̂_{k-1}, s_k)                  (B, D, s_k, s_k), the residual averaged down
    q_k = nearest code of each position of r_k    (B, s_k²) ids, our exact chunked search
    h_k = phi_k(bicubic(e[q_k], H))               (B, D, H, W), no resampling at the last scale
    f̂_k = f̂_{k-1} + h_k

and f̂_K feeds the decoder with a straight-through gradient. The tokens are one flat sequence of Σ s_k² ids per
image (680 for VAR's ten scales), scale after scale, each grid row-major (`split_scales` / `join_scales`).
Every line follows VAR's models/quant.py (VectorQuantizer2): the loss is its mean_vq_loss, the mean over
scales of ||sg[f] - f̂_k||² + beta ||f - sg[f̂_k]||², and the phi convs are shared between scales as its
Phi / PhiShared / PhiPartiallyShared / PhiNonShared pick them.

The codebook state (k-means init, dead-code restarts, rank sync) is the vq kind's; k-means runs once on the
first batch's ideal residuals: the rows r_k the scales would see if every code were exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgan.quantize_utils import histogram, nearest_code, perplexity
from vqgan.quantizers.base import QuantizerOutput
from vqgan.quantizers.config import QuantizerConfig
from vqgan.quantizers.vq import VectorQuantizer


def phi_assignment(num_scales: int, sharing: str, phi_count: int) -> tuple[int, ...]:
    """Index of the phi conv each scale uses, exactly as VAR's PhiShared / PhiPartiallyShared / PhiNonShared.

    Scale k sits at k / (K - 1) in [0, 1]; conv j at tick j of linspace(1/3n, 1 - 1/3n, n) for n = 4 (else
    1/2n ... 1 - 1/2n); the nearest tick wins. NOTE: numpy as VAR, since for ten scales and four convs scales 2
    and 7 sit exactly halfway between two ticks and float rounding decides (VAR gives convs 0, 0, 1, 1, 1, 2, 2,
    3, 3, 3 there).
    """
    if sharing == "shared":
        return (0,) * num_scales
    count = phi_count if sharing == "partial" else num_scales
    if num_scales == 1:  # VAR divides by K - 1: one scale takes the first conv
        return (0,)
    ticks = np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count) if count == 4 else \
        np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)
    return tuple(int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales))


def area_pool_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) weights of F.interpolate(mode="area") (adaptive average pooling) along one axis."""
    m = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class MultiScaleResidualQuantizer(VectorQuantizer):
    """VAR's multi-scale residual quantizer; indices are (B, Σ s²) ids, scale after scale."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        self.scales = tuple(config.scales)
        count = {"shared": 1, "partial": config.phi_count, "per_scale": len(self.scales)}[config.phi_sharing]
        count = count if config.phi_ratio > 0 else 0  # VAR: nn.Identity for |quant_resi| <= 1e-6
        dim = config.dim
        self.phi = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(count))
        self.phi_of_scale = phi_assignment(len(self.scales), config.phi_sharing, config.phi_count)

    # -- token layout ------------------------------------------------------------------------------

    @property
    def tokens_per_image(self) -> int:
        """Σ s_k²: the length of one image's id sequence."""
        return sum(s * s for s in self.scales)

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Where each scale's ids start in the flat sequence (then tokens_per_image)."""
        offsets = [0]
        for s in self.scales:
            offsets.append(offsets[-1] + s * s)
        return tuple(offsets)

    def split_scales(self, indices: Tensor) -> list[Tensor]:
        """(B, Σ s²) -> one (B, s_k, s_k) grid per scale, coarse to fine."""
        self._check_sequence(indices)
        offsets = self.scale_offsets
        return [indices[:, offsets[k]:offsets[k + 1]].reshape(-1, s, s) for k, s in enumerate(self.scales)]

    def join_scales(self, grids: Sequence[Tensor]) -> Tensor:
        """One (B, s_k, s_k) or (B, s_k²) tensor per scale -> (B, Σ s²)."""
        if len(grids) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} grids (scales {list(self.scales)}), got {len(grids)}")
        return torch.cat([g.reshape(g.shape[0], -1) for g in grids], dim=1)

    # -- the scale step, shared by forward, lookup, indices_to_codes and the prior's inputs -------------

    def phi_apply(self, h: Tensor, k: int) -> Tensor:
        """(B, D, H, W) -> phi_k(h) = (1 - ratio) h + ratio conv(h) (VAR's Phi), or h without convs."""
        if not len(self.phi):
            return h
        conv = self.phi[self.phi_of_scale[k]]
        ratio = self.config.phi_ratio
        weight, bias = conv.weight.to(h.dtype), conv.bias.to(h.dtype)
        return h.mul(1 - ratio) + F.conv2d(h, weight, bias, padding=1).mul(ratio)

    def scale_contribution(self, codes_grid: Tensor, k: int, side: int) -> Tensor:
        """(B, D, s_k, s_k) codes of scale k -> h_k (B, D, side, side): bicubic up (not at the last scale), phi."""
        if k != len(self.scales) - 1:
            codes_grid = F.interpolate(codes_grid, size=(side, side), mode="bicubic")
        return self.phi_apply(codes_grid.contiguous(), k)

    def _embed(self, ids: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        """(B, s_k²) or (B, s_k, s_k) ids -> (B, D, s_k, s_k) codes."""
        s = self.scales[k]
        codes = self.codes_for(ids.reshape(-1).long()).to(dtype)  # (B s s, D)
        return rearrange(codes, "(b h w) d -> b d h w", h=s, w=s)

    def add_scale(self, f_hat: Tensor | None, ids: Tensor, k: int) -> Tensor:
        """f̂_{k-1} (B, D, H, W) or None (before scale 0) + the contribution of scale k's ids -> f̂_k."""
        side = self.scales[-1]
        with torch.autocast(device_type=ids.device.type, enabled=False):
            dtype = self._work_dtype(f_hat)
            h = self.scale_contribution(self._embed(ids, k, dtype), k, side)  # (B, D, H, W)
            return h if f_hat is None else f_hat + h

    def downsample_to_scale(self, f_hat: Tensor, k: int) -> Tensor:
        """f̂ (B, D, H, W) -> (B, s_k², D): area-averaged to scale k, the next-scale prior's input there."""
        s = self.scales[k]
        return rearrange(F.interpolate(f_hat, size=(s, s), mode="area"), "b d h w -> b (h w) d")

    def next_scale_input(self, ids_per_scale: Sequence[Tensor], k: int) -> Tensor:
        """Ids of scales < k (each (B, s_j²) or (B, s_j, s_j)) -> (B, s_k², D): f̂_{k-1} averaged down to s_k.

        The input VAR's transformer reads at step k (its idxBl_to_var_input / get_next_autoregressive_input);
        zeros at k = 0, where VAR reads its class token instead.
        """
        if not 0 <= k < len(self.scales):
            raise ValueError(f"scale index k must be in [0, {len(self.scales)}), got {k}")
        if len(ids_per_scale) < k:
            raise ValueError(f"next_scale_input(k={k}) needs the ids of scales 0..{k - 1}, got {len(ids_per_scale)}")
        if k == 0:
            batch = ids_per_scale[0].shape[0] if ids_per_scale else 1
            return self.weight.new_zeros(batch, 1, self.config.dim, dtype=self._work_dtype(None))
        f_hat = None
        for j in range(k):
            f_hat = self.add_scale(f_hat, ids_per_scale[j], j)
        return self.downsample_to_scale(f_hat, k)

    def teacher_forcing_input(self, indices: Tensor) -> Tensor:
        """(B, Σ s²) ids -> (B, Σ s² - s_0², D): next_scale_input for k = 1..K-1, concatenated (VAR's
        idxBl_to_var_input), in one pass."""
        grids = self.split_scales(indices)
        f_hat, inputs = None, []
        for k in range(len(self.scales) - 1):
            f_hat = self.add_scale(f_hat, grids[k], k)
            inputs.append(self.downsample_to_scale(f_hat, k + 1))
        if not inputs:
            return self.weight.new_zeros(indices.shape[0], 0, self.config.dim, dtype=self._work_dtype(None))
        return torch.cat(inputs, dim=1)

    # -- quantizer API -----------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, D, H, W) -> QuantizerOutput with indices (B, Σ s²); statistics change only in training mode."""
        cfg = self.config
        self._check_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            f = z.to(self._work_dtype(z))  # (B, D, H, W), fp32 at least (VAR: fp32, autocast off)
            f_detached = f.detach()
            if self.training:
                kmeans_rows = None
                if not self._initialized and self.kmeans_init:
                    rows = self._ideal_residual_rows(f_detached)
                    kmeans_rows = torch.where(torch.isfinite(rows).all(1, keepdim=True), rows, 0.0).float()
                self._prepare_codebook(kmeans_rows)
            codes = self.codebook  # (K, D)
            f_hat, rows, scale_ids = self._quantize(f_detached, codes)
            codebook_loss = f.new_zeros(())
            commitment_loss = f.new_zeros(())
            for f_hat_k in f_hat:  # VAR's mean_vq_loss, the mean over scales of its two terms
                codebook_loss = codebook_loss + F.mse_loss(f_hat_k, f_detached)
                commitment_loss = commitment_loss + F.mse_loss(f, f_hat_k.detach())
            codebook_loss, commitment_loss = codebook_loss / len(f_hat), commitment_loss / len(f_hat)
            loss = codebook_loss + cfg.beta * commitment_loss
            # value f̂ exactly (indices_to_codes rebuilds it bit for bit), gradient the identity to f
            quantized = f_hat[-1].detach() + (f - f.detach())
            flat_ids = torch.cat([ids.reshape(-1) for ids in scale_ids])  # scale-major, as `rows`
            batch_perplexity = perplexity(histogram(flat_ids, cfg.num_codes))
            if self.training:
                finite = torch.isfinite(rows).all(dim=1)  # (N,)
                rows_stats = torch.where(finite.unsqueeze(1), rows, 0.0).float()
                self._count(flat_ids, finite)
                if self.restart_threshold > 0:
                    self._draw_restart_rows(rows_stats, codes.detach()[flat_ids].float(), finite)
            usage = self.window_usage()
        indices = torch.cat([ids.reshape(z.shape[0], -1) for ids in scale_ids], dim=1)  # (B, Σ s²)
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss.float(),
                               codebook_loss=codebook_loss.float(), commitment_loss=commitment_loss.float(),
                               entropy_loss=loss.new_zeros((), dtype=torch.float32), perplexity=batch_perplexity,
                               usage=usage)

    @torch.no_grad()
    def lookup(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) -> (B, Σ s²) ids, the ones forward gives, without any state change."""
        self._check_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, _, scale_ids = self._quantize(z.to(self._work_dtype(z)), self.codebook)
        return torch.cat([ids.reshape(z.shape[0], -1) for ids in scale_ids], dim=1)

    @torch.no_grad()
    def partial_reconstructions(self, z: Tensor) -> list[Tensor]:
        """z (B, D, H, W) -> f̂_k (B, D, H, W) after each scale, coarse to fine (VAR's f_to_idxBl_or_fhat(to_fhat=True));
        decoded, they show what each scale adds. No state change."""
        self._check_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            partial_sums, _, _ = self._quantize(z.to(self._work_dtype(z)), self.codebook)
        return partial_sums

    def lookup_rows(self, z: Tensor) -> Tensor:
        raise NotImplementedError("msvq looks up residuals scale by scale; use lookup(z) or forward(z)")

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, Σ s²) ids -> f̂ (B, D, s_K, s_K), the quantized latent forward returned for them (bit for bit)."""
        self._check_sequence(indices)
        f_hat = None
        for k, grid in enumerate(self.split_scales(indices)):
            f_hat = self.add_scale(f_hat, grid, k)
        return f_hat

    # -- ONNX (vqgan/onnx_export.py): the same steps in operators the tracer takes --------------------

    def export_lookup(self, z: Tensor) -> Tensor:
        """z (B, D, s_K, s_K) -> (B, Σ s²) ids, as lookup: area pooling as a matrix product (ONNX has no adaptive
        pooling to sizes that do not divide the input), the kind's out=-free search."""
        side, last = self.scales[-1], len(self.scales) - 1
        codes = self.codebook.float()
        f_rest, ids_all = z.float(), []
        for k, s in enumerate(self.scales):
            if k == last:
                down = f_rest
            else:
                pool = area_pool_matrix(side, s).to(f_rest.device)  # (s, side)
                down = torch.einsum("ij,bdjk,lk->bdil", pool, f_rest, pool)  # (B, D, s, s)
            ids = self.export_search(rearrange(down, "b d h w -> (b h w) d"))  # (B s s,)
            codes_grid = rearrange(F.embedding(ids, codes), "(b h w) d -> b d h w", h=s, w=s)
            f_rest = f_rest - self.scale_contribution(codes_grid, k, side)
            ids_all.append(ids.reshape(z.shape[0], s * s))
        return torch.cat(ids_all, dim=1)

    def export_codes(self, indices: Tensor) -> Tensor:
        """(B, Σ s²) ids -> f̂ (B, D, s_K, s_K), as indices_to_codes without the value checks (traceable)."""
        offsets, side, f_hat = self.scale_offsets, self.scales[-1], None
        codes = self.codebook.float()
        for k, s in enumerate(self.scales):
            ids = indices[:, offsets[k]:offsets[k + 1]].reshape(-1)
            codes_grid = rearrange(F.embedding(ids, codes), "(b h w) d -> b d h w", h=s, w=s)
            h = self.scale_contribution(codes_grid, k, side)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    # -- internals ---------------------------------------------------------------------------------

    def _quantize(self, f: Tensor, codes: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """f (B, D, H, W) detached -> (f̂_k for every scale, residual rows (N, D) scale-major, ids per scale).

        f̂_k carries the gradient to the codebook and the phi convs; the residual only decides the ids.
        """
        side, last = self.scales[-1], len(self.scales) - 1
        f_rest = f
        f_hat: Tensor | None = None
        partial_sums, all_rows, scale_ids = [], [], []
        for k, s in enumerate(self.scales):
            down = f_rest if k == last else F.interpolate(f_rest, size=(s, s), mode="area")  # (B, D, s, s)
            rows = rearrange(down, "b d h w -> (b h w) d")  # (B s s, D)
            ids = nearest_code(rows, codes.detach(), self.config.chunk_size)  # (B s s,)
            codes_grid = rearrange(F.embedding(ids, codes.to(f.dtype)), "(b h w) d -> b d h w", h=s, w=s)
            h = self.scale_contribution(codes_grid, k, side)  # (B, D, H, W)
            f_hat = h if f_hat is None else f_hat + h
            f_rest = f_rest - h.detach()
            partial_sums.append(f_hat)
            all_rows.append(rows)
            scale_ids.append(ids)
        return partial_sums, torch.cat(all_rows), scale_ids

    @torch.no_grad()
    def _ideal_residual_rows(self, f: Tensor) -> Tensor:
        """The rows r_k each scale would quantize if its codes were exact (k-means data for the first batch)."""
        side, last = self.scales[-1], len(self.scales) - 1
        f_rest, rows = f, []
        for k, s in enumerate(self.scales):
            down = f_rest if k == last else F.interpolate(f_rest, size=(s, s), mode="area")
            rows.append(rearrange(down, "b d h w -> (b h w) d"))
            f_rest = f_rest - self.scale_contribution(down, k, side)
        return torch.cat(rows)

    def _work_dtype(self, like: Tensor | None) -> torch.dtype:
        """fp32 at least (bf16 codes flip ids); float64 stays float64, as the converter tests compare."""
        dtype = like.dtype if like is not None else self.weight.dtype
        return torch.promote_types(torch.promote_types(dtype, self.weight.dtype), torch.float32)

    def _check_latent(self, z: Tensor) -> None:
        dim, side = self.config.dim, self.scales[-1]
        if z.dim() != 4 or z.shape[1] != dim:
            raise ValueError(f"msvq quantizes latents of shape (B, {dim}, {side}, {side}), got {tuple(z.shape)}")
        if z.shape[2] != side or z.shape[3] != side:
            raise ValueError(f"msvq: the latent is {z.shape[2]}x{z.shape[3]}, but the last scale is {side}x{side} "
                             f"(scales {list(self.scales)}); feed images of {side} x the downsampling factor, or "
                             f"end scales at the latent's side")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating point tensor, got dtype {z.dtype}")
        if not self.training and not torch.isfinite(z).all():
            raise ValueError(f"z must be finite, got {int((~torch.isfinite(z)).sum())} NaN/inf values")

    def _check_sequence(self, indices: Tensor) -> None:
        length = self.tokens_per_image
        if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[1] != length:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"msvq indices must have shape (B, {length}) (Σ s² over scales {list(self.scales)}), "
                             f"got {shape}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.config.num_codes:
                raise ValueError(f"indices must lie in [0, {self.config.num_codes}), got values in [{low}, {high}]")
