"""Vector quantization: the layer that turns encoder outputs into codebook indices and back.

z (B, D, H, W) -> nearest of K code vectors (exact, chunked fp32 search) -> straight-through output.
The options are the known remedies for codebook collapse and the STE's gradient gap, each off by
default and each cited beside its config field. Every call returns the same `QuantizerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
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


@dataclass(frozen=True)
class QuantizerConfig:
    num_codes: int = 1024  # K
    dim: int = 256  # D, channels of the input z
    # Low-dim lookup space: project D -> code_dim, look up, project back (ViT-VQGAN arXiv:2110.04627,
    # LlamaGen arXiv:2406.06525 uses 8). None or == dim: look up in D itself, no projections.
    code_dim: int | None = None
    # Weight of the COMMITMENT term ||z - sg[e]||^2 (VQ-VAE arXiv:1711.00937, eq. 3). taming and
    # diffusers put it on the codebook term instead; we follow the paper.
    beta: float = 0.25
    l2_normalize: bool = False  # cosine codes: normalise z and codes before lookup (ViT-VQGAN)
    # Codebook as an EMA of assigned encoder outputs, Laplace-smoothed counts (VQ-VAE appendix A.1,
    # VQ-VAE-2 arXiv:1906.00446). The codebook is then a buffer and its loss term is 0.
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    # k-means on the first training batch (SoundStream arXiv:2107.03312), once; flag kept in a buffer.
    kmeans_init: bool = False
    kmeans_iters: int = 10
    # Reseed a code unused for this many training forwards from random current encoder outputs
    # (Jukebox arXiv:2005.00341, "random restarts"); 0 = off.
    dead_code_threshold: int = 0
    # Weight of mean per-sample entropy minus batch entropy of softmax(-dist / temperature)
    # (MAGVIT-v2 arXiv:2310.05737); computed on at most chunk_size rows.
    entropy_weight: float = 0.0
    entropy_temperature: float = 1.0
    # Huh et al. 2023, "Straightening Out the Straight-Through Estimator" (arXiv:2305.08842): codes are
    # (1 + s) * e + b with s, b learned and shared by all codes; sync_nu adds nu * (task gradient) to
    # the selected codes ("synchronized update", as vqtorch's `straight_through_approximation`).
    affine_reparam: bool = False
    sync_nu: float = 0.0
    rotation_trick: bool = False  # Fifty et al. 2024 (arXiv:2410.06424), instead of the plain STE
    usage_window: int = 65536  # codebook usage is measured over about this many recent indices
    chunk_size: int = 4096  # rows of the distance matrix computed at once

    def __post_init__(self) -> None:
        checks = [
            (self.num_codes > 0, f"num_codes must be > 0, got {self.num_codes}"),
            (self.dim > 0, f"dim must be > 0, got {self.dim}"),
            (
                self.code_dim is None or 0 < self.code_dim <= self.dim,
                f"code_dim must be None or in [1, dim={self.dim}], got {self.code_dim}",
            ),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (self.ema_epsilon > 0, f"ema_epsilon must be > 0, got {self.ema_epsilon}"),
            (self.kmeans_iters >= 0, f"kmeans_iters must be >= 0, got {self.kmeans_iters}"),
            (self.dead_code_threshold >= 0, f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}"),
            (self.entropy_weight >= 0, f"entropy_weight must be >= 0, got {self.entropy_weight}"),
            (self.entropy_temperature > 0, f"entropy_temperature must be > 0, got {self.entropy_temperature}"),
            (self.sync_nu >= 0, f"sync_nu must be >= 0, got {self.sync_nu}"),
            (self.usage_window > 0, f"usage_window must be > 0, got {self.usage_window}"),
            (self.chunk_size > 0, f"chunk_size must be > 0, got {self.chunk_size}"),
            # An EMA codebook is a buffer: no gradient reaches it, so these two would silently do nothing.
            (not (self.use_ema and self.affine_reparam), "affine_reparam needs a learned codebook, not use_ema"),
            (not (self.use_ema and self.sync_nu > 0), "sync_nu > 0 needs a learned codebook, not use_ema"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"QuantizerConfig: {message}")

    @property
    def lookup_dim(self) -> int:
        """Width of the space where codes live: code_dim, or dim when there is no projection."""
        return self.dim if self.code_dim is None else self.code_dim


@dataclass
class QuantizerOutput:
    quantized: Tensor  # same shape as the input, straight-through (or rotation-trick) gradient
    indices: Tensor  # (B, H, W) for (B, D, H, W) input; (N,) for (N, D) input
    loss: Tensor  # codebook + beta * commitment + entropy_weight * entropy
    codebook_loss: Tensor  # ||sg[z] - e||^2, mean over elements; 0 with use_ema
    commitment_loss: Tensor  # ||z - sg[e]||^2, mean over elements, before beta
    entropy_loss: Tensor  # entropy penalty before entropy_weight; 0 when entropy_weight == 0
    perplexity: Tensor  # exp(entropy of this batch's code histogram), this rank's batch
    usage: Tensor  # fraction of the K codes used over the last ~usage_window indices


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with straight-through gradients; see QuantizerConfig for the options."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        num_codes, width = config.num_codes, config.lookup_dim
        projected = width != config.dim
        self.project_in = nn.Linear(config.dim, width) if projected else None
        self.project_out = nn.Linear(width, config.dim) if projected else None
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
        self.register_buffer("initialized", torch.tensor(False))  # k-means / rank sync done
        # The buffer above is what checkpoints keep; this mirror is what forward reads, so a training
        # step never waits on the device to learn whether initialisation is due (no host sync).
        self._initialized = False
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_flags())
        self.register_buffer("step", torch.tensor(0))  # training forwards so far
        self.register_buffer("seen", torch.tensor(0))  # indices assigned so far, summed over ranks
        self.register_buffer("last_used_step", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("last_seen", torch.zeros(num_codes, dtype=torch.long))  # `seen` when last used

    def refresh_flags(self) -> None:
        """Re-read the Python mirror of `initialized` from the buffer (after a load or a restore)."""
        self._initialized = bool(self.initialized)

    @property
    def codebook(self) -> Tensor:
        """(K, code_dim) effective code vectors used for lookup (after affine and normalisation)."""
        codes = self.weight
        if self.config.affine_reparam:
            codes = (1.0 + self.affine_scale) * codes + self.affine_shift
        if self.config.l2_normalize:
            codes = F.normalize(codes, dim=1)
        return codes

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, D, H, W) or (N, D) -> QuantizerOutput; updates statistics only in training mode."""
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.project_in(flat) if self.project_in is not None else flat  # (N, c)
        zero = flat.new_zeros((), dtype=torch.float32)
        # Distances, losses and codes stay fp32 under autocast: bf16 rounding flips nearest codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = h.float()
            if cfg.l2_normalize:
                h = F.normalize(h, dim=1)
            if self.training:
                finite = torch.isfinite(h.detach()).all(dim=1)  # (N,)
                h_stats = torch.where(finite.unsqueeze(1), h.detach(), 0.0)  # (N, c), non-finite rows zeroed
                self._prepare_codebook(h_stats)
            codes = self.codebook  # (K, c)
            if self.training and cfg.use_ema:
                codes = codes.clone()  # NOTE: the EMA update below writes the buffer in place
            indices = nearest_code(h.detach(), codes.detach(), cfg.chunk_size)  # (N,)
            h_q = F.embedding(indices, codes)  # (N, c)
            commitment_loss = F.mse_loss(h, h_q.detach())
            codebook_loss = zero if cfg.use_ema else F.mse_loss(h_q, h.detach())
            entropy_loss = zero
            if cfg.entropy_weight > 0:
                entropy_loss = entropy_penalty(h, codes, cfg.entropy_temperature, cfg.chunk_size)
            loss = codebook_loss + cfg.beta * commitment_loss + cfg.entropy_weight * entropy_loss
            out = self._straight_through(h, h_q)  # (N, c), value exactly h_q
            counts = histogram(indices, cfg.num_codes)  # (K,)
            batch_perplexity = perplexity(counts)
            if self.training:
                # Non-finite rows (an fp16 overflow) count for nothing: they go to an extra bin that is
                # dropped, so the shapes stay fixed and nothing is read back to the host.
                stat_counts = histogram(torch.where(finite, indices, cfg.num_codes), cfg.num_codes + 1)
                self._update_statistics(h_stats, indices, stat_counts[: cfg.num_codes])
            usage = self._window_usage()
        out = self.project_out(out) if self.project_out is not None else out  # (N, D)
        return QuantizerOutput(
            quantized=self._unflatten(out.to(z.dtype), z),
            indices=self._unflatten(indices, z),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            entropy_loss=entropy_loss,
            perplexity=batch_perplexity,
            usage=usage,
        )

    @torch.no_grad()
    def lookup(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) or (N, D) -> nearest-code indices (B, H, W) or (N,); never changes any state.

        The indices forward would return, without its training-mode side effects (k-means, restarts,
        EMA codebook, usage counters): tokenizing with a model left in train mode is safe.
        """
        flat = self._flatten_checked(z)  # (N, D)
        h = self.project_in(flat) if self.project_in is not None else flat  # (N, c)
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = h.float()
            if self.config.l2_normalize:
                h = F.normalize(h, dim=1)
            indices = nearest_code(h, self.codebook.detach(), self.config.chunk_size)  # (N,)
        return self._unflatten(indices, z)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, H, W) -> (B, D, H, W) or (N,) -> (N, D): the quantized tensor these indices stand for."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.dim() not in (1, 3):
            raise ValueError(f"indices must have shape (B, H, W) or (N,), got {tuple(indices.shape)}")
        num_codes = self.config.num_codes
        if indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= num_codes:
                raise ValueError(f"indices must lie in [0, {num_codes}), got values in [{low}, {high}]")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            out = F.embedding(indices.reshape(-1).long(), self.codebook.float())  # (N, c)
        out = self.project_out(out) if self.project_out is not None else out  # (N, D)
        if indices.dim() == 3:
            b, h, w = indices.shape
            return rearrange(out, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous()
        return out

    # -- input layout -------------------------------------------------------------------------

    def _flatten_checked(self, z: Tensor) -> Tensor:
        """Validate z and return it as (N, D) rows."""
        dim = self.config.dim
        if z.dim() not in (2, 4):
            raise ValueError(f"z must have shape (B, {dim}, H, W) or (N, {dim}), got {tuple(z.shape)}")
        if z.shape[1] != dim:
            raise ValueError(f"z must have {dim} channels in dim 1, got {z.shape[1]} (shape {tuple(z.shape)})")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating point tensor, got dtype {z.dtype}")
        if z.numel() == 0:
            raise ValueError(f"z must hold at least one vector, got shape {tuple(z.shape)}")
        # In training a non-finite encoder output (an fp16 overflow) must reach the loss, so that the loop
        # skips the step on every process; the statistics leave those rows out (see forward).
        if not self.training and not torch.isfinite(z).all():
            bad = int((~torch.isfinite(z)).sum())
            raise ValueError(f"z must be finite, got {bad} NaN/inf values out of {z.numel()}")
        return rearrange(z, "b d h w -> (b h w) d") if z.dim() == 4 else z

    @staticmethod
    def _unflatten(rows: Tensor, like: Tensor) -> Tensor:
        """Rows (N, ...) back to the layout of `like`: (B, ..., H, W) for 4-D input, unchanged for 2-D."""
        if like.dim() == 2:
            return rows
        b, _, h, w = like.shape
        if rows.dim() == 1:
            return rearrange(rows, "(b h w) -> b h w", b=b, h=h, w=w)
        # contiguous: a channels-last view would silently switch the decoder's convs to that layout
        return rearrange(rows, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous()

    # -- gradient estimators ------------------------------------------------------------------

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
            if self.config.kmeans_init:
                self._kmeans_init(h)
            else:
                self._broadcast_codebook()
            self.initialized.fill_(True)
            self._initialized = True
        elif self.config.dead_code_threshold > 0:
            self._restart_dead_codes(h)

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

    def _restart_dead_codes(self, h: Tensor) -> None:
        """Reseed codes unused for dead_code_threshold forwards from random rows of this batch.

        Fixed shapes, no host sync: every code gets a candidate row (distinct rows while N >= K, the
        batch's rows in turn otherwise) and only the dead ones take it. The shape is K on every rank,
        whatever each rank's batch holds, so the broadcast of rank 0's candidates always matches.
        """
        num_codes, n = self.config.num_codes, h.shape[0]
        dead = (self.step - self.last_used_step) >= self.config.dead_code_threshold  # (K,), same on all ranks
        if is_rank0():
            order = torch.randperm(n, device=h.device)  # (N,)
            vectors = h[order[torch.arange(num_codes, device=h.device) % n]]  # (K, c)
        else:
            vectors = h.new_empty(num_codes, h.shape[1])
        broadcast_from_rank0(vectors)
        self._write_codes(torch.arange(num_codes, device=h.device), vectors, mask=dead)

    def _write_codes(self, rows: Tensor, vectors: Tensor, mask: Tensor | None = None) -> None:
        """Make the effective codes at `rows` equal `vectors` (inverting the affine map) and reset their age.

        `mask` (m,) bool: only rows whose mask is set change (a fixed-shape masked write).
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
    def _update_statistics(self, h: Tensor, indices: Tensor, counts: Tensor) -> None:
        """Usage counters and EMA codebook from this batch's assignments, summed over ranks."""
        cfg = self.config
        counts = all_reduce_sum(counts.clone())  # (K,) global histogram
        used = counts > 0
        self.step += 1
        self.seen += counts.sum()
        self.last_used_step.copy_(torch.where(used, self.step, self.last_used_step))
        self.last_seen.copy_(torch.where(used, self.seen, self.last_seen))
        if cfg.use_ema:
            sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, h)  # (K, c)
            all_reduce_sum(sums)
            decay = cfg.ema_decay
            self.cluster_size.mul_(decay).add_(counts.float(), alpha=1.0 - decay)
            self.embed_avg.mul_(decay).add_(sums, alpha=1.0 - decay)
            # Laplace smoothing keeps a code with ~0 mass from dividing by ~0 (VQ-VAE-2 / sonnet).
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + cfg.ema_epsilon) / (total + cfg.num_codes * cfg.ema_epsilon) * total
            self.weight.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def _window_usage(self) -> Tensor:
        """Fraction of codes used within the last usage_window indices (rounded out to whole batches)."""
        recent = (self.last_seen > 0) & (self.last_seen > self.seen - self.config.usage_window)
        return recent.float().mean()
