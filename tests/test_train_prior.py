"""Prior training end to end: tokenization (1 and 2 processes), training, exact resume, samples, the console commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from vqgan.autoencoder import VQModel, preset
from vqgan.tokenizer import VQTokenizer
from vqgan.prior.data import load_token_dataset, token_dataset_tensors
from vqgan.prior.io import load_prior
from vqgan.train_prior import main

ROOT = Path(__file__).resolve().parents[1]
DATA = {"source": "embedded", "image_size": 32, "resize": 64, "embedded_repeats": 3, "random_crop": True}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


SCALES = [1, 2, 4, 8]  # the multi-scale tokenizer's: 85 ids an image


@pytest.fixture(scope="module")
def msvq_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny preset with VAR's multi-scale quantizer (kind msvq), k-means-free so its codebook is random but fixed."""
    import dataclasses

    torch.manual_seed(0)
    config = preset("tiny")
    config = dataclasses.replace(config, quantizer=dataclasses.replace(config.quantizer, kind="msvq",
                                                                       scales=tuple(SCALES), kmeans_init=False))
    folder = tmp_path_factory.mktemp("msvq") / "tokenizer"
    VQTokenizer.from_model(VQModel(config).eval()).save_pretrained(folder)
    return folder


def model_section(prior: str) -> dict:
    if prior == "var":  # the next-scale prior: the tokenizer's scales and latent width, no grid
        return {"num_codes": 256, "scales": SCALES, "input_dim": 32, "dim": 32, "depth": 2, "heads": 2}
    return {"num_codes": 256, "grid": [8, 8], "dim": 32, "depth": 2, "heads": 2}


def recipe(tmp_path: Path, tokenizer_dir: Path, prior: str = "transformer", **train) -> Path:
    data = {
        "run_dir": str(tmp_path / "run"),
        "prior": prior,
        prior: model_section(prior),
        "tokens": {"path": str(tmp_path / "tokens"), "tokenizer": str(tokenizer_dir), "data": DATA},
        "train": {"steps": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5,
                  "tracker": "none", "progress_bar": False, "mixed_precision": "no", **train},
        "sampling": {"num_samples": 4, "batch_size": 4, "top_k": 10},
    }
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(path: Path, *overrides: str) -> dict:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main([str(path), *overrides])


def test_prior_trains_from_images_and_samples(tmp_path, tokenizer_dir):
    summary = run(recipe(tmp_path, tokenizer_dir))
    dataset, meta = load_token_dataset(tmp_path / "tokens")
    tokens, labels = token_dataset_tensors(dataset)
    assert tokens.shape == (18, 8, 8) and labels is None  # 6 photos x 3 crops
    assert meta["num_codes"] == 256 and meta["grid"] == [8, 8]
    # the stored tokens are exactly what the tokenizer gives for the same crops
    from vqgan.data import DataConfig, build_dataset
    from vqgan.utils import images_from_model_range

    images = torch.stack([build_dataset(DataConfig(**DATA), "train", seed=0)[i]["image"] for i in range(3)])
    expected = VQTokenizer.from_pretrained(tokenizer_dir).encode(images_from_model_range(images))
    assert torch.equal(tokens[:3], expected)

    assert summary["step"] == 4 and summary["bits_per_token"] > 0
    assert summary["uniform_bits_per_token"] == 8.0
    grid = Image.open(summary["samples"])
    assert grid.size[0] > 32 and len(list((tmp_path / "run" / "samples").glob("sample_*.png"))) == 4
    prior, meta = load_prior(tmp_path / "run" / "prior")
    assert meta["kind"] == "transformer" and prior.config.grid == (8, 8)


@pytest.mark.parametrize("prior", ["transformer", "maskgit", "var"])
def test_prior_exact_resume(tmp_path, tokenizer_dir, msvq_tokenizer_dir, prior):
    path = recipe(tmp_path, msvq_tokenizer_dir if prior == "var" else tokenizer_dir, prior, steps=6, checkpoint_every=3)
    first = run(path)
    last = tmp_path / "run" / "checkpoints" / "checkpoint-0000006"
    reference = load_file(last / "prior" / "model.safetensors")
    shutil.rmtree(last)
    summary = run(path)
    loss_key = "masked_ce_bits_per_token" if prior == "maskgit" else "bits_per_token"  # MaskGIT has no likelihood
    assert summary["step"] == 6 and summary[loss_key] == first[loss_key]
    assert ("bits_per_token" in summary) == (prior != "maskgit")
    resumed = load_file(last / "prior" / "model.safetensors")
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    model, meta = load_prior(tmp_path / "run" / "prior")
    assert meta["kind"] == prior and model.config.grid == (8, 8)
    assert len(list((tmp_path / "run" / "samples").glob("sample_*.png"))) == 4  # the final samples decode


