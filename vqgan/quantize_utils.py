"""Deprecated import path: the quantizer helpers live in `vqgan.quantizers`, one module per concern
(search, kmeans, entropy, estimators, distributed). Every name still resolves, with a DeprecationWarning;
this module will be removed in vqgan 0.2.
"""

from __future__ import annotations

from vqgan.utils import deprecated_names

REMOVAL_VERSION = "0.2"
# old name -> the module that holds it now
_MOVED = {
    "squared_distances": "vqgan.quantizers.search",
    "chunk_rows": "vqgan.quantizers.search",
    "nearest_code": "vqgan.quantizers.search",
    "kmeans_plus_plus": "vqgan.quantizers.kmeans",
    "kmeans": "vqgan.quantizers.kmeans",
    "rotation_trick": "vqgan.quantizers.estimators",
    "entropy_penalty": "vqgan.quantizers.entropy",
    "distribution_entropy": "vqgan.quantizers.entropy",
    "histogram": "vqgan.quantizers.entropy",
    "perplexity": "vqgan.quantizers.entropy",
    "all_reduce_sum": "vqgan.quantizers.distributed",
    "broadcast_from_rank0": "vqgan.quantizers.distributed",
    "is_rank0": "vqgan.quantizers.distributed",
    "all_gather_rows": "vqgan.quantizers.distributed",
}


__getattr__ = deprecated_names(__name__, _MOVED, REMOVAL_VERSION)


def __dir__() -> list[str]:
    return sorted(_MOVED)
