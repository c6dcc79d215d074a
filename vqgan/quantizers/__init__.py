"""Quantizer kinds behind one interface: every kind takes z (B, D, H, W), returns a QuantizerOutput
with one index per position (msvq: one sequence of Σ s² ids over its scales), and rebuilds the quantized
tensor from indices (`indices_to_codes`).

    vq     nearest code, straight-through (VQ-VAE)                             vq.py
    simvq  frozen random codes times one learned linear map                    simvq.py
    ibq    largest inner product, softmax straight-through to every code       ibq.py
    fsq    bounded per-channel rounding to fixed levels                        fsq.py
    lfq    sign bits, entropy penalty                                          lfq.py
    msvq   VAR's multi-scale residual codes, (B, Σ s²) ids                     msvq.py

Each kind is a few lines that choose its parts. The lookup kinds (vq, simvq, ibq): a stored codebook
(codebooks.py), a search (search.py), a gradient estimator (estimators.py) and maintenance
(maintenance.py), for the one forward in lookup.py; msvq chooses the same parts and adds only its scales,
phi convs and residual loop (its own forward). The grid kinds (fsq, lfq): an implicit grid
(grids.py) and a commitment weight, for the forward in rounding.py. Helpers: kmeans.py, entropy.py,
product_entropy.py, distributed.py. Each kind has its
config (config.py: VQConfig, SimVQConfig, IBQConfig, FSQConfig, LFQConfig, MSVQConfig); QuantizerConfig is the flat
form recipes and config.json spell, mapped to the kind's by `kind_config`.
"""

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import (
    KIND_CONFIGS,
    KINDS,
    FSQConfig,
    IBQConfig,
    KindConfig,
    LFQConfig,
    MSVQConfig,
    QuantizerConfig,
    SimVQConfig,
    VQConfig,
    as_kind_config,
)
from vqgan.quantizers.fsq import FiniteScalarQuantizer
from vqgan.quantizers.ibq import IndexBackpropQuantizer
from vqgan.quantizers.lfq import LookupFreeQuantizer
from vqgan.quantizers.msvq import MultiScaleResidualQuantizer
from vqgan.quantizers.simvq import SimVQ
from vqgan.quantizers.vq import VectorQuantizer

_BY_KIND: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "simvq": SimVQ,
    "ibq": IndexBackpropQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
    "msvq": MultiScaleResidualQuantizer,
}
assert set(_BY_KIND) == set(KINDS)


def build_quantizer(config: QuantizerConfig | KindConfig) -> Quantizer:
    """The quantizer module of `config.kind` (from the flat QuantizerConfig or the kind's own config)."""
    if config.kind not in _BY_KIND:
        raise ValueError(f"unknown quantizer kind {config.kind!r}; valid kinds: {list(KINDS)}")
    return _BY_KIND[config.kind](as_kind_config(config))


__all__ = ["KINDS", "KIND_CONFIGS", "FSQConfig", "FiniteScalarQuantizer", "IBQConfig", "IndexBackpropQuantizer",
           "KindConfig", "LFQConfig", "LookupFreeQuantizer", "MSVQConfig", "MultiScaleResidualQuantizer", "Quantizer",
           "QuantizerConfig", "QuantizerOutput", "SimVQ", "SimVQConfig", "VQConfig", "VectorQuantizer",
           "as_kind_config", "build_quantizer"]
