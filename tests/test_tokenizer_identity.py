"""Tokens know their tokenizer: tokenizing from a Hub id (a simulated download), the identity and encoder
precision recorded before encoding, and every decoder (prior training, its samples, vqgan-sample, the prior:
FID source) refusing tokens of another tokenizer unless told to go on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from test_cli import fake_cache
from vqgan.autoencoder import VQModel, preset
from vqgan.data import DataConfig, build_dataset
from vqgan.metrics.sources import SourceOptions, prior_samples
from vqgan.prior.data import METADATA_FILE, load_token_dataset, token_dataset_tensors
from vqgan.prior.io import load_prior, save_prior
from vqgan.prior.tokenize import tokenize_dataset
from vqgan.prior.tokenizer_identity import (
    TokenizerMismatchError,
    check_same_tokenizer,
    file_fingerprint,
    resolve_tokenizer,
    tokenizer_fingerprint,
)
from vqgan.prior.transformer import TransformerConfig, TransformerPrior
from vqgan.tokenizer import VQTokenizer
from vqgan.train_prior import main as train_prior
from vqgan.utils import images_from_model_range

ROOT = Path(__file__).resolve().parents[1]
DATA_ARGS = ["source=embedded", "image_size=32", "resize=64", "max_images=2"]  # 2 photos, centre crops
PHOTOS = DataConfig(source="embedded", image_size=32, resize=64, max_images=2, random_crop=False, hflip=False)


def tiny_tokenizer(folder: Path, seed: int) -> Path:
    """A tiny tokenizer (K=256, f=4) with weights drawn from `seed`, saved to `folder` (replacing it)."""
    torch.manual_seed(seed)
    return VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(folder)


def photo_tokens(tokenizer: VQTokenizer) -> torch.Tensor:
    """The tokens `tokenizer.encode` gives for PHOTOS' images, in row order: the reference for tokenization."""
    table = build_dataset(PHOTOS, "train")
    return tokenizer.encode(images_from_model_range(torch.stack([table[i]["image"] for i in range(len(table))])))


def run_tool(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VQGAN_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------ tokenizing from the Hub


def test_vqgan_tokenize_from_a_hub_id_records_the_repo_and_commit(tmp_path):
    local = tiny_tokenizer(tmp_path / "tok", seed=0)
    older = tiny_tokenizer(tmp_path / "older", seed=1)

    def files(folder: Path) -> dict[str, bytes]:
        return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}

    cache = fake_cache(tmp_path / "cache", "someone/tok", {"main": files(local), "v0": files(older)})
    hub = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    out = tmp_path / "tokens"
    result = run_tool("vqgan.cli.tokenize", "someone/tok", str(out), "--data", *DATA_ARGS, env=hub)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / METADATA_FILE).read_text())
    assert (meta["tokenizer"], meta["tokenizer_revision"]) == ("someone/tok", "0" * 40)  # main's commit
    assert meta["tokenizer_hash"] == tokenizer_fingerprint(local)  # the same bytes as the local folder
    assert meta["encode_precision"] == "fp32"
    tokens, _ = token_dataset_tensors(load_token_dataset(out)[0])
    assert torch.equal(tokens, photo_tokens(VQTokenizer.from_pretrained(local)))

    two = tmp_path / "tokens2"  # two processes: the main one resolves the commit, both encode with it
    result = run_tool("accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
                      "-m", "vqgan.cli.tokenize", "someone/tok", str(two), "--data", *DATA_ARGS,
                      env={**hub, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / METADATA_FILE).read_text())["tokenizer_revision"] == "0" * 40
    assert torch.equal(token_dataset_tensors(load_token_dataset(two)[0])[0], tokens)

    result = run_tool("vqgan.cli.tokenize", "someone/tok", str(tmp_path / "v0"), "--revision", "v0", "--data",
                      *DATA_ARGS, env=hub)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "v0" / METADATA_FILE).read_text())
    assert meta["tokenizer_revision"] == "1".zfill(40) and meta["tokenizer_hash"] == tokenizer_fingerprint(older)
    tokens, _ = token_dataset_tensors(load_token_dataset(tmp_path / "v0")[0])
    assert torch.equal(tokens, photo_tokens(VQTokenizer.from_pretrained(older)))

    missing = run_tool("vqgan.cli.tokenize", "someone/none", str(tmp_path / "none"), "--data", *DATA_ARGS, env=hub)
    assert missing.returncode == 2 and "'someone/none'" in missing.stderr and "could not be fetched" in missing.stderr
    assert not list(tmp_path.glob(".none*")) and not (tmp_path / "none").exists()


