"""Every shipped recipe must load into its config dataclass: a typo in a recipe is caught here, not on a GPU."""

from pathlib import Path

import pytest

from vqgan.config import ConfigError, load_config
from vqgan.train import TrainConfig, load_train_config
from vqgan.train_prior import PriorTrainConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "prior_quickstart.yaml", "cifar10_f4.yaml", "ffhq256_f16.yaml",
            "imagenet256_f16_l2.yaml", "imagenet256_f8.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    if recipe.name.startswith("prior_"):
        config = load_config(PriorTrainConfig, recipe)
        model = config.transformer if config.prior == "transformer" else config.pixelcnn
        assert model.num_codes > 1
    else:
        config = load_train_config(str(recipe), [])
        assert isinstance(config, TrainConfig)
        assert config.model.quantizer.dim == config.model.autoencoder.z_channels


def test_llamagen_recipe_has_large_l2_lowdim_codebook():
    config = load_train_config("recipes/imagenet256_f16_l2.yaml", [])
    q = config.model.quantizer
    assert (q.num_codes, q.code_dim, q.l2_normalize) == (16384, 8, True)
    assert config.model.downsample_factor == 16
    assert config.optim.betas == (0.9, 0.95)


def test_unknown_recipe_key_names_it(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stpes.*valid keys:.*steps"):
        load_train_config(str(recipe), [])
    with pytest.raises(ConfigError, match=r"model\.quantizer\.num_code\b"):
        load_train_config("recipes/quickstart.yaml", ["model.quantizer.num_code=3"])


def test_invalid_value_is_a_config_error_naming_the_section():
    with pytest.raises(ConfigError, match=r"model\.quantizer: .*beta"):
        load_train_config("recipes/quickstart.yaml", ["model.quantizer.beta=-1"])


def test_categorical_decoder_and_loss_must_agree():
    with pytest.raises(ConfigError, match=r"output='categorical' needs loss\.reconstruction_kind='categorical'"):
        load_train_config("recipes/quickstart.yaml", ["model.autoencoder.output=categorical"])
    config = load_train_config("recipes/quickstart.yaml",
                               ["model.autoencoder.output=categorical", "loss.reconstruction_kind=categorical"])
    assert config.loss.reconstruction_kind == "categorical"
