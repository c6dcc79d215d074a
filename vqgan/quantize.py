"""The quantizer layer: kept as the import path of the config, the output type and the VQ layer.

The kinds live in `vqgan/quantizers/` (one module each); `build_quantizer(config)` picks one by
`config.kind`.
"""

from vqgan.quantizers import (  # noqa: F401
    KINDS,
    FiniteScalarQuantizer,
    IndexBackpropQuantizer,
    LookupFreeQuantizer,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
)
