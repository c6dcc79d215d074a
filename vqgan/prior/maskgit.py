"""MaskGIT prior: a bidirectional transformer that predicts masked tokens of a grid from all the others.

Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", arXiv:2202.04200 (google-research/
maskgit). The input is [class, z_0, ..., z_{L-1}] with masked positions replaced by a [MASK] token; every
position attends to every other (no causal mask). Training masks ceil(gamma(r) * L) random positions,
r ~ U[0, 1), gamma the cosine schedule, and takes the cross-entropy on the masked positions only;
sampling (maskgit_sampling.py) decodes the grid in a few parallel steps. Ids share one embedding table:
code k -> k, class c -> K + c, the null class -> K + num_classes (the class token of an unconditional
prior, and the one class dropout uses for classifier-free guidance), [MASK] -> K + num_classes + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgan.prior.ids import check_id_range
from vqgan.prior.mask_schedule import check_mask_schedule, mask_ratio
from vqgan.prior.maskgit_sampling import sample_maskgit
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.transformer import Block, TransformerPrior, check_transformer_config, rope2d_tables
from vqgan.utils import as_grid


@dataclass(frozen=True)
class MaskGITConfig:
    num_codes: int = 1024                  # K
    grid: tuple[int, ...] = (16, 16)     # (h, w); L = h * w grid positions after the class token
    num_classes: int = 0                   # 0 = unconditional (a single class token)
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    positions: Literal["learned", "rope2d"] = "learned"
    class_dropout: float = 0.0             # p of replacing the class by the null class while training (CFG)
    mask_schedule: str = "cosine"          # training's gamma (mask_schedule.py); MaskGIT: cosine
    label_smoothing: float = 0.0           # on the masked-token cross-entropy; MaskGIT's ImageNet config: 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", as_grid(self.grid))
        check_transformer_config(self)
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        check_mask_schedule(self.mask_schedule)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def mask_id(self) -> int:
        return self.num_codes + self.num_classes + 1


class MaskGITPrior(nn.Module):
    """Bidirectional transformer: (B, h, w) tokens, (B, h, w) bool mask, labels -> (B, K, h, w) logits."""

    check_ids = True  # range-check token and class ids (a host sync); the training loop turns it off: see vqgan.prior.ids

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_emb = nn.Embedding(c.mask_id + 1, c.dim)  # codes, classes, null class, [MASK]
        self.pos_emb = nn.Parameter(torch.zeros(c.seq_len + 1, c.dim)) if c.positions == "learned" else None
        if c.positions == "rope2d":
            cos, sin = rope2d_tables(c.grid, c.head_dim)                                   # (L, D/2)
            # The class token sits before the grid with no rotation (angle 0): cos 1, sin 0.
            self.register_buffer("rope_cos", F.pad(cos, (0, 0, 1, 0), value=1.0), persistent=False)
            self.register_buffer("rope_sin", F.pad(sin, (0, 0, 1, 0)), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, causal=False) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_codes, bias=False)
        self.apply(TransformerPrior._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * depth)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.depth))
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)

    def class_ids(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B,) class ids in [0, num_classes] (num_classes = null) or None -> (B,) ids of the class token."""
        c = self.config
        device = self.token_emb.weight.device
        if labels is None:
            return torch.full((batch,), c.num_codes + c.null_class, dtype=torch.long, device=device)
        if c.num_classes == 0:
            raise ValueError("labels were given but the MaskGIT prior is unconditional (num_classes=0)")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if self.check_ids:
            check_id_range(labels, c.num_classes + 1, "class", f" ({c.num_classes} = null)")
        return labels.to(device) + c.num_codes

    def input_ids(self, tokens: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, h, w) tokens and mask -> (B, 1 + L) ids [class, z or MASK, ...], with class dropout when training."""
        c = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != c.grid or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (B, {c.grid[0]}, {c.grid[1]}) long tensor, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of the tokens' shape {tuple(tokens.shape)}, "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        tokens = tokens.masked_fill(mask, 0)  # masked positions may hold anything, e.g. not-yet-sampled slots
        if self.check_ids:
            check_id_range(tokens, c.num_codes, "token")
        if labels is not None and self.training and c.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < c.class_dropout
            labels = labels.masked_fill(drop, c.null_class)
        grid_ids = rearrange(tokens.masked_fill(mask, c.mask_id), "b h w -> b (h w)")
        return torch.cat([self.class_ids(labels, tokens.shape[0])[:, None], grid_ids], dim=1)  # (B, 1 + L)

    def forward_embeddings(self, x: Tensor) -> Tensor:
        """(B, 1 + L, dim) input embeddings -> (B, K, L) logits of the grid positions; tests differentiate this."""
        if x.shape[1] != self.config.seq_len + 1:
            raise ValueError(f"expected {self.config.seq_len + 1} positions (class + grid), got {x.shape[1]}")
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, None, 0)
        return rearrange(self.head(self.ln_f(x[:, 1:])), "b t k -> b k t")              # (B, K, L)

    def forward(self, tokens: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, h, w) tokens, (B,) labels | None, (B, h, w) bool mask (True = hidden) -> (B, K, h, w) logits.

        mask None hides nothing. Labels None is the null class.
        """
        if mask is None:
            mask = torch.zeros_like(tokens, dtype=torch.bool)
        logits = self.forward_embeddings(self.token_emb(self.input_ids(tokens, mask, labels)))
        return rearrange(logits, "b k (h w) -> b k h w", h=self.config.grid[0])

    def sample(
        self, n: int, labels=None, config: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None
    ) -> Tensor:
        """n grids (n, h, w) by iterative parallel decoding; see maskgit_sampling.sample_maskgit."""
        return sample_maskgit(self, n, labels, config.temperature, config.top_k, config.top_p, config.cfg_scale,
                              generator, steps=config.steps, schedule=config.mask_schedule,
                              choice_temperature=config.choice_temperature)


def training_mask(shape: tuple[int, int, int], schedule: str = "cosine", device=None) -> Tensor:
    """(B, h, w) bool mask hiding ceil(gamma(r) * L) uniformly chosen positions per grid, r ~ U[0, 1).

    Draws from the global RNG, which the trainer seeds per micro-batch, so a resumed run masks alike.
    """
    b, h, w = shape
    total = h * w
    r = torch.rand(b, device=device, dtype=torch.float64)
    counts = torch.ceil(mask_ratio(schedule, r, total) * total).long().clamp(1, total)   # (B,) >= 1 masked
    scores = torch.rand(b, total, device=device)                                        # (B, L)
    ranks = scores.argsort(dim=1).argsort(dim=1)                                        # uniform random order
    return (ranks < counts[:, None].to(ranks.device)).view(b, h, w)


def masked_token_loss(logits: Tensor, tokens: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """(B, K, h, w) logits, (B, h, w) tokens and mask -> mean cross-entropy (nats) over masked positions."""
    logits = rearrange(logits.float(), "b k h w -> (b h w) k")
    per_token = F.cross_entropy(logits, tokens.flatten(), reduction="none", label_smoothing=label_smoothing)
    weight = mask.flatten().float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)
