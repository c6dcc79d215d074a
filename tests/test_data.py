"""Data pipeline: colour-mode conversion, skipping bad files across workers, start-up errors, determinism."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgan.data import (
    EMBEDDED_EVAL,
    DataConfig,
    build_dataloader,
    build_dataset,
    decode_image,
    embedded_dataset,
    to_rgb,
)

# ----------------------------------------------------------------------------- to_rgb


def rgb_of(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)  # (H, W, 3) uint8


def test_grayscale_and_bilevel_replicate_the_channel():
    assert rgb_of(Image.new("L", (2, 1), 77)).tolist() == [[[77, 77, 77]] * 2]
    assert rgb_of(Image.new("1", (1, 1), 1)).tolist() == [[[255, 255, 255]]]


def test_alpha_is_composited_on_white():
    rgba = Image.fromarray(np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [200, 100, 0, 51]]], np.uint8), "RGBA")
    # 51/255 = 0.2 opaque: 0.2 * c + 0.8 * 255
    assert rgb_of(rgba).tolist() == [[[255, 255, 255], [200, 0, 0], [244, 224, 204]]]
    la = Image.fromarray(np.array([[[100, 128], [100, 255]]], np.uint8), "LA")
    gray = round(100 * 128 / 255 + 255 * 127 / 255)  # 177
    assert rgb_of(la).tolist() == [[[gray] * 3, [100] * 3]]


def test_palette_goes_through_rgba_so_its_transparent_index_is_white():
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 0, 0, 0])
    palette.info["transparency"] = 1
    assert rgb_of(palette).tolist() == [[[10, 20, 30], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_is_rescaled_not_clipped(mode):
    values = np.array([[0, 257, 1000, 128 * 257, 65535]])
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    # Pillow's own convert("L") would give [0, 255, 255, 255, 255].
    assert rgb_of(image)[0, :, 0].tolist() == [0, 1, 4, 128, 255]


def test_16_bit_png_round_trip_through_the_decoder():
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 3), 200 * 257, np.uint16)).save(buffer, format="PNG")
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.mode == "RGB" and np.all(np.asarray(decoded) == 200)


def test_cmyk_and_float():
    assert rgb_of(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).tolist() == [[[255, 0, 0]]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert floats.mode == "F"
    assert rgb_of(floats)[0, :, 0].tolist() == [0, 128, 255]


# ----------------------------------------------------------------------------- folders with bad files

# Solid colours, so any crop/flip of an image still tells which file it came from.
GOOD = {"rgb.png": (10, 200, 30), "gray.png": (90, 90, 90), "rgba.png": (0, 0, 255), "deep.png": (60, 60, 60)}
BAD = {"corrupt.png", "truncated.jpg"}


def make_messy_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), GOOD["rgb.png"]).save(root / "rgb.png")
    Image.new("L", (40, 56), 90).save(root / "gray.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 255)).save(root / "rgba.png")
    Image.fromarray(np.full((40, 44), 60 * 257, np.uint16)).save(root / "deep.png")  # 16-bit grayscale PNG
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(600))
    noise = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


def folder_config(tmp_path: Path, folder: Path, **kwargs) -> DataConfig:
    return DataConfig(source=str(folder), image_size=32, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def to_colour(image: torch.Tensor) -> tuple[int, ...]:
    """(3, S, S) in [-1, 1] of a solid image -> its 8-bit colour."""
    pixels = ((image + 1) / 2 * 255).round().to(torch.int64)
    assert (pixels == pixels[:, :1, :1]).all(), "a solid image should stay solid"
    return tuple(pixels[:, 0, 0].tolist())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_counted_and_named(tmp_path, num_workers):
    folder = make_messy_folder(tmp_path / "images")
    config = folder_config(tmp_path, folder, num_workers=num_workers)
    loader = build_dataloader(config, "train", batch_size=4, seed=0, drop_last=False)
    colours, skipped, num_skipped = [], [], 0
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 32, 32) and batch["images"].dtype == torch.float32
        colours += [to_colour(image) for image in batch["images"]]
        num_skipped += batch["num_skipped"]
        skipped += batch["skipped"]
    assert sorted(colours) == sorted(GOOD.values())
    assert num_skipped == len(BAD)
    assert sorted(Path(name).name for name in skipped) == sorted(BAD)


def test_labels_come_from_class_subfolders(tmp_path):
    for label, colour in (("cats", (255, 0, 0)), ("dogs", (0, 255, 0))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), colour).save(tmp_path / "images" / label / f"{i}.png")
    config = folder_config(tmp_path, tmp_path / "images", label_column="label")
    batch = next(iter(build_dataloader(config, "train", batch_size=4, seed=0)))
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    for image, label in zip(batch["images"], batch["labels"].tolist()):
        assert to_colour(image) == ((255, 0, 0) if label == 0 else (0, 255, 0))


def test_local_copy_of_a_hub_dataset_with_images_stored_as_bytes(tmp_path):
    """The cifar10 layout: parquet shards, an "img" column of PNG bytes, a "label" column, a test split."""
    import datasets

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})
    shards = tmp_path / "cifar" / "plain_text"
    rows = {"img": [png((255, 0, 0)), {"bytes": b"not a png", "path": None}, png((0, 0, 255))], "label": [0, 0, 1]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(shards / "train-00000-of-00001.parquet")
    test_rows = {"img": [png((0, 0, 255))], "label": [1]}
    datasets.Dataset.from_dict(test_rows, features=features).to_parquet(shards / "test-00000-of-00001.parquet")
    config = DataConfig(
        source=str(tmp_path / "cifar"), eval_split="test", image_column="img", label_column="label",
        image_size=32, cache_dir=str(tmp_path / "hf_cache"),
    )
    batch = next(iter(build_dataloader(config, "train", batch_size=3, seed=0)))
    pairs = sorted(zip(batch["labels"].tolist(), map(to_colour, batch["images"])))
    assert pairs == [(0, (255, 0, 0)), (1, (0, 0, 255))]
    assert batch["num_skipped"] == 1 and batch["skipped"][0].endswith("[train] row 1")
    batch = next(iter(build_dataloader(config, "eval", batch_size=3)))
    assert batch["labels"].tolist() == [1] and [to_colour(image) for image in batch["images"]] == [(0, 0, 255)]


def test_held_out_eval_rows_are_disjoint_from_train(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    config = folder_config(tmp_path, folder, num_eval_images=2, hflip=False)
    train = {to_colour(build_dataset(config, "train")[i]["image"]) for i in range(4)}
    evals = {to_colour(build_dataset(config, "eval")[i]["image"]) for i in range(2)}
    assert len(train) == 4 and len(evals) == 2 and not train & evals
    assert len(build_dataset(config, "train")) == 4 and len(build_dataset(config, "eval")) == 2


# ----------------------------------------------------------------------------- errors at start


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no image files"):
        build_dataset(folder_config(tmp_path, tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset(DataConfig(source=str(tmp_path / "missing")))


def test_crop_larger_than_every_image_is_a_clear_error(tmp_path):
    folder = make_messy_folder(tmp_path / "images")
    config = DataConfig(source=str(folder), image_size=64, cache_dir=str(tmp_path / "hf_cache"))
    expected = r"image_size=64 is larger than every image .*largest shorter side: 40px.*set resize: 64"
    with pytest.raises(ValueError, match=expected):
        build_dataset(config)
    resized = DataConfig(source=str(folder), image_size=64, resize=64, cache_dir=str(tmp_path / "hf_cache"))
    dataset = build_dataset(resized)
    good = [item for item in (dataset[i] for i in range(len(dataset))) if isinstance(item, dict)]
    assert len(good) == len(GOOD) and all(item["image"].shape == (3, 64, 64) for item in good)


def test_config_and_split_errors(tmp_path):
    with pytest.raises(ValueError, match="resize=100 is smaller than image_size=128"):
        DataConfig(image_size=128, resize=100)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(DataConfig(), "validation")
    folder = make_messy_folder(tmp_path / "images")
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image'\]"):
        build_dataset(folder_config(tmp_path, folder, image_column="img"))
    with pytest.raises(ValueError, match="set eval_split"):
        build_dataset(folder_config(tmp_path, folder), "eval")


# ----------------------------------------------------------------------------- embedded photographs


def test_embedded_splits_hold_disjoint_photographs():
    train, evals = embedded_dataset("train"), embedded_dataset("eval")
    assert set(evals["name"]) == set(EMBEDDED_EVAL) and not set(train["name"]) & set(evals["name"])
    train_pixels = [np.asarray(image) for image in train["image"]]
    for image in evals["image"]:
        assert image.mode == "RGB" and min(image.size) >= 256
        assert not any(p.shape == np.asarray(image).shape and np.array_equal(p, image) for p in train_pixels)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_embedded_items_are_model_range_tensors(split):
    dataset = build_dataset(DataConfig(image_size=48, embedded_repeats=2), split)
    assert len(dataset) == (2 * len(embedded_dataset("train")) if split == "train" else len(EMBEDDED_EVAL))
    images = torch.stack([dataset[i]["image"] for i in range(len(EMBEDDED_EVAL))])
    assert images.shape == (len(EMBEDDED_EVAL), 3, 48, 48) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.5 and images.max() > 0.5


def test_embedded_eval_is_the_whole_photo_scaled_and_centre_cropped():
    from torchvision.transforms.v2 import functional as TF

    photo = TF.pil_to_tensor(embedded_dataset("eval")["image"][0])  # (3, H, W) uint8
    expected = TF.center_crop(TF.resize(photo, [40], antialias=True), [40, 40]).float() / 127.5 - 1
    item = build_dataset(DataConfig(image_size=40), "eval")[0]["image"]
    torch.testing.assert_close(item, expected)


# ----------------------------------------------------------------------------- determinism


def first_batches(loader, n: int) -> list[torch.Tensor]:
    return [batch["images"] for _, batch in zip(range(n), loader)]


def test_batches_are_a_function_of_the_seed_and_epoch_only():
    config = DataConfig(image_size=32, embedded_repeats=2)
    a = build_dataloader(config, "train", batch_size=4, seed=3)
    epoch0, epoch1 = first_batches(a, 2), first_batches(a, 2)
    same = first_batches(build_dataloader(config, "train", batch_size=4, seed=3), 2)
    other = first_batches(build_dataloader(config, "train", batch_size=4, seed=4), 2)
    assert all(torch.equal(x, y) for x, y in zip(epoch0, same))
    assert not torch.equal(epoch0[0], other[0])
    assert not torch.equal(epoch0[0], epoch1[0]), "a second pass must be a new epoch"
    workers = build_dataloader(DataConfig(image_size=32, embedded_repeats=2, num_workers=2), "train", 4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(epoch0, first_batches(workers, 2)))


def test_resume_mid_epoch_sees_the_same_batches():
    from accelerate.data_loader import skip_first_batches

    config = DataConfig(image_size=32, embedded_repeats=2)
    run = build_dataloader(config, "train", batch_size=3, seed=7)
    first_batches(run, 1)  # epoch 0
    epoch1 = first_batches(run, 3)
    resumed = build_dataloader(config, "train", batch_size=3, seed=7)
    resumed.batch_sampler.sampler.set_epoch(1)
    tail = first_batches(skip_first_batches(resumed, 1), 2)
    assert all(torch.equal(x, y) for x, y in zip(epoch1[1:], tail))


def test_jpeg_draft_decodes_at_a_reduced_scale_close_to_the_full_decode():
    from vqgan.data import resized_pixels

    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([xx * 255 // 800, yy * 255 // 600, (xx + yy) * 255 // 1400], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    cell = {"bytes": buffer.getvalue(), "path": None}
    drafted = decode_image(cell, min_short_side=128)
    assert drafted.size == (200, 150)  # 1/4 scale: the smallest whose shorter side still reaches 128
    assert decode_image(cell, min_short_side=400).size == (800, 600)  # no 1/2 decode reaches 400: full size
    fast = resized_pixels(drafted, 64, 128).float()
    full = resized_pixels(decode_image(cell), 64, 128).float()
    assert fast.shape == full.shape == (3, 128, 170)
    assert (fast - full).abs().mean() < 2.0  # within JPEG noise of resizing the full decode (8-bit levels)


INDEX_ONCE_SCRIPT = """
import json, sys
import datasets
from accelerate import PartialState
from vqgan.data import DataConfig, build_dataset

calls = []
original = datasets.load_dataset
datasets.load_dataset = lambda *a, **k: calls.append(a) or original(*a, **k)
dataset = build_dataset(DataConfig(source=sys.argv[1], image_size=32, cache_dir=sys.argv[2]), "train")
state = PartialState()  # the one build_dataset started (a data-only process: no Accelerator)
rows = [dataset.table[i]["image"]["path"] for i in range(len(dataset.table))]
# one file per rank: two processes printing to one pipe can interleave their lines
with open(f"{sys.argv[3]}/rank{state.process_index}.json", "w") as out:
    json.dump({"rank": state.process_index, "calls": len(calls), "rows": rows}, out)
"""


@pytest.mark.slow
def test_the_folder_is_indexed_once_per_node_and_read_by_the_other_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(folder / f"{i}.png")
    script = tmp_path / "index_once.py"
    script.write_text(INDEX_ONCE_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29573",
           str(script), str(folder), str(tmp_path / "hf_cache"), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["calls"] for r in found] == [1, 0]  # only the node's main process walked and indexed the folder
    assert found[0]["rows"] == found[1]["rows"] and len(found[0]["rows"]) == 5
