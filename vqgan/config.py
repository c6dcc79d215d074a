"""Typed configs: frozen dataclasses built from YAML recipes and dotted `key=value` overrides.

Every config in the toolkit is a frozen dataclass. `from_dict` builds one from plain data and checks
every key and type on the way, so a typo in a recipe is an error that names the key and lists the
valid ones instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes mean a float (a known PyYAML quirk, yaml/pyyaml#173)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A plain (unquoted) YAML scalar as written and as YAML 1.1 reads it; the field it lands in chooses.

    YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans and `1e-4` as a number, so
    `train.mixed_precision=no` would reach a string field as False. Recipes and overrides keep the
    text beside the reading until `from_dict` knows the field's type: a string field takes the text,
    any other field the reading.
    """

    text: str
    value: Any


class _TextKeepingLoader(_Loader):
    """The recipe loader: every plain scalar becomes a `Scalar`; mapping keys stay plain strings."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep=deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None:
            return Scalar(node.value, value)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # `<<` merge keys, as SafeLoader does
        mapping = {}
        for key_node, value_node in node.value:
            key = plain_value(self.construct_object(key_node, deep=True))
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_TextKeepingLoader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: loader.construct_mapping(node, deep=True))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_TextKeepingLoader)  # noqa: S506 - a SafeLoader subclass


def plain_value(value: Any) -> Any:
    """`value` with every `Scalar` replaced by its YAML 1.1 reading (for fields typed Any or dict)."""
    if isinstance(value, Scalar):
        return value.value
    if isinstance(value, dict):
        return {plain_value(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(v) for v in value)
    return value


def _read_scalar(scalar: Scalar, tp: Any) -> Any:
    """The text for a string field (or a Literal that lists it), the YAML reading for any other."""
    if tp is str and scalar.value is not None:
        return scalar.text
    if typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(tp)):
        return scalar.text
    return scalar.value


class ConfigError(ValueError):
    """A recipe or override that does not fit the config dataclass."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return plain_value(value)
    if origin in (typing.Union, types.UnionType):
        if plain_value(value) is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {plain_value(value)!r} is not a {_type_name(tp)}")
    if isinstance(value, Scalar):
        value = _read_scalar(value, tp)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(plain_value(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a required field without a default, or a failed __post_init__ check
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON/YAML-ready data of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML, so 3, 1e-4, true, [1, 2] work).

    Plain scalars come back as `Scalar`s: the field's type decides between the text and the reading,
    so `train.mixed_precision=no` stays the string "no" and `train.compile=no` is False.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = _yaml_load(raw) if raw.strip() else Scalar("", "")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of nested `data` with dotted overrides applied (new keys are checked later)."""
    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_recipe(path: str | Path | None) -> dict[str, Any]:
    """A YAML recipe as plain nested data (an empty mapping when `path` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        loaded = _yaml_load(path.read_text())
    except yaml.YAMLError as err:  # a parser traceback names PyYAML's internals; the user needs file:line
        raise ConfigError(yaml_error_text(path, err)) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(loaded).__name__}")
    return loaded or {}


def yaml_error_text(path: Path, err: yaml.YAMLError) -> str:
    """'FILE:LINE:COLUMN: problem' of a PyYAML error (lines and columns counted from 1, as editors do)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = " ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem} (fix the recipe at that line)"


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start from defaults when `path` is None), apply overrides, build `cls`."""
    return from_dict(cls, apply_overrides(read_recipe(path), overrides))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from vqgan.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
