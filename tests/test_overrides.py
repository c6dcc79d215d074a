"""Overrides and recipe values are read by the type of the field they land in (YAML 1.1 alone reads
`no` as False and `1e-4` as a number), and every override form the README documents loads."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from vqgan.config import ConfigError, apply_overrides, from_dict, load_config
from vqgan.train import load_train_config
from vqgan.train_prior import PriorTrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fields:
    precision: Literal["launcher", "no", "bf16", "fp16"] = "launcher"
    name: str = "run"
    flag: bool = False
    rate: float = 0.1
    maybe: str | None = None
    extra: dict[str, Any] | None = None


@pytest.mark.parametrize("text", ["no", "off", "yes", "on", "1e-4", "007", "true"])
def test_a_string_field_keeps_the_text_as_typed(text):
    assert from_dict(Fields, apply_overrides({}, [f"name={text}"])).name == text


def test_null_is_still_no_string():
    with pytest.raises(ConfigError, match="name: expected a string, got None"):
        from_dict(Fields, apply_overrides({}, ["name=null"]))


def test_a_literal_field_keeps_the_text_and_names_it_when_wrong():
    assert from_dict(Fields, apply_overrides({}, ["precision=no"])).precision == "no"
    with pytest.raises(ConfigError, match=r"precision: 'off' is not one of \['launcher', 'no', 'bf16', 'fp16'\]"):
        from_dict(Fields, apply_overrides({}, ["precision=off"]))


@pytest.mark.parametrize("text, value", [("no", False), ("off", False), ("yes", True), ("on", True), ("true", True)])
def test_a_boolean_field_takes_the_yaml_words(text, value):
    assert from_dict(Fields, apply_overrides({}, [f"flag={text}"])).flag is value


def test_numbers_optionals_and_mappings_keep_their_reading():
    cfg = from_dict(Fields, apply_overrides({}, ["rate=1e-4", "maybe=null", "extra={a: no, b: [1, on]}"]))
    assert cfg.rate == 1e-4 and cfg.maybe is None and cfg.extra == {"a": False, "b": [1, True]}
    assert from_dict(Fields, apply_overrides({}, ["maybe=off"])).maybe == "off"
    with pytest.raises(ConfigError, match="rate: expected a number"):
        from_dict(Fields, apply_overrides({}, ["rate=fast"]))


def test_a_recipe_file_is_read_by_field_type_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("precision: no\nname: off\nflag: yes\nrate: 1e-4\n")
    assert load_config(Fields, recipe) == Fields(precision="no", name="off", flag=True, rate=1e-4)


def test_mixed_precision_no_as_the_readme_writes_it():
    quickstart = ROOT / "recipes" / "quickstart.yaml"
    assert load_train_config(str(quickstart), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    prior = load_config(PriorTrainConfig, ROOT / "recipes" / "prior_quickstart.yaml", ["train.mixed_precision=no"])
    assert prior.train.mixed_precision == "no"


def readme_overrides() -> list[str]:
    """Every `section.key=value` the README writes (in prose or in a command), quotes removed."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"(?<![\w./-])((?:[a-z_]+\.)+[a-z_]+=[^\s`]*)", text)
    return sorted({form.strip("'\"") for form in found})


# What an override needs beside it to make sense (the README says streams read hub datasets or folders).
COMPANIONS = {"data.streaming": ["data.source=some/folder"]}


@pytest.mark.parametrize("override", readme_overrides())
def test_every_override_the_readme_documents_loads(override):
    """The tokenizer trainer or the prior trainer accepts it with the recipe the README pairs it with."""
    companions = COMPANIONS.get(override.split("=", 1)[0], [])
    try:
        load_train_config(str(ROOT / "recipes" / "quickstart.yaml"), [*companions, override])
    except ConfigError as tokenizer_error:
        if "unknown config key" not in str(tokenizer_error):
            raise
        load_config(PriorTrainConfig, ROOT / "recipes" / "prior_quickstart.yaml", [override])


def test_the_readme_documents_the_forms_this_file_was_written_for():
    forms = readme_overrides()
    assert "train.mixed_precision=no" in forms and "optim.lr=1e-4" in forms and len(forms) >= 8
