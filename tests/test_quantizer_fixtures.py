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


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_v1_folder_saved_again_holds_no_training_state_and_decodes_the_same(variant, tmp_path):
    from vqgan.folder_format import FORMAT_VERSION
    from vqgan.training_state import training_state_keys

    folder = FIXTURES / "folders_v1" / variant
    expected = load_file(str(folder / "expected.safetensors"))
    old_keys = set(load_file(str(folder / "model.safetensors")))
    tokenizer = VQTokenizer.from_pretrained(folder)
    declared = training_state_keys(tokenizer.model)
    assert declared & old_keys  # format 1 carried the quantizer's training state
    again = tokenizer.save_pretrained(tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["format_version"] == FORMAT_VERSION == 2
    assert set(load_file(str(again / "model.safetensors"))) == old_keys - declared
    reloaded = VQTokenizer.from_pretrained(again)
    assert_bitwise(reloaded.encode(expected["images"]), expected["ids"], f"{variant} encode after re-save")
    assert_bitwise(reloaded.decode(expected["ids"]), expected["decoded"], f"{variant} decode after re-save")


@pytest.mark.parametrize("variant", ["vq_ema", "vq", "ibq"])
def test_a_folder_as_init_from_trains_on_from_its_codes(variant):
    """init_from loads a folder's weights; the training state it lacks is derived from them: the codebook
    counts as initialised (no k-means over trained codes), EMA sums restart at the codes."""
    from vqgan.autoencoder import VQModel
    from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
    from vqgan.folder_format import read_tokenizer_config
    from vqgan.training.init_from import load_initial_weights

    folder = FIXTURES / "folders_v1" / variant
    config, _ = read_tokenizer_config(folder / "config.json")
    folder_weights = load_file(str(folder / "model.safetensors"))
    torch.manual_seed(1)
    model = VQModel(config)
    disc_config = DiscriminatorConfig(base_channels=8, num_layers=1)
    load_initial_weights(model, PatchDiscriminator(disc_config), config, disc_config, str(folder))
    q = model.quantizer
    assert bool(q.initialized) and q._initialized and int(q.step) == 0
    assert torch.equal(q.weight, folder_weights["quantizer.weight"])
    if config.quantizer.use_ema:
        assert torch.equal(q.cluster_size, torch.ones_like(q.cluster_size)) and torch.equal(q.embed_avg, q.weight)
    model.train()
    before = q.codebook.detach().clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16) * 2 - 1)
    # one training forward: no k-means rewrites trained codes, and (the folder's codes being young at step 0)
    # no restart either; an EMA codebook takes one small step from its codes, not from fresh random sums
    after = q.codebook.detach()
    if config.quantizer.use_ema:
        assert float((after - before).norm()) < 0.1 * float(before.norm())
    else:
        assert torch.equal(after, before)
