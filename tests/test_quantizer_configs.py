"""A config per quantizer kind (issue 22): the flat QuantizerConfig of recipes, checkpoints and tokenizer
folders maps to the kind's own frozen dataclass; the kinds are composed, not subclassed; the old import
paths still work with a DeprecationWarning that names the removal version."""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

import vqgan
from vqgan.config import from_dict
from vqgan.folder_format import parse_tokenizer_config
from vqgan.quantizers import (
    KIND_CONFIGS,
    KINDS,
    IBQConfig,
    QuantizerConfig,
    VQConfig,
    build_quantizer,
)
from vqgan.quantizers.config import unread_fields
from vqgan.train import load_train_config

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ROOT / "tests" / "fixtures" / "folders_v1"


def test_each_kind_config_holds_exactly_the_fields_its_kind_reads():
    flat = {f.name for f in dataclasses.fields(QuantizerConfig)}
    for kind in KINDS:
        own = {f.name for f in dataclasses.fields(KIND_CONFIGS[kind])}
        assert own <= flat and own | set(unread_fields(kind)) == flat
        assert KIND_CONFIGS[kind]().kind == kind
    assert "use_ema" not in {f.name for f in dataclasses.fields(IBQConfig)}
    assert "fsq_levels" in {f.name for f in dataclasses.fields(KIND_CONFIGS["fsq"])}


def test_each_kind_config_has_the_flat_configs_defaults_and_types():
    """The fields are declared in both forms; they must not drift apart."""
    flat = {f.name: f for f in dataclasses.fields(QuantizerConfig)}
    for kind in KINDS:
        for field in dataclasses.fields(KIND_CONFIGS[kind]):
            if field.name != "kind":
                assert (field.default, field.type) == (flat[field.name].default, flat[field.name].type), (kind, field.name)
        assert KIND_CONFIGS[kind]().flat() == QuantizerConfig(kind=kind)


def test_the_flat_config_maps_to_the_kinds_config_and_back():
    flat = QuantizerConfig(kind="vq", num_codes=64, dim=8, use_ema=True, dead_code_threshold=0, rotation_trick=True)
    kind = flat.kind_config
    assert isinstance(kind, VQConfig) and kind.use_ema and kind.rotation_trick and kind.num_codes == 64
    assert kind.flat() == flat
    with pytest.raises(dataclasses.FrozenInstanceError):
        kind.num_codes = 3


def test_a_kind_config_checks_its_values_as_the_flat_config_does():
    with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
        IBQConfig(beta=-1.0)
    with pytest.raises(ValueError, match="kind='lfq' needs num_codes = 2"):
        KIND_CONFIGS["lfq"](num_codes=12)
    with pytest.raises(ValueError, match=r"kind='fsq' does not read \['use_ema'\]"):
        QuantizerConfig(kind="fsq", num_codes=64, use_ema=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantizer_built_from_either_form_is_the_same(kind):
    flat = QuantizerConfig(kind=kind, num_codes=64, dim=8, code_dim=4 if kind in ("vq", "ibq", "simvq") else None)
    torch.manual_seed(0)
    a = build_quantizer(flat)
    torch.manual_seed(0)
    b = build_quantizer(flat.kind_config)
    assert a.config == b.config == flat.kind_config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_recipe_and_v1_folder_config_maps_to_its_kinds_config():
    seen = set()
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        if recipe.name.startswith("prior_") or "init_from:" in recipe.read_text():
            continue  # priors have no quantizer; the fine-tune recipe needs its folder (tests/test_recipes.py)
        quantizer = load_train_config(str(recipe), []).model.quantizer
        assert isinstance(quantizer.kind_config, KIND_CONFIGS[quantizer.kind])
        seen.add(quantizer.kind)
    assert {"vq", "ibq", "lfq"} <= seen
    for folder in sorted(FOLDERS.iterdir()):
        config = parse_tokenizer_config(json.loads((folder / "config.json").read_text()))
        assert type(config.quantizer.kind_config) is KIND_CONFIGS[config.quantizer.kind]


def test_no_kind_subclasses_another():
    from vqgan.quantizers import (FiniteScalarQuantizer, IndexBackpropQuantizer, LookupFreeQuantizer,
                                  MultiScaleResidualQuantizer, SimVQ, VectorQuantizer)

    classes = [VectorQuantizer, IndexBackpropQuantizer, SimVQ, FiniteScalarQuantizer, LookupFreeQuantizer,
               MultiScaleResidualQuantizer]
    for cls in classes:
        assert not any(issubclass(cls, other) for other in classes if other is not cls), cls


@pytest.mark.parametrize(("module", "name", "new_home"), [
    ("vqgan.quantize", "VectorQuantizer", "vqgan.quantizers"),
    ("vqgan.quantize", "QuantizerConfig", "vqgan.quantizers"),
    ("vqgan.quantize_utils", "nearest_code", "vqgan.quantizers.search"),
    ("vqgan.quantize_utils", "kmeans", "vqgan.quantizers.kmeans"),
    ("vqgan.quantize_utils", "rotation_trick", "vqgan.quantizers.estimators"),
    ("vqgan.quantize_utils", "perplexity", "vqgan.quantizers.entropy"),
    ("vqgan.quantize_utils", "all_gather_rows", "vqgan.quantizers.distributed"),
])
def test_old_import_paths_warn_with_the_removal_version(module, name, new_home):
    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated and will be removed in vqgan 0\.2: "
                                                rf"import it from {new_home} instead"):
        value = getattr(old, name)
    assert value is getattr(importlib.import_module(new_home), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(old, "nope")


def test_public_names_resolve_without_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in vqgan.__all__:
            if name != "__version__":
                assert getattr(vqgan, name) is not None
    assert vqgan.VectorQuantizer is importlib.import_module("vqgan.quantizers").VectorQuantizer
    assert from_dict(vqgan.QuantizerConfig, {"kind": "simvq"}).kind_config.kind == "simvq"