def test_a_local_tokenizer_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    tiny_tokenizer(tmp_path / "tok", seed=0)
    monkeypatch.chdir(tmp_path)
    meta = tokenize_dataset(Accelerator(cpu=True), "tok", PHOTOS, tmp_path / "tokens")
    assert meta["tokenizer"] == str(tmp_path.resolve() / "tok") and meta["tokenizer_revision"] is None
    assert json.loads((tmp_path / "tokens" / METADATA_FILE).read_text())["tokenizer"] == meta["tokenizer"]


def test_a_failure_while_encoding_leaves_no_partial_folder(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok", seed=0)

    def broken(self, images):
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(VQTokenizer, "encode", broken)
    with pytest.raises(RuntimeError, match="encoder failed"):
        tokenize_dataset(Accelerator(cpu=True), tokenizer, PHOTOS, tmp_path / "tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"], "a half-written token dataset was left behind"


def test_the_fingerprint_is_of_the_weights_not_the_file_bytes_and_older_hashes_still_match(tmp_path):
    """safetensors writes its metadata in an unstable order: the same weights saved again are other bytes."""
    folders = [tiny_tokenizer(tmp_path / f"t{i}", seed=0) for i in range(6)]
    assert len({tokenizer_fingerprint(folder) for folder in folders}) == 1
    assert tokenizer_fingerprint(tiny_tokenizer(tmp_path / "other", seed=1)) != tokenizer_fingerprint(folders[0])
    _, identity = resolve_tokenizer(folders[0])
    older = {"tokenizer": "runs/old/tokenizer", "tokenizer_hash": file_fingerprint(folders[0])}  # before this hash
    check_same_tokenizer(older, "token dataset old", identity, allow_mismatch=False, override="x")
    with pytest.raises(TokenizerMismatchError, match=r"runs/old/tokenizer \(hash 0+\)"):
        check_same_tokenizer({**older, "tokenizer_hash": "0" * 16}, "token dataset old", identity,
                             allow_mismatch=False, override="x")


# ------------------------------------------------------------------------------ encoder precision


def test_encoder_precision_is_a_recorded_choice_and_fp32_gives_the_api_ids(tmp_path):
    path = tiny_tokenizer(tmp_path / "tok", seed=0)
    tokenizer = VQTokenizer.from_pretrained(path)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach the fp32 encoder
        meta = tokenize_dataset(Accelerator(cpu=True), path, PHOTOS, tmp_path / "fp32")
    assert meta["encode_precision"] == "fp32"
    assert torch.equal(token_dataset_tensors(load_token_dataset(tmp_path / "fp32")[0])[0], photo_tokens(tokenizer))

    meta = tokenize_dataset(Accelerator(cpu=True), path, PHOTOS, tmp_path / "bf16", precision="bf16")
    assert json.loads((tmp_path / "bf16" / METADATA_FILE).read_text())["encode_precision"] == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = photo_tokens(tokenizer)
    assert torch.equal(token_dataset_tensors(load_token_dataset(tmp_path / "bf16")[0])[0], expected)
    with pytest.raises(ValueError, match=r"encode precision 'fp16' is not one of \['fp32', 'bf16'\]"):
        tokenize_dataset(Accelerator(cpu=True), path, PHOTOS, tmp_path / "fp16", precision="fp16")
    assert not (tmp_path / "fp16").exists()


# ------------------------------------------------------------------------------ a rewritten tokenizer


def prior_recipe(tmp_path: Path, tokenizer: Path, tokens: Path) -> Path:
    data = {
        "run_dir": str(tmp_path / "run"),
        "prior": "transformer",
        "transformer": {"num_codes": 256, "grid": [8, 8], "dim": 32, "depth": 1, "heads": 2},
        "tokens": {"path": str(tokens), "tokenizer": str(tokenizer),
                   "data": {"source": "embedded", "image_size": 32, "resize": 64, "max_images": 2}},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "tracker": "none",
                  "progress_bar": False, "mixed_precision": "no"},
        "sampling": {"num_samples": 2, "batch_size": 2, "top_k": 10},
    }
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_prior(path: Path, *overrides: str) -> dict:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_prior([str(path), *overrides])


