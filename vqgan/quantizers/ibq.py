"""kind="ibq": Index Backpropagation Quantization (Shi et al. 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", arXiv:2412.02692), as TencentARC/SEED-Voken's
`IndexPropagationQuantize`: the argmax of the logits z.e, a softmax straight-through that trains every
code (estimators.IBQEstimator), restarts that place codes at the live codes' norm.

Codes start as N(0, 1), as there (nn.Embedding's init): the softmax gradient scales with the codes'
spread, so taming's tiny uniform init would leave the encoder without gradient. No k-means: Euclidean
centres do not fit an inner-product search.
"""

from __future__ import annotations

from torch import Tensor

from vqgan.quantizers.codebooks import LearnedCodebook, uniform_codes
from vqgan.quantizers.config import IBQConfig, KindConfig, QuantizerConfig, as_kind_config
from vqgan.quantizers.estimators import IBQEstimator
from vqgan.quantizers.lookup import CodebookQuantizer
from vqgan.quantizers.maintenance import DeadCodeRestart, SyncInit, at_live_norm
from vqgan.quantizers.search import InnerProductSearch


class IndexBackpropQuantizer(CodebookQuantizer):
    """Inner-product argmax with a softmax straight-through that reaches every code."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        cfg: IBQConfig = as_kind_config(config)
        restart = (DeadCodeRestart(cfg.dead_code_threshold, cfg.restart_from, at_live_norm)
                   if cfg.dead_code_threshold > 0 else None)
        super().__init__(cfg, LearnedCodebook(), _initial_codes, InnerProductSearch(),
                         IBQEstimator(cfg.beta, cfg.chunk_size), SyncInit(), restart)


def _initial_codes(cfg: IBQConfig) -> Tensor:
    """N(0, 1) codes (K, c). NOTE: drawn after a uniform draw of the same shape, as the versions that built
    IBQ over VQ's init did, so that a seed builds the same codebook (tests/test_quantizer_fixtures.py)."""
    return uniform_codes(cfg.num_codes, cfg.lookup_dim).normal_()
