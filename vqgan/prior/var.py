"""Next-scale prior (VAR): a GPT whose step k predicts all s_k x s_k tokens of scale k at once.

Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", arXiv:2404.02905 (FoundationVision/VAR models/var.py, basic_var.py). The sequence is the
token pyramid of a multi-scale tokenizer, coarse to fine, L = sum s_k^2 positions (680 for VAR's
scales). The positions of scale 0 hold the class embedding (the "start" scale); those of scale k >= 1
hold the tokenizer's partial reconstruction from scales < k (`NextScaleInput`), projected to the
model width. Attention is block-causal: a position sees every position of its own and earlier scales,
so scale k's logits depend on the class and the ids of scales < k only. The class also conditions
every block through adaptive layer norm (scale, shift and a residual gate per block, as VAR; the gate
starts near zero, as DiT's adaLN-Zero). Learned position embeddings per position plus a level
embedding per scale. Sampling (var_sampling.py) takes len(scales) steps with a KV cache.

Differences from VAR, chosen for simplicity: standard 1/sqrt(d) attention scale with a bias on q, k
and v (VAR: 0.25/sqrt(d), no k bias, optional l2-normed attention), no drop-path, no shared AdaLN.
The class token ids: class c -> c, the null class -> num_classes (the one token of an unconditional
prior, and the one class dropout uses for classifier-free guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgan.prior.ids import check_id_range
from vqgan.prior.next_scale_input import (
    VAR_SCALES,
    NextScaleInput,
    check_inputs_fit,
    check_scales,
    scale_bounds,
    scale_levels,
    split_scales,
    teacher_forcing_input,
)
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.transformer import KVCache
from vqgan.prior.var_sampling import sample_var


@dataclass(frozen=True)
class VARConfig:
    num_codes: int = 4096                          # K, the codebook shared by every scale
    scales: tuple[int, ...] = VAR_SCALES          # s_k, coarse to fine; L = sum s_k^2
    input_dim: int = 32                            # C of the tokenizer's next-scale input: its latent width (VAR's Cvae)
    num_classes: int = 0                           # 0 = unconditional (only the null class)
    dim: int = 1024                                # VAR-d16: dim 64 * depth, heads = depth
    depth: int = 16
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    class_dropout: float = 0.1                     # VAR's cond_drop_rate: trains the null class for CFG

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", check_scales(self.scales))
        if self.num_codes < 2 or self.num_classes < 0 or self.input_dim < 1:
            raise ValueError(f"need num_codes >= 2, num_classes >= 0 and input_dim >= 1, got "
                             f"{self.num_codes}, {self.num_classes}, {self.input_dim}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if not (0.0 <= self.class_dropout < 1.0) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"class_dropout and dropout must lie in [0, 1), got {self.class_dropout}, {self.dropout}")

    @property
    def seq_len(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def grid(self) -> tuple[int, int]:
        """The largest scale's grid: what the tokenizer's decoder reads."""
        return (self.scales[-1], self.scales[-1])

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def null_class(self) -> int:
        return self.num_classes


class BlockCausalAttention(nn.Module):
    """Multi-head self-attention under a given mask, optionally appending to and reading a KV cache."""

    def __init__(self, config: VARConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        """x (B, T, D) at positions [start, start + T); mask (T, start + T) bool, True = attend, or None = all."""
        T = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if cache is not None:  # write this scale, then attend over everything written so far
            k_cache, v_cache = cache
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]                  # (B, H, S, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, d)
        return self.resid_dropout(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class AdaLNBlock(nn.Module):
    """x + g1 * attn(ln(x) * (1 + a1) + b1), then x + g2 * mlp(ln(x) * (1 + a2) + b2); (g, a, b) from the class."""

    def __init__(self, config: VARConfig):
        super().__init__()
        dim = config.dim
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # VAR's order of the 6 vectors: gamma1, gamma2, scale1, scale2, shift1, shift2
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = BlockCausalAttention(config)
        hidden = round(dim * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim),
                                 nn.Dropout(config.dropout))

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None, cache, start: int) -> Tensor:
        """x (B, T, D), cond (B, D) -> (B, T, D)."""
        g1, g2, a1, a2, b1, b2 = self.ada(cond)[:, None].chunk(6, dim=-1)                # 6 x (B, 1, D)
        x = x + g1 * self.attn(self.norm(x) * (1 + a1) + b1, mask, cache, start)
        return x + g2 * self.mlp(self.norm(x) * (1 + a2) + b2)


class VARPrior(nn.Module):
    """Next-scale transformer: per-scale inputs (B, L - s_0^2, C) + labels -> (B, L, K) logits."""

    check_ids = True  # range-check token and class ids (a host sync); the training loop turns it off: see vqgan.prior.ids

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = c = config
        self.bounds = scale_bounds(c.scales)
        self.first_len = c.scales[0] ** 2
        init_std = math.sqrt(1 / c.dim / 3)  # VAR's embedding init
        self.word_embed = nn.Linear(c.input_dim, c.dim)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)                           # classes, null
        self.pos_start = nn.Parameter(torch.empty(self.first_len, c.dim))                # scale 0's tokens
        self.pos_emb = nn.Parameter(torch.empty(c.seq_len, c.dim))
        self.level_emb = nn.Embedding(len(c.scales), c.dim)
        self.register_buffer("levels", scale_levels(c.scales), persistent=False)          # (L,)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(AdaLNBlock(c) for _ in range(c.depth))
        self.head_norm = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 2 * c.dim))             # scale, shift
        self.head = nn.Linear(c.dim, c.num_codes)
        self._init_weights(init_std)

    def _init_weights(self, init_std: float) -> None:
        """VAR's init_weights: Linear N(0, 0.02); residual projections / sqrt(2 depth); gates ~ 0."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for param in (self.class_emb.weight, self.pos_start, self.pos_emb, self.level_emb.weight):
            nn.init.trunc_normal_(param, std=init_std)
        with torch.no_grad():
            self.head.weight.mul_(0.02)
            self.head_ada[-1].weight.mul_(0.5)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * c.depth))
                block.mlp[2].weight.div_(math.sqrt(2 * c.depth))
                block.ada[-1].weight[2 * c.dim :].mul_(0.5)      # scales and shifts
                block.ada[-1].weight[: 2 * c.dim].mul_(1e-5)     # gates: each block starts near the identity

    # ------------------------------------------------------------------ pieces shared by training and sampling

    def class_ids(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B,) class ids in [0, num_classes] (num_classes = null) or None (all null) -> (B,) ids, dropout when training."""
        c = self.config
        device = self.class_emb.weight.device
        if labels is None:
            return torch.full((batch,), c.null_class, dtype=torch.long, device=device)
        if c.num_classes == 0:
            raise ValueError("labels were given but the VAR prior is unconditional (num_classes=0)")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if self.check_ids:
            check_id_range(labels, c.num_classes + 1, "class", f" ({c.num_classes} = null)")
        labels = labels.to(device)
        if self.training and c.class_dropout > 0:  # CFG's null class (Ho & Salimans 2022, arXiv:2207.12598)
            drop = torch.rand(labels.shape, device=device) < c.class_dropout
            labels = labels.masked_fill(drop, c.null_class)
        return labels

    def condition(self, labels: Tensor | None, batch: int) -> Tensor:
        """-> (B, D) class embedding: the tokens of scale 0 and the AdaLN condition of every block."""
        return self.class_emb(self.class_ids(labels, batch))

    def embed(self, cond: Tensor, scale_inputs: Tensor | None, begin: int, end: int) -> Tensor:
        """Input embeddings of positions [begin, end), a whole number of scales -> (B, end - begin, D).

        cond (B, D); scale_inputs (B, end - max(begin, s_0^2), C): the NextScaleInput of the scales >= 1 among them.
        """
        parts = []
        if begin == 0:
            parts.append(cond[:, None] + self.pos_start)                                    # (B, s_0^2, D)
        if end > max(begin, self.first_len):
            expected = end - max(begin, self.first_len)
            if scale_inputs is None or scale_inputs.shape[1:] != (expected, self.config.input_dim):
                got = None if scale_inputs is None else tuple(scale_inputs.shape)
                raise ValueError(f"positions [{begin}, {end}) need scale inputs (B, {expected}, "
                                 f"input_dim={self.config.input_dim}) from the tokenizer, got {got}")
            parts.append(self.word_embed(scale_inputs.to(self.word_embed.weight.dtype)))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return x + self.pos_emb[begin:end] + self.level_emb(self.levels[begin:end])

    def run_blocks(self, x: Tensor, cond: Tensor, mask: Tensor | None, cache: KVCache | None, start: int) -> Tensor:
        """(B, T, D) embeddings at positions [start, start + T) -> (B, T, K) logits."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, mask, None if cache is None else (cache.k[i], cache.v[i]), start)
        scale, shift = self.head_ada(cond)[:, None].chunk(2, dim=-1)                      # 2 x (B, 1, D)
        return self.head(self.head_norm(x) * (1 + scale) + shift)

    def block_causal_mask(self, length: int) -> Tensor:
        """(T, T) bool, True where position i may attend to j: j's scale <= i's scale."""
        levels = self.levels[:length]
        return levels[:, None] >= levels[None, :]

    # ------------------------------------------------------------------ the two entry points

    def forward(self, scale_inputs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher forcing: (B, L' - s_0^2, C) inputs of scales 1.. and (B,) labels | None -> (B, L', K) logits.

        L' is the length of the first few scales (all of them in training: L); labels None = the null class.
        """
        if scale_inputs.dim() != 3:
            raise ValueError(f"scale_inputs must be (B, T, {self.config.input_dim}), got {tuple(scale_inputs.shape)}")
        length = self.first_len + scale_inputs.shape[1]
        if length not in [end for _, end in self.bounds]:
            raise ValueError(f"scale_inputs cover {scale_inputs.shape[1]} positions; expected the inputs of "
                             f"scales 1..k, i.e. one of {[end - self.first_len for _, end in self.bounds]}")
        cond = self.condition(labels, scale_inputs.shape[0])
        x = self.embed(cond, scale_inputs, 0, length)
        return self.run_blocks(x, cond, self.block_causal_mask(length), None, 0)

    def forward_scale(self, k: int, scale_input: Tensor | None, cond: Tensor, cache: KVCache) -> Tensor:
        """One sampling step: scale k's (B, s_k^2, C) input (None for k = 0), cond (B, D) -> (B, s_k^2, K) logits.

        Reads the keys and values of scales < k from `cache` and writes scale k's: scales must come in order.
        """
        begin, end = self.bounds[k]
        x = self.embed(cond, scale_input, begin, end)
        return self.run_blocks(x, cond, None, cache, begin)  # no mask: all of scales <= k is visible

    def new_kv_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """Empty cache for `batch` sequences of the full length L."""
        c = self.config
        device = device or self.head.weight.device
        dtype = dtype or self.head.weight.dtype
        shape = (batch, c.heads, c.seq_len, c.head_dim)
        return KVCache(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)],
                       v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)])

    def sample(self, n: int, labels=None, config: SamplingConfig = SamplingConfig(),
               generator: torch.Generator | None = None, inputs: NextScaleInput | None = None) -> Tensor:
        """n token pyramids (n, L) in len(scales) steps; see var_sampling.sample_var. `inputs`: the tokenizer's."""

        if inputs is None:
            raise ValueError("the VAR prior samples through its tokenizer's NextScaleInput (the multi-scale "
                             "quantizer): pass inputs=")
        return sample_var(self, inputs, n, labels, config.temperature, config.top_k, config.top_p,
                          config.cfg_scale, generator, config.use_kv_cache)


def next_scale_logits(model: VARPrior, inputs: NextScaleInput, ids: Tensor, labels: Tensor | None) -> Tensor:
    """(B, L) flat ids of every scale + labels -> (B, L, K) teacher-forced logits; `model` may be DDP-wrapped."""
    raw = getattr(model, "module", model)  # accelerate's DDP wrapper keeps the prior in .module
    c = raw.config
    check_inputs_fit(raw, inputs)
    if ids.shape[1:] != (c.seq_len,) or ids.dtype != torch.long:
        raise ValueError(f"ids must be a (B, {c.seq_len}) long tensor (scales {c.scales}), got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    if raw.check_ids:
        check_id_range(ids, c.num_codes, "token")
    with torch.no_grad():  # the tokenizer is frozen while the prior trains
        scale_inputs = teacher_forcing_input(inputs, split_scales(ids, c.scales))
    return model(scale_inputs, labels)


def next_scale_loss(model: VARPrior, inputs: NextScaleInput, ids: Tensor, labels: Tensor | None) -> Tensor:
    """Mean cross-entropy (nats/token) of (B, L) ids over all L positions, as VAR weights them."""
    logits = next_scale_logits(model, inputs, ids, labels)
    return F.cross_entropy(rearrange(logits.float(), "b l k -> (b l) k"), ids.flatten())


def as_scale_grids(ids: Tensor, scales: Sequence[int]) -> list[Tensor]:
    """(B, L) flat ids -> [(B, s_k, s_k)] per scale."""
    return [rearrange(part, "b (h w) -> b h w", h=s) for part, s in zip(split_scales(ids, scales), scales)]
