"""kind="vq": the nearest-code quantizer (VQ-VAE, van den Oord et al. 2017, arXiv:1711.00937).

z -> nearest of K code vectors (exact, chunked fp32 search) -> straight-through output. The options
are the known remedies for codebook collapse and the STE's gradient gap, each cited beside its
config field. SimVQ and IBQ build on this class (they change the codebook or the estimator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.quantize_utils import (
    all_gather_rows,
    all_reduce_sum,
    broadcast_from_rank0,
    entropy_penalty,
    histogram,
    is_rank0,
    kmeans,
    nearest_code,
    perplexity,
    rotation_trick,
)
from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import QuantizerConfig


class VectorQuantizer(Quantizer):
    """Nearest-code quantizer with straight-through gradients; see QuantizerConfig for the options."""

    # the codebook is written in place (k-means, restarts); SimVQ's is a frozen buffer
    writable_codebook = True
    uses_kmeans = True  # IBQ's inner-product search does not fit Euclidean k-means centres

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        num_codes, width = config.num_codes, config.lookup_dim
        self.kmeans_init = config.kmeans_init and self.writable_codebook and self.uses_kmeans
        self.restart_threshold = config.dead_code_threshold if self.writable_codebook else 0
        # taming's init: small codes near the origin, so early assignments spread by direction.
        weight = torch.empty(num_codes, width).uniform_(-1.0 / num_codes, 1.0 / num_codes)  # (K, c)
        if config.use_ema:
            self.register_buffer("weight", weight)
            # Each code starts as if it had absorbed one vector at its own position: no bias toward 0.
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_avg", weight.clone())
        else:
            self.weight = nn.Parameter(weight)
        if config.affine_reparam:
            self.affine_scale = nn.Parameter(torch.zeros(width))  # codes = (1 + scale) * weight + shift
            self.affine_shift = nn.Parameter(torch.zeros(width))
        if self.restart_threshold > 0:
            # Restart candidates drawn from the previous training batch (after its lookup), written into
            # dead codes before this batch's lookup; a buffer so that a resume restarts identically.
            self.register_buffer("restart_rows", torch.zeros(num_codes, width))
        self.register_buffer("initialized", torch.tensor(False))  # k-means / rank sync done
        # The buffer above is what checkpoints keep; this mirror is what forward reads, so a training
        # step never waits on the device to learn whether initialisation is due (no host sync).
        self._initialized = False
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_flags())

    def refresh_flags(self) -> None:
        """Re-read the Python mirror of `initialized` from the buffer (after a load or a restore)."""
        self._initialized = bool(self.initialized)

    def param_lr_scales(self) -> dict[str, float]:
        if not self.config.affine_reparam:
            return {}
        return {"affine_scale": self.config.affine_lr, "affine_shift": self.config.affine_lr}

    @property
    def codebook(self) -> Tensor:
        """(K, code_dim) effective code vectors used for lookup (after affine and normalisation)."""
        codes = self.weight
        if self.config.affine_reparam:
            codes = (1.0 + self.affine_scale) * codes + self.affine_shift
        if self.config.l2_normalize:
            codes = F.normalize(codes, dim=1)
        return codes

    def codes_for(self, indices: Tensor) -> Tensor:
        codes = self.codebook
        # fp32 at least (bf16 / fp16 weights); a float64 model keeps float64, as its forward does, so that
        # decoding indices matches the forward exactly (the converter tests compare in float64)
        return F.embedding(indices, codes.to(torch.promote_types(codes.dtype, torch.float32)))

    def prepare_rows(self, h: Tensor) -> Tensor:
        return F.normalize(h, dim=1) if self.config.l2_normalize else h

    def search(self, h: Tensor) -> Tensor:
        return nearest_code(h, self.codebook.detach(), self.config.chunk_size)

    def export_search(self, h: Tensor) -> Tensor:
        codes = self.codebook.float()  # (K, c)
        # ||z||^2 is the same for every code of a row, so it cannot move the argmin (as nearest_code).
        return (codes.square().sum(dim=1) - 2.0 * (h @ codes.t())).argmin(dim=1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, D, H, W) or (N, D) -> QuantizerOutput; updates statistics only in training mode."""
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.to_lookup_space(flat)  # (N, c) fp32
        zero = flat.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.prepare_rows(h)
            if self.training:
                finite = torch.isfinite(h.detach()).all(dim=1)  # (N,)
                h_stats = torch.where(finite.unsqueeze(1), h.detach(), 0.0)  # (N, c), non-finite rows zeroed
                self._prepare_codebook(h_stats)
            codes = self.codebook  # (K, c)
            if self.training and cfg.use_ema:
                codes = codes.clone()  # NOTE: the EMA update below writes the buffer in place
            indices = self._search_codes(h.detach(), codes.detach())  # (N,)
            h_q = F.embedding(indices, codes)  # (N, c)
            out, codebook_loss, commitment_loss, loss = self._estimator(h, h_q, codes, indices)
            entropy_loss = zero
            if cfg.entropy_weight > 0:
                entropy_loss = self._entropy(h, codes)
                loss = loss + self._entropy_weight() * entropy_loss
            batch_perplexity = perplexity(histogram(indices, cfg.num_codes))
            if self.training:
                counts = self._count(indices, finite)
                self._update_codebook(h_stats, indices, counts)
                if self.restart_threshold > 0:
                    self._draw_restart_rows(h_stats, h_q.detach(), finite)
            usage = self.window_usage()
        return self._output(z, out, indices, loss=loss, codebook_loss=codebook_loss,
                            commitment_loss=commitment_loss, entropy_loss=entropy_loss,
                            perplexity=batch_perplexity, usage=usage)

    def _search_codes(self, h: Tensor, codes: Tensor) -> Tensor:
        return nearest_code(h, codes, self.config.chunk_size)

    # -- gradient estimators ------------------------------------------------------------------

    def _estimator(
        self, h: Tensor, h_q: Tensor, codes: Tensor, indices: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(output rows with value h_q, codebook loss, commitment loss, their weighted sum)."""
        # An EMA codebook is a buffer that the EMA moves: no codebook term.
        codebook_loss = h.new_zeros(()) if self.config.use_ema else F.mse_loss(h_q, h.detach())
        commitment_loss = F.mse_loss(h, h_q.detach())
        return (self._straight_through(h, h_q), codebook_loss, commitment_loss,
                codebook_loss + self.config.beta * commitment_loss)

    def _entropy(self, h: Tensor, codes: Tensor) -> Tensor:
        return entropy_penalty(h, codes, self.config.entropy_temperature, self.config.chunk_size)

    def _straight_through(self, h: Tensor, h_q: Tensor) -> Tensor:
        """Forward value h_q; gradient to h by STE (identity) or the rotation trick."""
        if self.config.rotation_trick:
            out = rotation_trick(h, h_q)
        else:
            # Same gradient as h + (h_q - h).detach() (VQ-VAE), but the value is h_q exactly, so
            # indices_to_codes(indices) reproduces `quantized` bit for bit.
            out = h_q.detach() + (h - h.detach())
        if self.config.sync_nu > 0:
            # Huh et al. 2023, synchronized update: the selected codes also get nu times the task gradient.
            out = out + self.config.sync_nu * (h_q - h_q.detach())
        return out

    # -- codebook state (training mode only) ----------------------------------------------------

    @torch.no_grad()
    def _prepare_codebook(self, h: Tensor) -> None:
        """First training call: k-means init or rank-0 sync. Later calls: restart dead codes."""
        if not self._initialized:
            if self.kmeans_init:
                self._kmeans_init(h)
            else:
                self._broadcast_codebook()
            self.initialized.fill_(True)
            self._initialized = True
        elif self.restart_threshold > 0:
            self._restart_dead_codes()

    def _kmeans_init(self, h: Tensor) -> None:
        """Set every code to k-means centres of this batch (all ranks' rows, solved on rank 0)."""
        cfg = self.config
        data = all_gather_rows(h)  # (N_total, c)
        if is_rank0():
            centres = kmeans(data, cfg.num_codes, cfg.kmeans_iters, cfg.chunk_size, cfg.l2_normalize)
        else:
            centres = data.new_empty(cfg.num_codes, cfg.lookup_dim)
        broadcast_from_rank0(centres)
        self._write_codes(torch.arange(cfg.num_codes, device=h.device), centres)
        self._broadcast_codebook()  # affine parameters and any other codebook state

    def _draw_restart_rows(self, h: Tensor, h_q: Tensor, finite: Tensor) -> None:
        """Pick K candidate rows of this batch for the next step's restarts (rank 0's rows, broadcast).

        Fixed shapes, no host sync: K candidates in draw order, distinct rows while N >= K (the batch's
        rows in turn otherwise). "error": each draw with probability ~ the row's squared quantization
        error (k-means++'s D^2 rule); "random": uniformly.
        """
        num_codes, n = self.config.num_codes, h.shape[0]
        if is_rank0():
            if self.config.restart_from == "error":
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
        self.restart_rows.copy_(vectors)

    def _restart_dead_codes(self) -> None:
        """Reseed codes unused for dead_code_threshold forwards from the previous batch's candidates.

        The i-th dead code (in code order) takes the i-th candidate in draw order, so the rows drawn
        first (the largest errors, under "error") are used first; fixed shapes, no host sync.
        """
        num_codes = self.config.num_codes
        dead = (self.step - self.last_used_step) >= self.restart_threshold  # (K,), same on all ranks
        rank = (torch.cumsum(dead.long(), 0) - 1).clamp(min=0)  # (K,) position among the dead codes
        rows = self._restart_vectors(self.restart_rows[rank], dead)  # (K, c)
        self._write_codes(torch.arange(num_codes, device=rows.device), rows, mask=dead)

    def _restart_vectors(self, rows: Tensor, dead: Tensor) -> Tensor:
        """(K, c) candidate rows, (K,) dead mask -> the codes a restart writes (unit length with l2_normalize)."""
        return F.normalize(rows, dim=1) if self.config.l2_normalize else rows

    def _write_codes(self, rows: Tensor, vectors: Tensor, mask: Tensor | None = None) -> None:
        """Make the effective codes at `rows` equal `vectors` (inverting the affine map) and reset their age.

        `mask` (m,) bool: only rows whose mask is set change (a fixed-shape masked write). A restart
        resets the age (last_used_step) but not last_seen: usage counts real assignments only.
        """
        raw = vectors
        if self.config.affine_reparam:
            raw = (vectors - self.affine_shift) / (1.0 + self.affine_scale)

        def write(target: Tensor, new: Tensor) -> None:
            new = new.to(target.dtype)
            if mask is not None:
                old = target[rows]
                new = torch.where(mask.view(-1, *[1] * (old.dim() - 1)), new, old)
            target[rows] = new

        write(self.weight, raw)
        if self.config.use_ema:
            write(self.cluster_size, torch.ones_like(self.cluster_size[rows]))
            write(self.embed_avg, raw)
        write(self.last_used_step, self.step.expand(rows.shape[0]))

    def _broadcast_codebook(self) -> None:
        """Give every rank rank 0's codebook tensors, whatever seed each rank was built with."""
        for name in ("weight", "cluster_size", "embed_avg", "affine_scale", "affine_shift"):
            tensor = getattr(self, name, None)
            if tensor is not None:
                broadcast_from_rank0(tensor.data)

    @torch.no_grad()
    def _update_codebook(self, h: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA codebook from this batch's assignments (counts already summed over ranks)."""
        cfg = self.config
        if not cfg.use_ema:
            return
        sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, h)  # (K, c)
        all_reduce_sum(sums)
        decay = cfg.ema_decay
        self.cluster_size.mul_(decay).add_(counts.float(), alpha=1.0 - decay)
        self.embed_avg.mul_(decay).add_(sums, alpha=1.0 - decay)
        # Laplace smoothing keeps a code with ~0 mass from dividing by ~0 (VQ-VAE-2 / sonnet).
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.ema_epsilon) / (total + cfg.num_codes * cfg.ema_epsilon) * total
        self.weight.copy_(self.embed_avg / smoothed.unsqueeze(1))
