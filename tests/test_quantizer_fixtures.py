"""Compatibility with what earlier versions wrote and did (issue 22): fixtures made by
tests/fixtures/make_quantizer_fixtures.py with the code of main at 684344a (FORMAT_VERSION 1).

- Every tokenizer folder of that version (one per quantizer variant, training buffers included) loads,
  and gives the recorded ids and decode bit for bit.
- Every quantizer variant, trained a few steps from the same seed on the same inputs, gives the recorded
  outputs, losses, gradients and final state bit for bit: restructuring the quantizers moved no figure.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vqgan.config import from_dict
from vqgan.tokenizer import VQTokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_quantizer_fixtures", FIXTURES / "make_quantizer_fixtures.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

VARIANTS = sorted(make.VARIANTS)


def assert_bitwise(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, (
        f"{what}: {got.dtype} {tuple(got.shape)} vs recorded {expected.dtype} {tuple(expected.shape)}")
    assert torch.equal(got, expected), f"{what}: differs from the recorded value (max |diff| " \
        f"{(got.double() - expected.double()).abs().max().item():.3g})"


def test_every_variant_has_fixtures():
    assert sorted(p.name for p in (FIXTURES / "folders_v1").iterdir()) == VARIANTS
    assert sorted(p.stem for p in (FIXTURES / "quantizer_traces_v1").iterdir()) == VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_of_format_v1_loads_to_the_same_ids_and_decode(variant):
    folder = FIXTURES / "folders_v1" / variant
    expected = load_file(str(folder / "expected.safetensors"))
    tokenizer = VQTokenizer.from_pretrained(folder)
    ids = tokenizer.encode(expected["images"])
    assert_bitwise(ids, expected["ids"], f"{variant} encode")
    assert_bitwise(tokenizer.decode(expected["ids"]), expected["decoded"], f"{variant} decode")


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_trace_is_bitwise_the_recorded_one(variant):
    from vqgan.quantizers import QuantizerConfig, build_quantizer

    path = FIXTURES / "quantizer_traces_v1" / f"{variant}.safetensors"
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    recorded = load_file(str(path))
    config = from_dict(QuantizerConfig, json.loads(meta["config"]))
    torch.manual_seed(int(meta["seed"]))
    quantizer = build_quantizer(config)
    got = make.run_trace(quantizer, make.trace_inputs(int(meta["inputs_seed"])))
    # The final state: compared as the state a checkpoint keeps (names and values).
    assert sorted(got) == sorted(recorded), (f"{variant}: recorded {sorted(set(recorded) - set(got))} missing, "
                                             f"new {sorted(set(got) - set(recorded))}")
    for key in sorted(recorded):
        assert_bitwise(got[key], recorded[key], f"{variant} {key}")
