"""check_tokenizer_fits_prior: K, grid and labels are checked from config.json before any image is tokenized."""

import pytest

from vqgan.autoencoder import VQModel, preset
from vqgan.data import DataConfig
from vqgan.folder_format import WEIGHTS_NAME
from vqgan.prior.tokenize import check_tokenizer_fits_prior
from vqgan.tokenizer import VQTokenizer

CIFAR = DataConfig(source="cifar10", image_column="img", label_column="label", image_size=32)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny tokenizer folder (K=256, f=4) with its weights removed: the check must not need them."""
    folder = VQTokenizer.from_model(VQModel(preset("tiny"))).save_pretrained(tmp_path_factory.mktemp("t") / "tok")
    (folder / WEIGHTS_NAME).unlink()
    return str(folder)


def test_a_fitting_setup_passes_from_the_config_alone(tokenizer_dir):
    check_tokenizer_fits_prior(tokenizer_dir, CIFAR, num_codes=256, grid=(8, 8), num_classes=10)
    unlabelled = DataConfig(source="embedded", image_size=64, resize=96)
    check_tokenizer_fits_prior(tokenizer_dir, unlabelled, 256, (16, 16), 0)


def test_codebook_size_mismatch_names_the_key_and_fix(tokenizer_dir):
    with pytest.raises(ValueError, match=rf"transformer\.num_codes=1024 but tokenizer {tokenizer_dir} has K=256: "
                                         r"set transformer\.num_codes=256"):
        check_tokenizer_fits_prior(tokenizer_dir, CIFAR, 1024, (8, 8), 10)


def test_grid_mismatch_names_the_grid_and_image_size(tokenizer_dir):
    big = DataConfig(source="cifar10", image_column="img", label_column="label", image_size=64)
    expected = (r"transformer\.grid=\[8, 8\] but tokens\.data\.image_size=64 / f=4 .* 16x16 grid: "
                r"set transformer\.grid=\[16, 16\] or tokens\.data\.image_size=32")
    with pytest.raises(ValueError, match=expected):
        check_tokenizer_fits_prior(tokenizer_dir, big, 256, (8, 8), 10)
    odd = DataConfig(source="cifar10", image_column="img", label_column="label", image_size=30)
    with pytest.raises(ValueError, match=r"tokens\.data\.image_size=30 is not a multiple of .* f=4"):
        check_tokenizer_fits_prior(tokenizer_dir, odd, 256, (8, 8), 10)


def test_conditional_prior_needs_a_label_column(tokenizer_dir):
    no_labels = DataConfig(source="cifar10", image_column="img", image_size=32)
    with pytest.raises(ValueError, match=r"pixelcnn\.num_classes=10 but tokens\.data\.label_column is not set"):
        check_tokenizer_fits_prior(tokenizer_dir, no_labels, 256, (8, 8), 10, prior="pixelcnn")
    check_tokenizer_fits_prior(tokenizer_dir, no_labels, 256, (8, 8), 0)


def test_every_problem_is_reported_at_once(tokenizer_dir):
    bad = DataConfig(source="cifar10", image_column="img", image_size=64)
    with pytest.raises(ValueError) as err:
        check_tokenizer_fits_prior(tokenizer_dir, bad, 1024, (8, 8), 10)
    assert all(key in str(err.value) for key in ("num_codes=1024", "grid=[8, 8]", "label_column"))


def test_missing_tokenizer_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_tokenizer_fits_prior(str(tmp_path / "runs" / "none" / "tokenizer"), CIFAR, 256, (8, 8), 10)
