"""kind="simvq": SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer", arXiv:2411.02038).

The K codes are a frozen random matrix C (K, c) times one learned linear map: codes = C W^T + b.
Every step's codebook gradient moves W, so every code moves with it and none is left dead; the
nearest-code search, losses and estimator are VQ's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgan.quantize_utils import broadcast_from_rank0
from vqgan.quantizers.config import QuantizerConfig
from vqgan.quantizers.vq import VectorQuantizer


class SimVQ(VectorQuantizer):
    """Frozen random codes through a learned linear map; nothing is written into the codebook."""

    writable_codebook = False  # no k-means, no restarts: the map does their job

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        num_codes, width = config.num_codes, config.lookup_dim
        del self.weight
        # The paper's init: N(0, 1/c) codes, frozen (a buffer: no gradient, no optimizer state).
        self.register_buffer("weight", torch.randn(num_codes, width) * width**-0.5)
        self.code_map = nn.Linear(width, width)

    @property
    def codebook(self) -> Tensor:
        """(K, c) C W^T + b, normalised with l2_normalize."""
        codes = self.code_map(self.weight)
        return F.normalize(codes, dim=1) if self.config.l2_normalize else codes

    def _broadcast_codebook(self) -> None:
        for tensor in (self.weight, self.code_map.weight, self.code_map.bias):
            broadcast_from_rank0(tensor.data)
