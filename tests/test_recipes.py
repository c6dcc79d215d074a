"""Every shipped recipe must load into its config dataclass: a typo in a recipe is caught here, not on a GPU."""

from pathlib import Path

import pytest
import yaml

from convert_helpers import llamagen_vq16_folder
from vqgan.config import ConfigError, load_config
from vqgan.train import TrainConfig, load_train_config
from vqgan.train_prior import PriorTrainConfig, prior_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
PRIOR_RECIPES = [p for p in RECIPES if p.name.startswith("prior_")]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "prior_quickstart.yaml", "prior_quickstart_maskgit.yaml", "cifar10_f4.yaml", "ffhq256_f16.yaml",
            "imagenet256_f16_l2.yaml", "imagenet256_f8.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe, tmp_path):
    if recipe.name.startswith("prior_"):
        config = load_config(PriorTrainConfig, recipe)
        model = prior_config(config)
        assert model.num_codes > 1
    else:
        overrides = []
        if "init_from:" in recipe.read_text():  # a fine-tune recipe: the converted folder it names
            overrides = [f"model.init_from={llamagen_vq16_folder(tmp_path / 'llamagen_vq16')}"]
        config = load_train_config(str(recipe), overrides)
        assert isinstance(config, TrainConfig)
        if config.init_from:  # LlamaGen's layout: quant_conv maps z (256) to the 8-dim codes
            assert (config.model.autoencoder.z_channels, config.model.quantizer.dim) == (256, 8)
            assert config.model.quantizer.l2_normalize and config.model.quantizer.num_codes == 16384
        else:
            assert config.model.quantizer.dim == config.model.autoencoder.z_channels


def test_llamagen_recipe_has_large_l2_lowdim_codebook():
    config = load_train_config("recipes/imagenet256_f16_l2.yaml", [])
    q = config.model.quantizer
    assert (q.num_codes, q.code_dim, q.l2_normalize) == (16384, 8, True)
    assert config.model.downsample_factor == 16
    assert config.optim.betas == (0.9, 0.95)


def test_llamagen_recipe_uses_its_fixed_gan_weight_and_losses():
    """FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_train.py defaults, VQLoss(disc_adaptive_weight=False)."""
    config = load_train_config("recipes/imagenet256_f16_l2.yaml", [])
    loss = config.loss
    assert loss.use_adaptive_weight is False
    assert (loss.disc_weight, loss.disc_start, loss.disc_loss) == (0.5, 20000, "hinge")
    assert (loss.reconstruction_kind, loss.reconstruction_weight, loss.perceptual_weight) == ("l2", 1.0, 1.0)
    assert config.model.quantizer.beta == 0.25
    for optim in (config.optim, config.disc_optim):
        assert (optim.lr, optim.betas, optim.grad_clip, optim.schedule) == (1e-4, (0.9, 0.95), 1.0, "constant")


def test_ffhq_lr_is_taming_base_lr_times_effective_batch():
    """taming main.py: learning_rate = accumulate_grad_batches * ngpu * batch_size * base_lr (base 4.5e-6)."""
    config = load_train_config("recipes/ffhq256_f16.yaml", [])
    gpus = 8  # the recipe's stated hardware
    effective_batch = gpus * config.train.batch_size * config.train.grad_accum_steps
    assert effective_batch == 96
    assert config.optim.lr == pytest.approx(4.5e-6 * effective_batch)
    assert config.disc_optim.lr == pytest.approx(4.5e-6 * effective_batch)


def tokenizer_recipe(tokenizer_path: str):
    """The shipped tokenizer recipe whose run exports `tokenizer_path` (run_dir/tokenizer), or None."""
    for recipe in RECIPES:
        if recipe.name.startswith("prior_"):
            continue
        # run_dir read from the YAML first: a fine-tune recipe loads only beside the folder it starts from
        if f"{yaml.safe_load(recipe.read_text()).get('run_dir')}/tokenizer" != tokenizer_path:
            continue
        config = load_train_config(str(recipe), [])
        if f"{config.run_dir}/tokenizer" == tokenizer_path:
            return config
    return None


@pytest.mark.parametrize("recipe", PRIOR_RECIPES, ids=lambda p: p.name)
def test_prior_recipe_names_the_data_its_tokenizer_and_prior_expect(recipe):
    raw = yaml.safe_load(recipe.read_text())
    if not raw.get("tokens", {}).get("tokenizer"):
        pytest.skip("no tokenizer: the token dataset must exist")
    # Without an explicit source the trainer would tokenize the default (embedded demo photos).
    assert "source" in raw["tokens"].get("data", {}), f"{recipe.name}: set tokens.data.source"
    config = load_config(PriorTrainConfig, recipe)
    model = prior_config(config)
    data = config.tokens.data
    if model.num_classes > 0:
        assert data.label_column, f"{recipe.name}: num_classes={model.num_classes} needs tokens.data.label_column"
    tokenizer = tokenizer_recipe(config.tokens.tokenizer)
    if tokenizer is None:
        return  # a tokenizer from elsewhere: nothing to derive K and f from
    f = tokenizer.model.downsample_factor
    assert data.image_size % f == 0 and model.grid == (data.image_size // f, data.image_size // f)
    assert model.num_codes == tokenizer.model.quantizer.num_codes
    assert (data.source, data.image_column) == (tokenizer.data.source, tokenizer.data.image_column)
    if model.num_classes > 0:
        assert data.label_column == tokenizer.data.label_column


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
