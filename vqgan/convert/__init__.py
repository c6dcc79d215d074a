"""Import released tokenizers (taming, IBQ, LlamaGen, diffusers) as vqgan tokenizer folders, and export ours.

    from vqgan.convert import convert
    convert("taming", "last.ckpt", "out/taming_f16", config="model.yaml")
    tok = VQTokenizer.from_pretrained("out/taming_f16")

Each source lives in its own module and returns a `Converted` (our config + our state dict); one safe
reader opens every pickle (vqgan/convert/safe_load.py) and one key map names every weight both ways
(vqgan/convert/keymap.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from vqgan.convert.common import Converted, write_converted
from vqgan.convert.keymap import ConversionError

# source kind -> (module, function); imported on use so that `vqgan-convert --help` stays light
SOURCES: dict[str, tuple[str, str]] = {
    "taming": ("vqgan.convert.taming", "convert_taming"),
    "ibq": ("vqgan.convert.ibq", "convert_ibq"),
    "llamagen": ("vqgan.convert.llamagen", "convert_llamagen"),
    "diffusers": ("vqgan.convert.diffusers_vq", "convert_diffusers"),
    "var": ("vqgan.convert.var", "convert_var"),
}


def load_source(kind: str, src: str | Path, **options: Any) -> Converted:
    """Read `src` as a checkpoint of `kind` into a Converted (nothing written)."""
    if kind not in SOURCES:
        raise ConversionError(f"unknown source kind {kind!r}; valid: {', '.join(SOURCES)}")
    module, function = SOURCES[kind]
    return getattr(importlib.import_module(module), function)(src, **options)


def convert(kind: str, src: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Convert `src` (a checkpoint of `kind`) into the tokenizer folder `out_dir`; returns the folder."""
    return write_converted(load_source(kind, src, **options), out_dir)


__all__ = ["SOURCES", "ConversionError", "Converted", "convert", "load_source"]
