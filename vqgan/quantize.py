"""Deprecated import path: the quantizers live in `vqgan.quantizers` (one module per concern).

`from vqgan.quantize import X` still works for every name it held, with a DeprecationWarning;
this module will be removed in vqgan 0.2.
"""

from __future__ import annotations

from vqgan.utils import deprecated_names

REMOVAL_VERSION = "0.2"
_MOVED = {name: "vqgan.quantizers" for name in (
    "KINDS", "FiniteScalarQuantizer", "IndexBackpropQuantizer", "LookupFreeQuantizer", "Quantizer",
    "QuantizerConfig", "QuantizerOutput", "SimVQ", "VectorQuantizer", "build_quantizer")}
__getattr__ = deprecated_names(__name__, _MOVED, REMOVAL_VERSION)


def __dir__() -> list[str]:
    return sorted(_MOVED)
