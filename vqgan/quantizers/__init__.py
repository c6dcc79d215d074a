"""Quantizer kinds behind one interface: every kind takes z (B, D, H, W), returns a QuantizerOutput
with one index per position, and rebuilds the quantized tensor from indices (`indices_to_codes`).

    vq     nearest code, straight-through (VQ-VAE)              vqgan/quantizers/vq.py
    simvq  frozen random codes times one learned linear map     vqgan/quantizers/simvq.py
    ibq    nearest code by inner product, softmax straight-through to every code   ibq.py
    fsq    bounded per-channel rounding to fixed levels         vqgan/quantizers/fsq.py
    lfq    sign bits, entropy penalty                           vqgan/quantizers/lfq.py
    msvq   VAR's multi-scale residual codes, (B, Σ s²) ids       vqgan/quantizers/msvq.py
"""

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.config import KINDS, QuantizerConfig
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


def build_quantizer(config: QuantizerConfig) -> Quantizer:
    """The quantizer module of `config.kind`."""
    if config.kind not in _BY_KIND:
        raise ValueError(f"unknown quantizer kind {config.kind!r}; valid kinds: {list(KINDS)}")
    return _BY_KIND[config.kind](config)


__all__ = ["KINDS", "FiniteScalarQuantizer", "IndexBackpropQuantizer", "LookupFreeQuantizer", "MultiScaleResidualQuantizer",
           "Quantizer",
           "QuantizerConfig", "QuantizerOutput", "SimVQ", "VectorQuantizer", "build_quantizer"]