def test_var_prior_trains_on_multi_scale_tokens_and_samples(tmp_path, msvq_tokenizer_dir):
    """Tokenization writes (n, sum s^2) rows with the scales; the next-scale prior trains on them through the
    tokenizer's msvq quantizer and its samples decode into a grid, at the end of the run and with vqgan-sample."""
    summary = run(recipe(tmp_path, msvq_tokenizer_dir, "var", steps=2))
    dataset, meta = load_token_dataset(tmp_path / "tokens")
    tokens, _ = token_dataset_tensors(dataset)
    assert meta["scales"] == SCALES and meta["grid"] == [8, 8] and tokens.shape == (18, 85)
    from vqgan.data import DataConfig, build_dataset
    from vqgan.prior.data import open_token_grids
    from vqgan.utils import images_from_model_range

    images = torch.stack([build_dataset(DataConfig(**DATA), "train", seed=0)[i]["image"] for i in range(3)])
    expected = VQTokenizer.from_pretrained(msvq_tokenizer_dir).encode(images_from_model_range(images))
    assert expected.shape == (3, 85) and torch.equal(tokens[:3], expected)
    grids, _, _ = open_token_grids(tmp_path / "tokens")  # what training reads: memory-mapped (L,) rows
    assert torch.equal(grids[0][0], expected[0])

    assert summary["step"] == 2 and summary["bits_per_token"] > 0
    prior, meta = load_prior(tmp_path / "run" / "prior")
    assert meta["kind"] == "var" and prior.config.scales == tuple(SCALES)
    assert Image.open(summary["samples"]).size[0] > 32
    sampled = torch.tensor(__import__("json").loads((tmp_path / "run" / "samples" / "tokens.json").read_text()))
    assert sampled.shape == (4, 85)

    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "vqgan.cli.sample", str(tmp_path / "run" / "prior"), "--out",
                             str(out), "--num-samples", "2", "--top-k", "10"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (out / "grid.png").is_file() and "(85,) tokens" in result.stdout


def test_priors_refuse_the_wrong_token_layout_before_tokenizing(tmp_path, tokenizer_dir, msvq_tokenizer_dir):
    with pytest.raises(ValueError, match=r"is multi-scale \(kind msvq, scales \[1, 2, 4, 8\]\).*set prior: var"):
        run(recipe(tmp_path, msvq_tokenizer_dir))
    with pytest.raises(ValueError, match=r"var.scales=\[1, 2, 4, 8\] but tokenizer .* has one grid \(kind vq\)"):
        run(recipe(tmp_path, tokenizer_dir, "var"))
    with pytest.raises(ValueError, match=r"var.scales=\[1, 2, 8\] but tokenizer .* has scales \[1, 2, 4, 8\]"):
        run(recipe(tmp_path, msvq_tokenizer_dir, "var"), "var.scales=[1,2,8]")
    assert not (tmp_path / "tokens").exists()


def test_token_dataset_mismatch_is_a_clear_error(tmp_path, tokenizer_dir):
    run(recipe(tmp_path, tokenizer_dir, steps=1))
    with pytest.raises(ValueError, match="num_codes: dataset has K=256, prior expects K=512"):
        run(recipe(tmp_path, tokenizer_dir), "transformer.num_codes=512", "run_dir=" + str(tmp_path / "other"))


def test_sample_tool_and_two_process_tokenization(tmp_path, tokenizer_dir):
    run(recipe(tmp_path, tokenizer_dir, steps=2))
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "vqgan.cli.sample", str(tmp_path / "run" / "prior"), "--out", str(out),
                             "--num-samples", "2", "--temperature", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (out / "grid.png").is_file() and (out / "sample_0001.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "vqgan.cli.sample", str(tmp_path / "run" / "prior"), "--top-p", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "top_p must lie in (0, 1]" in bad.stderr

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "tokens2"
    # 5 photos x 3 crops = 15 rows: an uneven tail over 2 processes must neither drop nor duplicate a row
    data_args = ["source=embedded", "image_size=32", "resize=64", "embedded_repeats=3", "max_images=5"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
               "-m", "vqgan.cli.tokenize", str(tokenizer_dir), str(two), "--batch-size", "4", "--data", *data_args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "tokens1"
    result = subprocess.run([sys.executable, "-m", "vqgan.cli.tokenize", str(tokenizer_dir), str(one), "--data", *data_args],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens_two, _ = token_dataset_tensors(load_token_dataset(two)[0])
    tokens_one, _ = token_dataset_tensors(load_token_dataset(one)[0])
    assert tokens_one.shape[0] == tokens_two.shape[0] == 15
    assert torch.equal(tokens_one, tokens_two)


def test_token_table_built_in_slices_round_trips(tmp_path):
    import datasets

    from vqgan.prior.data import _token_table

    tokens, labels = torch.randint(0, 5, (40, 3, 3)), torch.arange(40)
    features = datasets.Features({"tokens": datasets.List(datasets.List(datasets.Value("int32"))),
                                  "label": datasets.Value("int64")})
    table = _token_table(tokens, labels, features, rows_per_part=7)  # 6 slices, the last one short
    got_tokens, got_labels = token_dataset_tensors(table)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_labels, labels)


def test_auto_tokenizing_checks_the_tokenizer_before_writing_anything(tmp_path, tokenizer_dir):
    path = recipe(tmp_path, tokenizer_dir)
    with pytest.raises(ValueError, match=r"transformer.num_codes=512 but tokenizer .* has K=256"):
        run(path, "transformer.num_codes=512")
    with pytest.raises(ValueError, match=r"transformer.num_classes=10 but tokens.data.label_column is not set"):
        run(path, "transformer.num_classes=10")
    assert not (tmp_path / "tokens").exists() and not list(tmp_path.glob(".tokens*"))  # nothing left behind


def test_prior_resume_refuses_a_changed_architecture_and_allows_a_longer_run(tmp_path, tokenizer_dir):
    path = recipe(tmp_path, tokenizer_dir, steps=2, checkpoint_every=2)
    run(path)
    from vqgan.config import ConfigError

    with pytest.raises(ConfigError, match=r"transformer\.dim: 32 in the checkpoint, 64 now"):
        run(path, "train.steps=4", "transformer.dim=64")
    assert run(path, "train.steps=4")["step"] == 4
    assert "train.steps" in (tmp_path / "run" / "config_changes.jsonl").read_text()
