"""Ancestral sampling from the priors: temperature, top-k, top-p, classifier-free guidance, KV cache.

Randomness is one uniform per row per step drawn from the caller's `torch.Generator` and turned into
a token by inverting the CDF of the filtered distribution. The cached and the uncached transformer
paths therefore consume the generator identically and, for the same seed, give identical tokens.
The MaskGIT prior's parallel decoding (maskgit_sampling.py) draws its tokens through the same
functions; `sample_prior` samples any of the three families through their `sample` method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from einops import rearrange
from torch import Tensor

from vqgan.prior.mask_schedule import check_mask_schedule

if TYPE_CHECKING:  # the models import this module; only the type checker needs them here
    from vqgan.prior.maskgit import MaskGITPrior
    from vqgan.prior.pixelcnn import PixelCNNPrior
    from vqgan.prior.transformer import TransformerPrior

# Cumulative mass within this of top_p counts as reaching it, so that exact hand-made boundaries
# (0.5 + 0.3 vs p = 0.8) do not depend on float rounding.
TOP_P_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SamplingConfig:
    """Settings of one sampling run, as tools read them from a recipe."""

    num_samples: int = 16
    batch_size: int = 16
    temperature: float = 1.0       # 0 = greedy (argmax)
    top_k: int | None = None       # keep the k most likely tokens (Fan et al. 2018)
    top_p: float | None = None     # nucleus sampling (Holtzman et al. 2020, arXiv:1904.09751)
    cfg_scale: float = 1.0         # uncond + scale * (cond - uncond); 1 = no guidance (Ho & Salimans 2022)
    use_kv_cache: bool = True      # transformer only; False recomputes the prefix every step
    seed: int | None = 0
    # MaskGIT only (Chang et al. 2022, arXiv:2202.04200): parallel decoding steps, the mask schedule
    # by name (mask_schedule.MASK_SCHEDULES) and the Gumbel scale of the re-masking choice, annealed by
    # (1 - t/T); 4.5 is google-research/maskgit's ImageNet setting (sample_choice_temperature).
    steps: int = 12
    mask_schedule: str = "cosine"
    choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_samples and batch_size must be >= 1, got {self.num_samples} and {self.batch_size}"
            )
        check_sampling_settings(self.temperature, self.top_k, self.top_p, num_codes=None)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        check_mask_schedule(self.mask_schedule)
        if not math.isfinite(self.choice_temperature) or self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be a finite number >= 0, got {self.choice_temperature}")


def check_sampling_settings(
    temperature: float, top_k: int | None, top_p: float | None, num_codes: int | None
) -> None:
    """Raise ValueError naming the setting when temperature, top_k or top_p is out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if num_codes is not None and top_k > num_codes:
            raise ValueError(f"top_k must be <= the number of codes {num_codes}, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """(..., K) logits -> same with every token outside top-k, then outside top-p, set to -inf."""
    check_sampling_settings(1.0, top_k, top_p, num_codes=logits.shape[-1])
    if top_k is None and top_p is None:
        return logits
    # A stable descending sort ranks ties by index, so exactly k (or the smallest nucleus) survive.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (..., K)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        keep_sorted[..., top_k:] = False
    if top_p is not None:
        masked = sorted_logits.double().masked_fill(~keep_sorted, -math.inf)
        probs = masked.softmax(dim=-1)                                              # (..., K)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better-ranked tokens
        # Keep token i while the better-ranked ones have not yet reached p: the smallest such set.
        keep_sorted &= mass_before < top_p - TOP_P_TOLERANCE
        keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


def sample_from_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, K) logits -> (B,) token ids; temperature 0 is argmax and draws nothing from `generator`."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    check_sampling_settings(temperature, top_k, top_p, num_codes=logits.shape[-1])
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.double() / temperature, top_k, top_p)
    probs = filtered.softmax(dim=-1)                                                # (B, K)
    cdf = probs.cumsum(dim=-1)                                                      # (B, K)
    # One uniform per row, drawn on the generator's device so CPU seeds reproduce on any device.
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=device, dtype=torch.float64)
    u = u.to(logits.device) * cdf[:, -1:]                                           # (B, 1)
    ids = torch.searchsorted(cdf, u, right=True)                                    # (B, 1)
    # Rounding can push u past the last cdf entry: fall back to the last token with mass.
    last_valid = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(ids, last_valid).squeeze(-1)


def labels_tensor(labels: int | Sequence[int] | Tensor | None, n: int, num_classes: int,
                  device: torch.device) -> Tensor | None:
    """User labels -> (n,) long tensor on `device`, checked against [0, num_classes)."""
    if labels is None:
        return None
    if num_classes == 0:
        raise ValueError("labels were given but the prior is unconditional (num_classes=0)")
    if isinstance(labels, int):
        labels = [labels] * n
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().to(device)
    if labels.numel() != n:
        raise ValueError(f"labels must be one class id or {n} of them, got {labels.numel()}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class id {int(bad[0])} out of range [0, {num_classes})")
    return labels


def check_null_class_trained(num_classes: int, class_dropout: float, labels_given: bool, cfg_scale: float,
                             section: str = "transformer") -> None:
    """Refuse to sample through the null class of a conditional transformer that never trained it.

    The null-class start token is trained only by class dropout (Ho & Salimans 2022, arXiv:2207.12598):
    with class_dropout == 0 its embedding keeps its random init, so "unconditional" samples (labels None)
    and the unconditional branch of CFG (cfg_scale != 1) would come from an untrained input.
    """
    if num_classes == 0 or class_dropout > 0:
        return  # unconditional priors train their single start token on every sequence
    uses = []
    if not labels_given:
        uses.append("labels=None samples from the null class")
    if cfg_scale != 1.0:
        uses.append(f"cfg_scale={cfg_scale} uses the null class as the unconditional branch")
    if uses:
        raise ValueError(
            f"{' and '.join(uses)}, but this class-conditional prior ({num_classes} classes) was trained with "
            f"{section}.class_dropout=0, so its null class never trained: train with "
            f"{section}.class_dropout > 0, e.g. 0.1, or pass labels and cfg_scale=1"
        )


def check_guidance(num_classes: int, class_dropout: float, labels: Tensor | None, cfg_scale: float,
                   section: str = "transformer") -> bool:
    """Validate classifier-free guidance for a prior with a null class -> whether sampling is guided."""
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    guided = cfg_scale != 1.0
    if guided and num_classes == 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional prior; this one has num_classes=0")
    if guided and labels is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs labels to guide towards")
    check_null_class_trained(num_classes, class_dropout, labels is not None, cfg_scale, section)
    return guided


def guided_logits(logits: Tensor, n: int, cfg_scale: float) -> Tensor:
    """(2n, ...) logits, conditional rows then null-class rows -> (n, ...) uncond + scale * (cond - uncond)."""
    cond, uncond = logits[:n], logits[n:]
    return uncond + cfg_scale * (cond - uncond)


@torch.inference_mode()
def sample_pixelcnn(
    model: PixelCNNPrior,
    n: int,
    labels: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral raster-order sampling of n grids -> (n, h, w) long tokens."""
    cfg = model.config
    check_sampling_settings(temperature, top_k, top_p, cfg.num_codes)
    device = next(model.parameters()).device
    labels = labels_tensor(labels, n, cfg.num_classes, device)
    if cfg.num_classes > 0 and labels is None:
        raise ValueError(f"the PixelCNN prior is class-conditional ({cfg.num_classes} classes): give labels")
    was_training = model.training
    model.eval()
    h, w = cfg.grid
    tokens = torch.zeros(n, h, w, dtype=torch.long, device=device)
    for r in range(h):
        for c in range(w):
            # NOTE: no cache exists for a conv stack, so each step reruns the net; rows below r
            # cannot influence row r (the stacks only look up and left), so they are left out.
            logits = model(tokens[:, : r + 1], labels)[:, :, r, c]                  # (n, K)
            tokens[:, r, c] = sample_from_logits(logits, temperature, top_k, top_p, generator)
    model.train(was_training)
    return tokens


@torch.inference_mode()
def sample_transformer(
    model: TransformerPrior,
    n: int,
    labels: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Tensor:
    """Ancestral raster-order sampling of n grids -> (n, h, w); labels None = the null class.

    A class-conditional prior trained without class dropout has no usable null class: labels None and
    cfg_scale != 1 are then refused (check_null_class_trained).
    """
    cfg = model.config
    check_sampling_settings(temperature, top_k, top_p, cfg.num_codes)
    device = next(model.parameters()).device
    labels = labels_tensor(labels, n, cfg.num_classes, device)
    guided = check_guidance(cfg.num_classes, cfg.class_dropout, labels, cfg_scale)
    start = model.start_ids(labels, n)                                              # (n,)
    if guided:  # rows [0, n) conditional, rows [n, 2n) the null class (Ho & Salimans 2022)
        start = torch.cat([start, model.start_ids(None, n)])                        # (2n,)
    rows = start.shape[0]
    seq = torch.empty(rows, cfg.seq_len, dtype=torch.long, device=device)           # (R, L)
    seq[:, 0] = start
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(rows) if use_kv_cache else None
    tokens = torch.empty(n, cfg.seq_len, dtype=torch.long, device=device)
    for i in range(cfg.seq_len):
        if use_kv_cache:
            logits = model(seq[:, i : i + 1], kv_cache=cache, start_pos=i)[:, :, -1]  # (R, K)
        else:
            logits = model(seq[:, : i + 1])[:, :, -1]                               # (R, K)
        if guided:
            logits = guided_logits(logits, n, cfg_scale)                            # (n, K)
        tokens[:, i] = sample_from_logits(logits, temperature, top_k, top_p, generator)
        if i + 1 < cfg.seq_len:
            seq[:, i + 1] = tokens[:, i].repeat(rows // n)
    model.train(was_training)
    return rearrange(tokens, "n (h w) -> n h w", h=cfg.grid[0])


def generator_from_config(config: SamplingConfig, device: str | torch.device = "cpu") -> torch.Generator | None:
    """The seeded generator a SamplingConfig asks for (None when seed is None)."""
    if config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


@torch.inference_mode()
def sample_prior(
    model: PixelCNNPrior | TransformerPrior | MaskGITPrior,
    config: SamplingConfig,
    labels: int | Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
    inputs=None,
) -> Tensor:
    """config.num_samples grids (N, h, w) in batches of config.batch_size; seeded from config if no generator.

    `inputs`: the next-scale prior's NextScaleInput (its tokenizer's msvq quantizer); it then gives (N, L) sequences.
    """
    generator = generator if generator is not None else generator_from_config(config)
    if labels is not None and not isinstance(labels, int):
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() != config.num_samples:
            raise ValueError(f"labels must be one class id or num_samples={config.num_samples} of them, "
                             f"got {labels.numel()}")
    chunks = []
    for begin in range(0, config.num_samples, config.batch_size):
        n = min(config.batch_size, config.num_samples - begin)
        batch_labels = labels if labels is None or isinstance(labels, int) else labels[begin : begin + n]
        extra = {} if inputs is None else {"inputs": inputs}
        chunks.append(model.sample(n, batch_labels, config, generator, **extra))
    return torch.cat(chunks)
