"""GPT-style transformer prior over raster-ordered token grids, with class token, CFG and a KV cache.

Decoder as in nanoGPT (pre-LN, GELU MLP, causal `F.scaled_dot_product_attention`). The input
sequence is [start, z_0, ..., z_{L-2}] and the output at position i predicts z_i, so the start token
carries the class (Esser et al. 2021, taming-transformers; Sun et al. 2024, LlamaGen). Start ids share
the embedding table with the codes: code k -> k, class c -> K + c, the null class -> K + num_classes,
which is also the single start token of an unconditional prior and the one that class dropout uses
for classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqgan.prior.ids import check_id_range
from vqgan.prior.sampling import SamplingConfig, sample_transformer
from vqgan.utils import as_grid


def check_transformer_config(c: Any) -> None:
    """The checks every transformer prior's config shares (the GPT's and MaskGIT's): sizes, heads, positions, dropout."""
    if c.num_codes < 2 or c.num_classes < 0:
        raise ValueError(f"need num_codes >= 2 and num_classes >= 0, got {c.num_codes}, {c.num_classes}")
    if c.dim % c.heads:
        raise ValueError(f"dim {c.dim} must be divisible by heads {c.heads}")
    if c.positions not in ("learned", "rope2d"):
        raise ValueError(f"positions must be 'learned' or 'rope2d', got {c.positions!r}")
    if c.positions == "rope2d" and c.head_dim % 4:
        raise ValueError(f"rope2d rotates pairs by row and by column: head dim {c.head_dim} must be divisible by 4")
    if not (0.0 <= c.class_dropout < 1.0) or not (0.0 <= c.dropout < 1.0):
        raise ValueError(f"class_dropout and dropout must lie in [0, 1), got {c.class_dropout}, {c.dropout}")


@dataclass(frozen=True)
class TransformerConfig:
    num_codes: int = 1024                  # K
    grid: tuple[int, ...] = (16, 16)     # (h, w); sequence length L = h * w
    num_classes: int = 0                   # 0 = unconditional (a single start token)
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    positions: Literal["learned", "rope2d"] = "learned"
    class_dropout: float = 0.0             # p of replacing the class by the null class while training (CFG)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", as_grid(self.grid))
        check_transformer_config(self)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def null_class(self) -> int:
        return self.num_classes


@dataclass
class KVCache:
    """Per-layer keys and values preallocated to the full length: k[l], v[l] are (B, heads, L, head_dim)."""

    k: list[Tensor]
    v: list[Tensor]


def rope2d_tables(grid: tuple[int, int], head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(L, head_dim/2) cos and sin: the first half of the pairs rotate by row, the second by column."""
    h, w = grid
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)           # (D/4,)
    # Position i predicts z_i, so it takes the (row, col) of raster index i.
    idx = torch.arange(h * w)
    angles = torch.cat([(idx // w)[:, None] * freqs, (idx % w)[:, None] * freqs], dim=-1)  # (L, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D), cos/sin (T, D/2) -> x with each pair (x[2j], x[2j+1]) rotated (Su et al. 2021)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                              # (B, H, T, D/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; causal=False makes it bidirectional (the MaskGIT prior's encoder)."""

    def __init__(self, config: TransformerConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: tuple[Tensor, Tensor] | None,
                start_pos: int) -> Tensor:
        """x (B, T, C) at positions [start_pos, start_pos + T) -> (B, T, C)."""
        T = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this chunk, then attend over everything written so far
            k_cache, v_cache = cache
            k_cache[:, :, start_pos : start_pos + T] = k
            v_cache[:, :, start_pos : start_pos + T] = v
            k, v = k_cache[:, :, : start_pos + T], v_cache[:, :, : start_pos + T]   # (B, H, S, D)
        mask, causal = None, False  # bidirectional (causal=False): every position attends to every position
        if self.causal and T > 1 and start_pos == 0:
            causal = True
        elif self.causal and T > 1:  # a chunk after a cached prefix: is_causal would align the mask top-left
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )                                                                              # (B, H, T, D)
        return self.resid_dropout(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TransformerConfig, causal: bool = True):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config, causal)
        self.ln2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim), nn.Dropout(config.dropout)
        )

    def forward(self, x: Tensor, rope, cache, start_pos: int) -> Tensor:
        x = x + self.attn(self.ln1(x), rope, cache, start_pos)
        return x + self.mlp(self.ln2(x))


