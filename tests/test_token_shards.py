"""Token datasets at scale: per-process token shards, memory-mapped reading, tokenizing streams, priors on shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

from vqgan.autoencoder import VQModel, preset
from vqgan.data import DataConfig, build_dataset, shards
from vqgan.data.make_shards import make_shards
from vqgan.tokenizer import VQTokenizer
from vqgan.prior.data import (
    METADATA_FILE,
    TokenGrids,
    finish_token_shards,
    load_token_dataset,
    open_token_grids,
    token_dataset_tensors,
    write_token_shard,
)
from vqgan.prior.tokenize import tokenize_dataset
from vqgan.utils import images_from_model_range

META = {"num_codes": 300, "grid": [3, 4], "tokenizer_hash": "test"}


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


def test_shards_read_back_memory_mapped_in_key_order(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (23, 3, 4))
    labels = rng.integers(0, 5, 23)
    keys = rng.permutation(23) * 2  # as two processes would interleave them
    entries = [write_token_shard(tmp_path, rank, part, tokens[sl], labels[sl], keys[sl], 300)
               for rank, part, sl in ((0, 0, slice(0, 10)), (0, 1, slice(10, 15)), (1, 0, slice(15, 23)))]
    finish_token_shards(tmp_path, entries, META)
    assert np.load(tmp_path / "tokens-00000-0000.npy").dtype == np.uint16  # K=300: 2 bytes a token
    grids = TokenGrids(tmp_path)
    order = np.argsort(keys)
    assert len(grids) == 23 and isinstance(grids.tokens[0], np.memmap)
    assert torch.equal(torch.stack([grids[i][0] for i in range(23)]), torch.from_numpy(tokens[order]))
    batch = next(iter(DataLoader(grids, batch_size=7, shuffle=False)))  # __getitems__: one read per shard
    assert batch[0].dtype == torch.long and torch.equal(batch[0], torch.from_numpy(tokens[order[:7]]))
    assert torch.equal(batch[1], torch.from_numpy(labels[order[:7]]))
    dataset, meta = load_token_dataset(tmp_path)  # the in-memory API reads the layout too
    got_tokens, got_labels = token_dataset_tensors(dataset)
    assert torch.equal(got_tokens, torch.from_numpy(tokens[order])) and meta["num_rows"] == 23
    _, in_order, _ = open_token_grids(tmp_path)
    assert torch.equal(in_order, torch.from_numpy(labels[order]))


def test_bad_token_shards_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        write_token_shard(tmp_path, 0, 0, np.full((2, 3, 4), 300), None, np.arange(2), 300)
    entry = write_token_shard(tmp_path, 0, 0, np.zeros((2, 3, 4), dtype=np.int64), None, np.arange(2), 300)
    finish_token_shards(tmp_path, [entry], META)
    (tmp_path / "keys-00000-0000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: .*keys-00000-0000.npy is missing"):
        TokenGrids(tmp_path)


def test_tokenizing_shards_gives_the_tokens_of_the_same_images(tmp_path, tokenizer_dir):
    index = make_shards("embedded", tmp_path / "shards", shard_size=4, progress=False)  # the PNG bytes as they are
    data = DataConfig(source="wds:" + index["pattern"], image_size=32, random_crop=False, hflip=False, resize=64,
                      num_workers=2)
    meta = tokenize_dataset(Accelerator(cpu=True), tokenizer_dir, data, tmp_path / "tokens", batch_size=4,
                            hflip_rows=True, rows_per_shard=4)  # several chunks per process
    assert meta["num_rows"] == 12 and json.loads((tmp_path / "tokens" / METADATA_FILE).read_text())["format"]
    assert not list(tmp_path.glob(".tokens*")), "the partial folder was left behind"
    grids = TokenGrids(tmp_path / "tokens")
    # the same photos read through the map-style path give the same tokens, flipped copies after each
    photos = DataConfig(source="embedded", image_size=32, random_crop=False, hflip=False, resize=64)
    table = build_dataset(photos, "train")
    tokenizer = VQTokenizer.from_pretrained(tokenizer_dir)
    # the shards hold the photos in the shard tool's random order; a sample's key is its row in the source
    names = shards.expand_pattern("wds:" + index["pattern"])
    rows = [int(key) for name, entry in zip(names, index["shards"]) for _, key, _ in
            shards.read_samples(name, 0, entry["count"])]
    assert sorted(rows) == list(range(6))
    images = images_from_model_range(torch.stack([table[i]["image"] for i in rows]))
    expected = tokenizer.encode(images)
    got = torch.stack([grids[i][0] for i in range(12)])
    assert torch.equal(got[0::2], expected) and torch.equal(got[1::2], tokenizer.encode(images.flip(-1)))


def test_tokenizing_a_streamed_dataset_keeps_labels(tmp_path, tokenizer_dir):
    from test_streams import parquet_dataset

    root = parquet_dataset(tmp_path / "ds", files=3, rows_per_file=3)
    data = DataConfig(source=str(root), streaming=True, image_column="img", label_column="label", image_size=32,
                      random_crop=False, hflip=False, cache_dir=str(tmp_path / "c"))
    meta = tokenize_dataset(Accelerator(cpu=True), tokenizer_dir, data, tmp_path / "tokens", batch_size=4)
    grids, labels, _ = open_token_grids(tmp_path / "tokens")
    assert meta["num_rows"] == 9 and sorted(labels.tolist()) == list(range(9))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "streamed"])
def test_a_prior_trains_from_the_tokens_of_a_stream(tmp_path, tokenizer_dir, kind):
    from vqgan.data import embedded_dataset
    from vqgan.train_prior import main

    if kind == "shards":
        index = make_shards("embedded", tmp_path / "shards", shard_size=3, resize=64, format="jpg", progress=False)
        data = {"source": "wds:" + index["pattern"], "image_size": 32, "resize": 64}
    else:  # the photos as a local copy of a hub dataset, streamed
        embedded_dataset("train").to_parquet(tmp_path / "ds" / "plain_text" / "train-00000-of-00001.parquet")
        data = {"source": str(tmp_path / "ds"), "streaming": True, "image_size": 32, "resize": 64,
                "cache_dir": str(tmp_path / "c")}
    recipe = {
        "run_dir": str(tmp_path / "run"), "prior": "transformer",
        "transformer": {"num_codes": 256, "grid": [8, 8], "dim": 32, "depth": 2, "heads": 2},
        "tokens": {"path": str(tmp_path / "tokens"), "tokenizer": str(tokenizer_dir), "data": data},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 3, "tracker": "none",
                  "progress_bar": False, "mixed_precision": "no"},
        "sampling": {"num_samples": 2, "batch_size": 2, "top_k": 10},
    }
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(recipe))
    summary = main([str(tmp_path / "prior.yaml")])
    assert summary["step"] == 3 and summary["bits_per_token"] > 0
    assert len(TokenGrids(tmp_path / "tokens")) == 6
