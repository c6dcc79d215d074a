"""kind="simvq": SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer", arXiv:2411.02038).

The K codes are a frozen random matrix C (K, c) times one learned linear map (codebooks.MappedCodebook);
the nearest-code search, losses and estimator are VQ's. Nothing is written into the codebook, so there
is no k-means and no restart: the map does their job.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqgan.quantizers.codebooks import MappedCodebook, uniform_codes
from vqgan.quantizers.config import KindConfig, QuantizerConfig, SimVQConfig, as_kind_config
from vqgan.quantizers.estimators import VQEstimator, rotation_trick, straight_through
from vqgan.quantizers.lookup import CodebookQuantizer
from vqgan.quantizers.maintenance import SyncInit
from vqgan.quantizers.search import EuclideanSearch


class SimVQ(CodebookQuantizer):
    """Frozen random codes through a learned linear map; nothing is written into the codebook."""

    def __init__(self, config: QuantizerConfig | KindConfig):
        cfg: SimVQConfig = as_kind_config(config)
        estimator = VQEstimator(cfg.beta, rotation_trick if cfg.rotation_trick else straight_through)
        super().__init__(cfg, MappedCodebook(cfg.l2_normalize), _initial_codes, EuclideanSearch(),
                         estimator, SyncInit())


def _initial_codes(cfg: SimVQConfig) -> Tensor:
    """The paper's init: N(0, 1/c) codes (K, c). NOTE: drawn after a uniform draw of the same shape, as the
    versions that built SimVQ over VQ's init did, so that a seed builds the same codebook and map."""
    uniform_codes(cfg.num_codes, cfg.lookup_dim)
    return torch.randn(cfg.num_codes, cfg.lookup_dim) * cfg.lookup_dim**-0.5