class TransformerPrior(nn.Module):
    """Decoder-only transformer: (B, h, w) tokens + labels -> (B, K, h, w) next-token logits."""

    check_ids = True  # range-check token and class ids (a host sync); the training loop turns it off: see vqgan.prior.ids

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_emb = nn.Embedding(c.num_codes + c.num_classes + 1, c.dim)  # codes, classes, null
        self.pos_emb = nn.Parameter(torch.zeros(c.seq_len, c.dim)) if c.positions == "learned" else None
        if c.positions == "rope2d":
            cos, sin = rope2d_tables(c.grid, c.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_codes, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * depth)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.depth))
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def start_ids(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B,) class ids in [0, num_classes] (num_classes = null) or None -> (B,) ids of the start token."""
        c = self.config
        device = self.token_emb.weight.device
        if labels is None:
            return torch.full((batch,), c.num_codes + c.null_class, dtype=torch.long, device=device)
        if c.num_classes == 0:
            raise ValueError("labels were given but the transformer prior is unconditional (num_classes=0)")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if self.check_ids:
            check_id_range(labels, c.num_classes + 1, "class", f" ({c.num_classes} = null)")
        return labels.to(device) + c.num_codes

    def input_sequence(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, h, w) tokens -> (B, L) input ids [start, z_0, ..., z_{L-2}], with class dropout when training."""
        c = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != c.grid or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (B, {c.grid[0]}, {c.grid[1]}) long tensor, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if self.check_ids:
            check_id_range(tokens, c.num_codes, "token")
        if labels is not None and self.training and c.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < c.class_dropout
            labels = labels.masked_fill(drop, c.null_class)
        start = self.start_ids(labels, tokens.shape[0])
        flat = rearrange(tokens, "b h w -> b (h w)")
        return torch.cat([start[:, None], flat[:, :-1]], dim=1)                      # (B, L)

    def new_kv_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """Empty cache for `batch` sequences of the full length L."""
        c = self.config
        device = device or self.token_emb.weight.device
        dtype = dtype or self.token_emb.weight.dtype
        shape = (batch, c.heads, c.seq_len, c.head_dim)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)],
        )

    def forward_embeddings(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """(B, T, dim) input embeddings at positions [start_pos, start_pos + T) -> (B, K, T) logits."""
        T = x.shape[1]
        if start_pos < 0 or start_pos + T > self.config.seq_len:
            raise ValueError(f"positions [{start_pos}, {start_pos + T}) exceed the sequence length {self.config.seq_len}")
        if start_pos > 0 and kv_cache is None:
            raise ValueError(f"start_pos={start_pos} needs the kv_cache holding the earlier positions")
        positions = slice(start_pos, start_pos + T)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, rope, cache, start_pos)
        return rearrange(self.head(self.ln_f(x)), "b t k -> b k t")                  # (B, K, T)

    def forward(self, tokens: Tensor, labels: Tensor | None = None, kv_cache: KVCache | None = None,
                start_pos: int = 0) -> Tensor:
        """Two modes.

        tokens (B, h, w) and labels (B,) | None -> (B, K, h, w): logits for z_i given class and z_<i.
        tokens (B, T) input ids (see `input_sequence`) at positions [start_pos, start_pos + T), optionally
        reading/writing `kv_cache` -> (B, K, T); labels must be None since the start id holds the class.
        """
        if tokens.dim() == 3:
            if start_pos != 0:
                raise ValueError(f"a full grid starts at position 0, got start_pos={start_pos}")
            logits = self.forward_embeddings(self.token_emb(self.input_sequence(tokens, labels)), kv_cache)
            return rearrange(logits, "b k (h w) -> b k h w", h=self.config.grid[0])
        if tokens.dim() == 2:
            if labels is not None:
                raise ValueError("for an input-id sequence (B, T) the class is its start id; pass labels=None")
            return self.forward_embeddings(self.token_emb(tokens), kv_cache, start_pos)
        raise ValueError(f"tokens must be (B, h, w) grids or (B, T) input ids, got shape {tuple(tokens.shape)}")

    def sample(
        self, n: int, labels=None, config: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None
    ) -> Tensor:
        """n grids (n, h, w) by ancestral sampling; see sampling.sample_transformer."""
        return sample_transformer(self, n, labels, config.temperature, config.top_k, config.top_p,
                                  config.cfg_scale, generator, config.use_kv_cache)
