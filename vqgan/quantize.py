"""Deprecated import path: the quantizers live in `vqgan.quantizers` (one module per concern).

`from vqgan.quantize import X` still works for every name it held, with a DeprecationWarning;
this module will be removed in vqgan 0.6.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

REMOVAL_VERSION = "0.6"
_NAMES = ("KINDS", "FiniteScalarQuantizer", "IndexBackpropQuantizer", "LookupFreeQuantizer", "Quantizer",
          "QuantizerConfig", "QuantizerOutput", "SimVQ", "VectorQuantizer", "build_quantizer")


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'vqgan.quantize' has no attribute {name!r}")
    warnings.warn(f"vqgan.quantize is deprecated and will be removed in vqgan {REMOVAL_VERSION}; "
                  f"import {name} from vqgan.quantizers", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("vqgan.quantizers"), name)


def __dir__() -> list[str]:
    return sorted(_NAMES)
