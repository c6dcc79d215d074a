"""kind="vq": the nearest-code quantizer (VQ-VAE, van den Oord et al. 2017, arXiv:1711.00937).

z -> nearest of K code vectors (exact, chunked fp32 search) -> straight-through output. The options
are the known remedies for codebook collapse and the STE's gradient gap, each cited beside its
config field (vqgan/quantizers/config.py).
"""

from __future__ import annotations

from torch import Tensor

from vqgan.quantizers.codebooks import EMACodebook, LearnedCodebook, uniform_codes
from vqgan.quantizers.config import KindConfig, QuantizerConfig, VQConfig, as_kind_config
from vqgan.quantizers.estimators import VQEstimator, rotation_trick, straight_through
from vqgan.quantizers.lookup import CodebookQuantizer
from vqgan.quantizers.maintenance import DeadCodeRestart, KMeansInit, SyncInit, as_drawn, unit_length
from vqgan.quantizers.search import EuclideanSearch


class VectorQuantizer(CodebookQuantizer):
    """Nearest code; learned or EMA codebook; straight-through or rotation trick; k-means and restarts."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        cfg: VQConfig = as_kind_config(config)
        if cfg.use_ema:
            codebook = EMACodebook(cfg.ema_decay, cfg.ema_epsilon, cfg.l2_normalize)
        else:
            codebook = LearnedCodebook(cfg.l2_normalize, cfg.affine_lr if cfg.affine_reparam else None)
        estimator = VQEstimator(cfg.beta, rotation_trick if cfg.rotation_trick else straight_through,
                                codebook_term=codebook.gradient_trained, sync_nu=cfg.sync_nu)
        init = KMeansInit(cfg.kmeans_iters, spherical=cfg.l2_normalize) if cfg.kmeans_init else SyncInit()
        restart = (DeadCodeRestart(cfg.dead_code_threshold, cfg.restart_from,
                                   unit_length if cfg.l2_normalize else as_drawn)
                   if cfg.dead_code_threshold > 0 else None)
        super().__init__(cfg, codebook, _initial_codes, EuclideanSearch(), estimator, init, restart)


def _initial_codes(cfg: VQConfig) -> Tensor:
    """taming's uniform init (K, c)."""
    return uniform_codes(cfg.num_codes, cfg.lookup_dim)
