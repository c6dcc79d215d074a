from dataclasses import dataclass, field
from typing import Literal

import pytest

from vqgan.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass(frozen=True)
class Inner:
    width: int = 8
    mult: tuple[int, ...] = (1, 2)
    rate: float = 0.1


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    kind: Literal["a", "b"] = "a"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_round_trip_and_tuples():
    cfg = from_dict(Outer, {"name": "x", "inner": {"mult": [1, 2, 4], "rate": 1}})
    assert cfg.inner.mult == (1, 2, 4) and isinstance(cfg.inner.mult, tuple)
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"inner\.widht.*valid keys: mult, rate, width"):
        from_dict(Outer, {"inner": {"widht": 3}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"width": "8"}}, r"inner\.width: expected an integer"),
        ({"inner": {"width": True}}, r"inner\.width: expected an integer"),
        ({"kind": "c"}, r"kind: 'c' is not one of \['a', 'b'\]"),
        ({"limit": 1.5}, r"limit"),
        ({"inner": {"mult": [1, "x"]}}, r"inner\.mult\[1\]"),
        ({"inner": 3}, r"inner: expected a mapping"),
    ],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_optional_accepts_none_and_value():
    assert from_dict(Outer, {"limit": None}).limit is None
    assert from_dict(Outer, {"limit": 5}).limit == 5


def test_overrides_parse_yaml_values():
    data = apply_overrides({"inner": {"width": 8}}, ["inner.width=16", "inner.mult=[1, 3]", "name=hello", "inner.rate=1e-3"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.width == 16 and cfg.inner.mult == (1, 3) and cfg.name == "hello" and cfg.inner.rate == 1e-3
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.width"])


def test_load_and_save_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\ninner:\n  width: 4\n  rate: 1e-4\n")
    assert load_config(Outer, recipe).inner.rate == 1e-4  # YAML 1.1 alone would read the string "1e-4"
    cfg = load_config(Outer, recipe, ["inner.rate=0.5"])
    assert cfg == Outer(name="a", inner=Inner(width=4, rate=0.5))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown config key typo"):
        load_config(Outer, recipe, ["typo=1"])


@dataclass(frozen=True)
class Pair:
    betas: tuple[float, int] = (0.9, 1)


def test_fixed_length_tuple_converts_each_item_with_its_own_type():
    assert from_dict(Pair, {"betas": [0.5, 2]}).betas == (0.5, 2)
    with pytest.raises(ConfigError, match=r"betas\[1\]: expected an integer"):
        from_dict(Pair, {"betas": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="expected 2 items, got 3"):
        from_dict(Pair, {"betas": [0.5, 1, 2]})


def test_atomic_write_replaces_whole_file_with_usual_permissions(tmp_path):
    import os
    import stat

    from vqgan.utils import atomic_write_text

    target = tmp_path / "out" / "summary.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
