"""IBQ (SEED-Voken, Shi et al. 2024, arXiv:2412.02692) checkpoints -> our tokenizer with quantizer kind "ibq".

SEED-Voken's IBQ is taming's VQModel with `IndexPropagationQuantize` (argmax of z.e, the same
`quantize.embedding.weight`), and its Encoder/Decoder file is taming's. Released checkpoints carry EMA
weights as LitEma buffers `model_ema.<name without dots>`; `ema=True` (the default when present)
converts those, rebuilding each name from the generator's own keys. (Its `l2_normalize` and
`cosine_similarity` options reach no computation of IndexPropagationQuantize's forward, so they
change nothing here.)
"""

from __future__ import annotations

from pathlib import Path

from vqgan.convert.common import Converted, unwrap_checkpoint
from vqgan.convert.safe_load import read_state_dict_file
from vqgan.convert.taming import convert_taming_state, read_yaml_config


def convert_ibq(ckpt: str | Path, config: str | Path | None = None, *, resolution: int | None = None,
                ema: bool | None = None) -> Converted:
    """An IBQ `.ckpt` (+ optional yaml) -> Converted; ema=None: the EMA weights when the checkpoint has them."""
    state = unwrap_checkpoint(read_state_dict_file(ckpt), str(ckpt))
    if ema is None:
        ema = any(key.startswith("model_ema.") for key in state)
    yaml_config = read_yaml_config(config) if config is not None else None
    return convert_taming_state(state, yaml_config=yaml_config, resolution=resolution, kind="ibq", ema=ema,
                                source=str(ckpt), source_kind="ibq")