def test_a_rewritten_tokenizer_is_refused_by_every_decoder_unless_overridden(tmp_path):
    """Tokenize with A; the tokenizer run is extended, so run_dir/tokenizer now holds B (same K)."""
    tokenizer = tiny_tokenizer(tmp_path / "tok_run" / "tokenizer", seed=0)
    tokens = tmp_path / "tokens"
    result = run_tool("vqgan.cli.tokenize", str(tokenizer), str(tokens), "--data", *DATA_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    hash_a = tokenizer_fingerprint(tokenizer)
    recipe = prior_recipe(tmp_path, tokenizer, tokens)
    summary = run_prior(recipe)  # A decodes A's tokens: trains and samples
    assert summary["samples"] and load_prior(tmp_path / "run" / "prior")[1]["tokenizer_hash"] == hash_a
    prior = tmp_path / "run" / "prior"

    tiny_tokenizer(tokenizer, seed=1)  # the extended run exports B over A
    hash_b = tokenizer_fingerprint(tokenizer)
    assert hash_a != hash_b
    named = rf"tokens of tokenizer {tokenizer}.* \(hash {hash_a}\).* is {tokenizer}.* \(hash {hash_b}\)"

    with pytest.raises(TokenizerMismatchError, match=named):  # before any training step
        run_prior(recipe, f"run_dir={tmp_path / 'refused'}")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    with pytest.warns(UserWarning, match=f"{named}.*going on because tokens.allow_tokenizer_mismatch=true is set"):
        summary = run_prior(recipe, f"run_dir={tmp_path / 'allowed'}", "tokens.allow_tokenizer_mismatch=true")
    assert summary["step"] == 2 and summary["samples"]

    out = tmp_path / "samples"
    refused = run_tool("vqgan.cli.sample", str(prior), "--out", str(out), "--num-samples", "2")
    assert refused.returncode == 2 and not out.exists()
    assert hash_a in refused.stderr and hash_b in refused.stderr and "--allow-tokenizer-mismatch" in refused.stderr
    allowed = run_tool("vqgan.cli.sample", str(prior), "--out", str(out), "--num-samples", "2",
                       "--allow-tokenizer-mismatch")
    assert allowed.returncode == 0 and "going on because --allow-tokenizer-mismatch is set" in allowed.stderr
    assert (out / "grid.png").is_file()

    options = SourceOptions(num_samples=2, batch_size=2)
    with pytest.raises(TokenizerMismatchError, match=named):
        next(prior_samples(str(prior), 0, 1, options, torch.device("cpu")))
    with pytest.warns(UserWarning, match="going on because --allow-tokenizer-mismatch"):
        allowed = SourceOptions(num_samples=2, batch_size=2, allow_tokenizer_mismatch=True)
        images = next(prior_samples(str(prior), 0, 1, allowed, torch.device("cpu")))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8

    elsewhere = tiny_tokenizer(tmp_path / "copy_of_a", seed=0)  # A's bytes in another folder decode A's tokens
    assert tokenizer_fingerprint(elsewhere) == hash_a
    result = run_tool("vqgan.cli.sample", str(prior), "--tokenizer", str(elsewhere), "--out", str(tmp_path / "s2"),
                      "--num-samples", "2")
    assert result.returncode == 0 and "mismatch" not in result.stderr, result.stderr


def test_end_of_run_samples_recheck_the_tokenizer(tmp_path):
    """A tokenizer rewritten while the prior trains: the prior is saved, its samples are refused and say why."""
    from vqgan.config import load_config
    from vqgan.train_prior import PriorTrainConfig, sample_tokenizer

    tokenizer = tiny_tokenizer(tmp_path / "tok", seed=0)
    metadata = tokenize_dataset(Accelerator(cpu=True), tokenizer, PHOTOS, tmp_path / "tokens")
    config = load_config(PriorTrainConfig, prior_recipe(tmp_path, tokenizer, tmp_path / "tokens"), [])
    assert sample_tokenizer(config, metadata, torch.device("cpu"))[0] is not None
    tiny_tokenizer(tokenizer, seed=1)
    decoder, why = sample_tokenizer(config, metadata, torch.device("cpu"))
    assert decoder is None and metadata["tokenizer_hash"] in why and "allow_tokenizer_mismatch" in why


def test_a_prior_without_a_tokenizer_hash_decodes_with_a_warning(tmp_path):
    """Priors saved by hand (or before they recorded the hash) cannot be checked: they say so and decode."""
    tokenizer = tiny_tokenizer(tmp_path / "tok", seed=0)
    prior = TransformerPrior(TransformerConfig(num_codes=256, grid=(8, 8), dim=32, depth=1, heads=2))
    save_prior(prior, tmp_path / "prior", extra={"tokenizer": str(tokenizer)})
    with pytest.warns(UserWarning, match="records no tokenizer_hash: cannot check"):
        images = next(prior_samples(str(tmp_path / "prior"), 0, 1, SourceOptions(num_samples=2, batch_size=2),
                                    torch.device("cpu")))
    assert images.shape == (2, 3, 32, 32)
