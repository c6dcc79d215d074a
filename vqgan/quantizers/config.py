"""QuantizerConfig: one frozen dataclass for every quantizer kind, so that a recipe, the CLI
(`model.quantizer.kind=lfq`) and an exported config.json describe any of them with the same keys.

Fields that a kind does not read are refused when set away from their default (see `_UNUSED`), so
a setting never silently does nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

# vq: nearest code (VQ-VAE). fsq: finite scalar quantization (Mentzer et al. 2023, arXiv:2309.15505).
# lfq: lookup-free sign bits (MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737). ibq: index backpropagation
# (Shi et al. 2024, arXiv:2412.02692). simvq: frozen codes times a learned map (Zhu et al. 2024,
# arXiv:2411.02038). msvq: multi-scale residual quantization (VAR, Tian et al. 2024, arXiv:2404.02905).
KINDS = ("vq", "fsq", "lfq", "ibq", "simvq", "msvq")
Kind = Literal["vq", "fsq", "lfq", "ibq", "simvq", "msvq"]

# FSQ levels per channel when fsq_levels is not given and K is a power of two: as many 8s as fit,
# then 4s for the remaining bits (the paper's table uses levels >= 5 and products that are not powers of two; a
# power-of-two K keeps num_codes equal to the checkpoint's vocabulary for priors and token files).
_FSQ_TOP_LEVEL = 8

VQ_ONLY = ("use_ema", "ema_decay", "ema_epsilon", "kmeans_init", "kmeans_iters", "dead_code_threshold",
           "affine_reparam", "affine_lr", "sync_nu", "rotation_trick", "restart_from", "l2_normalize")
# A field a kind does not read may hold, beside its default: "off" for the two VQ remedies that default on
# (kmeans_init, dead_code_threshold), and the entropy group size that every config written before the
# default became 14 carries (9), so those folders and checkpoints still load.
_ALSO_ACCEPTED_UNREAD = {"kmeans_init": False, "dead_code_threshold": 0, "entropy_group_bits": 9}
# Fields each kind does not read (must stay at their defaults or the value above).
_UNUSED: dict[str, tuple[str, ...]] = {
    "vq": ("fsq_levels", "entropy_group_bits"),
    "simvq": ("fsq_levels", "entropy_group_bits", "use_ema", "ema_decay", "ema_epsilon", "kmeans_init",
              "kmeans_iters", "dead_code_threshold", "affine_reparam", "affine_lr", "sync_nu", "restart_from"),
    "ibq": ("fsq_levels", "entropy_group_bits", "use_ema", "ema_decay", "ema_epsilon", "affine_reparam",
            "affine_lr", "sync_nu", "rotation_trick", "l2_normalize"),
    "fsq": VQ_ONLY + ("beta", "code_dim"),
    "lfq": VQ_ONLY + ("fsq_levels", "code_dim"),
    # VAR's quantizer: a plain Euclidean codebook in the latent's own width (k-means init and restarts apply)
    "msvq": ("fsq_levels", "entropy_group_bits", "code_dim", "l2_normalize", "use_ema", "ema_decay", "ema_epsilon",
             "affine_reparam", "affine_lr", "sync_nu", "rotation_trick", "entropy_weight", "entropy_temperature",
             "entropy_anneal_steps", "entropy_anneal_factor"),
}
MSVQ_ONLY = ("scales", "phi_ratio", "phi_sharing", "phi_count")
for _kind in KINDS[:-1]:
    _UNUSED[_kind] += MSVQ_ONLY


@dataclass(frozen=True)
class QuantizerConfig:
    kind: Kind = "vq"
    num_codes: int = 1024  # K; lfq: a power of two 2^bits; fsq: the product of fsq_levels
    dim: int = 256  # D, channels of the input z
    # Low-dim lookup space: project D -> code_dim, look up, project back (ViT-VQGAN arXiv:2110.04627,
    # LlamaGen arXiv:2406.06525 uses 8). None or == dim: look up in D itself, no projections.
    # fsq / lfq: the lookup width is fixed by the kind (len(fsq_levels), log2 K), so code_dim stays None.
    code_dim: int | None = None
    # Weight of the COMMITMENT term ||z - sg[e]||^2 (VQ-VAE arXiv:1711.00937, eq. 3). taming and
    # diffusers put it on the codebook term instead; we follow the paper. ibq: on its hard codebook term,
    # as SEED-Voken's IBQ loss (see quantizers/ibq.py).
    beta: float = 0.25
    l2_normalize: bool = False  # cosine codes: normalise z and codes before lookup (ViT-VQGAN)
    # Codebook as an EMA of assigned encoder outputs, Laplace-smoothed counts (VQ-VAE appendix A.1,
    # VQ-VAE-2 arXiv:1906.00446). The codebook is then a buffer and its loss term is 0.
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    # k-means on the first training batch (SoundStream arXiv:2107.03312), once; flag kept in a buffer.
    # On by default: without it and restarts a preset collapses (tests/test_quantize.py; issue 11).
    kmeans_init: bool = True
    kmeans_iters: int = 10
    # Reseed a code unused for this many training forwards (Jukebox arXiv:2005.00341, "random
    # restarts"); 0 = off. The reseed happens after the lookup: candidates are drawn from this batch's
    # rows and written before the next batch's lookup, so a restarted code is scored only on data it
    # was not copied from (the usage figure counts real assignments only).
    # 10 measured best on the patch test (benchmarks/results/quantizer_fidelity.md, K = 1024, 4096 tokens
    # a step): at 1, codes that are merely rare miss one batch and are thrown away (-0.7 dB); 10 to 50
    # measure the same. What counts is the tokens a code may go without: threshold x tokens per step
    # ~ 40 to 200 x K there.
    dead_code_threshold: int = 10
    # Where the candidates come from: "error" draws rows with probability ~ their squared quantization
    # error (k-means++'s D^2 rule, Arthur & Vassilvitskii 2007): codes go where the codebook is worst.
    # "random": uniform rows (Jukebox, vector-quantize-pytorch).
    restart_from: Literal["error", "random"] = "error"
    # Weight of mean per-sample entropy minus batch entropy (MAGVIT-v2 arXiv:2310.05737, sec. 3.1):
    # vq/ibq/simvq on softmax(-dist / temperature) over at most chunk_size rows; lfq / fsq over their grid.
    entropy_weight: float = 0.0
    entropy_temperature: float = 1.0
    # Annealed entropy weight: entropy_anneal_factor x entropy_weight at step 0, linearly down to
    # entropy_weight at entropy_anneal_steps (0 = constant). Open-MAGVIT2's `codebook_enlarge_ratio` r
    # and `codebook_enlarge_steps` (vqperceptual.py: w * (1 + r * max(0, 1 - step / steps))) are
    # entropy_anneal_factor = 1 + r and the same steps; its loss defaults are r = 3 over 2000 steps.
    entropy_anneal_steps: int = 0
    entropy_anneal_factor: float = 1.0
    # lfq / fsq: the batch ("codebook") entropy over the grid is the sum of exact entropies of groups of
    # channels with at most 2^entropy_group_bits codes (Open-MAGVIT2's factorisation); exact with one group.
    # 14: exact up to 2^14 codes, where it measured best (lfq 2^14 on whitened patches: 94 % of codes used
    # over 65,536 tokens, against 87 % with groups of 9 bits; benchmarks/results/quantizer_fidelity.md).
    # Each step then computes (rows, 2^14) chunks; 2^18 is split into 14 + 4 bits (the LFQ recipe sets 9).
    entropy_group_bits: int = 14
    # fsq: quantization levels per channel; () = derived from num_codes (a power of two).
    fsq_levels: tuple[int, ...] = ()
    # Huh et al. 2023, "Straightening Out the Straight-Through Estimator" (arXiv:2305.08842): codes are
    # (1 + s) * e + b with s, b learned and shared by all codes; sync_nu adds nu * (task gradient) to
    # the selected codes ("synchronized update", as vqtorch's `straight_through_approximation`).
    affine_reparam: bool = False
    affine_lr: float = 10.0  # s and b learn at affine_lr x the model's lr (vqtorch's `affine_lr`)
    sync_nu: float = 0.0
    rotation_trick: bool = False  # Fifty et al. 2024 (arXiv:2410.06424), instead of the plain STE
    usage_window: int = 65536  # codebook usage is measured over about this many recent indices
    chunk_size: int = 4096  # rows of any (rows, K) matrix computed at once
    # msvq (VAR, arXiv:2404.02905, sec. 3.2): side of each scale's token grid, coarse to fine, Σ s² tokens an image
    # (680 for VAR's ten scales); the last equals the latent's side (256 px / f16 = 16).
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    # msvq: phi(h) = (1 - phi_ratio) h + phi_ratio conv3x3(h) on each scale's upsampled codes (VAR's quant_resi,
    # 0.5 in its release); 0: identity, no convs.
    phi_ratio: float = 0.5
    # msvq: which scales share a phi conv (VAR's share_quant_resi): "partial" = phi_count convs, each scale taking
    # the one nearest its position in [0, 1] (VAR's released tokenizer: 4); "shared" = one; "per_scale" = one each.
    phi_sharing: Literal["partial", "shared", "per_scale"] = "partial"
    phi_count: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantizerConfig: kind must be one of {list(KINDS)}, got {self.kind!r}")
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
            (self.restart_from in ("error", "random"),
             f"restart_from must be 'error' or 'random', got {self.restart_from!r}"),
            (self.entropy_weight >= 0, f"entropy_weight must be >= 0, got {self.entropy_weight}"),
            (self.entropy_temperature > 0, f"entropy_temperature must be > 0, got {self.entropy_temperature}"),
            (self.entropy_anneal_steps >= 0, f"entropy_anneal_steps must be >= 0, got {self.entropy_anneal_steps}"),
            (self.entropy_anneal_factor >= 1, f"entropy_anneal_factor must be >= 1, got {self.entropy_anneal_factor}"),
            (0 < self.entropy_group_bits <= 20, f"entropy_group_bits must be in [1, 20], got {self.entropy_group_bits}"),
            (self.affine_lr > 0, f"affine_lr must be > 0, got {self.affine_lr}"),
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
        defaults = {f.name: f.default for f in fields(self)}
        stray = [name for name in _UNUSED[self.kind]
                 if getattr(self, name) not in (defaults[name], _ALSO_ACCEPTED_UNREAD.get(name, defaults[name]))]
        if stray:
            raise ValueError(
                f"QuantizerConfig: kind={self.kind!r} does not read {stray}; leave them at their defaults "
                f"or choose a kind that uses them"
            )
        if self.kind == "lfq" and (self.num_codes < 2 or self.num_codes & (self.num_codes - 1)):
            raise ValueError(f"QuantizerConfig: kind='lfq' needs num_codes = 2^bits (2, 4, ..., 2^18, ...), "
                             f"got {self.num_codes}")
        if self.kind == "fsq":
            self._check_fsq()
        if self.kind == "msvq":
            self._check_msvq()

    def _check_msvq(self) -> None:
        scales = self.scales
        if not scales or any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ValueError(f"QuantizerConfig: scales must be strictly increasing positive grid sides "
                             f"(e.g. [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]), got {list(scales)}")
        if not 0.0 <= self.phi_ratio <= 1.0:
            raise ValueError(f"QuantizerConfig: phi_ratio must be in [0, 1], got {self.phi_ratio}")
        if self.phi_sharing not in ("partial", "shared", "per_scale"):
            raise ValueError(f"QuantizerConfig: phi_sharing must be 'partial', 'shared' or 'per_scale', "
                             f"got {self.phi_sharing!r}")
        if self.phi_count < 1:
            raise ValueError(f"QuantizerConfig: phi_count must be >= 1, got {self.phi_count}")

    def _check_fsq(self) -> None:
        if self.fsq_levels:
            if any(level < 2 for level in self.fsq_levels):
                raise ValueError(f"QuantizerConfig: fsq_levels must all be >= 2, got {self.fsq_levels}")
            if math.prod(self.fsq_levels) != self.num_codes:
                raise ValueError(f"QuantizerConfig: num_codes ({self.num_codes}) must equal the product of "
                                 f"fsq_levels {self.fsq_levels} = {math.prod(self.fsq_levels)}")
        elif self.num_codes < 2 or self.num_codes & (self.num_codes - 1):
            raise ValueError(f"QuantizerConfig: kind='fsq' without fsq_levels needs num_codes a power of two, "
                             f"got {self.num_codes}; or give fsq_levels (e.g. [8, 5, 5, 5] for 1000 codes)")

    @property
    def levels(self) -> tuple[int, ...]:
        """FSQ levels per channel: fsq_levels, or 8s and 4s whose product is num_codes."""
        if self.fsq_levels:
            return self.fsq_levels
        bits = self.num_codes.bit_length() - 1
        if bits == 1:
            return (2,)
        out = [_FSQ_TOP_LEVEL] * (bits // 3)
        if bits % 3 == 1:  # 8 * 2 would leave a 2-level channel: 4 * 4 holds the same 4 bits
            out[-1:] = [4, 4]
        elif bits % 3 == 2:
            out.append(4)
        return tuple(out)

    @property
    def bits(self) -> int:
        """lfq: bits per index, log2 K."""
        return self.num_codes.bit_length() - 1

    @property
    def lookup_dim(self) -> int:
        """Width of the space where codes live: code_dim or dim (vq/ibq/simvq), len(levels), bits."""
        if self.kind == "fsq":
            return len(self.levels)
        if self.kind == "lfq":
            return self.bits
        return self.dim if self.code_dim is None else self.code_dim
