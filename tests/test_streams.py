"""WebDataset shard sources: the shard tool, the split over processes and workers, exact resume, bad input."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgan.data import DataConfig, build_dataloader, build_dataset
from vqgan.data import shards
from vqgan.data.make_shards import main as make_shards_main
from vqgan.data.make_shards import make_shards
from vqgan.training.batches import resumable_batches
from vqgan.training.state import TrainState

ROOT = Path(__file__).resolve().parents[1]


def png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_of(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 11 % 256, 200)


def image_folder(root: Path, count: int) -> Path:
    """`count` solid images in two class folders (labels 0, 1 by folder)."""
    for i in range(count):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour_of(i)).save(folder / f"{i:03d}.png")
    return root


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def synthetic_shards(folder: Path, counts: list[int]) -> str:
    """Shards of solid PNGs with .cls labels; sample keys are unique over all shards. -> the wds: source."""
    n = 0
    for s, count in enumerate(counts):
        members = []
        for _ in range(count):
            members += [(f"{n:05d}.png", png(colour_of(n))), (f"{n:05d}.cls", str(n % 3).encode())]
            n += 1
        write_tar(folder / f"part-{s:03d}.tar", members)
    return f"wds:{folder}/part-{{000..{len(counts) - 1:03d}}}.tar"


def stream_config(source: str, **kwargs) -> DataConfig:
    return DataConfig(source=source, image_size=32, **{"shuffle_buffer": 4, **kwargs})


def keys_of(batches) -> list[list[str]]:
    return [batch["keys"] for batch in batches]


# ----------------------------------------------------------------------------- the shard tool


def test_shard_tool_keeps_every_image_and_label_and_indexes_the_counts(tmp_path):
    folder = image_folder(tmp_path / "images", 11)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    index = make_shards(str(folder), tmp_path / "shards", shard_size=4, label_column="label", workers=2,
                        progress=False, cache_dir=str(tmp_path / "hf_cache"))
    counts = [e["count"] for e in index["shards"]]  # 12 rows in shards of 4, the broken one skipped
    assert sorted(counts) == [3, 4, 4] and index["total"] == 11
    assert len(index["skipped"]) == 1 and "broken.png" in index["skipped"][0]
    on_disk = json.loads((tmp_path / "shards" / shards.INDEX_FILE).read_text())
    assert on_disk == index and index["pattern"].endswith("shard-{000000..000002}.tar")
    assert shards.shard_counts(shards.expand_pattern("wds:" + index["pattern"])) == counts
    # the pixels and labels come back exactly (PNG kept as it was), in source order
    loader = build_dataloader(stream_config("wds:" + index["pattern"], label_column="cls", random_crop=False,
                                            hflip=False), "train", batch_size=1, shuffle=False)
    colours = {}
    for batch in loader:
        pixels = ((batch["images"][0] + 1) / 2 * 255).round().to(torch.int64)
        colours[tuple(pixels[:, 0, 0].tolist())] = int(batch["labels"][0])
    assert colours == {colour_of(i): i % 2 for i in range(11)}  # folder a -> label 0, b -> 1


def test_shard_tool_resizes_reencodes_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "shards"
    assert make_shards_main(["embedded", str(out), "--shard-size", "4", "--resize", "64", "--format", "jpg",
                             "--no-progress"]) == 0
    assert 'data.source="wds:' in capsys.readouterr().out
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        image = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
    assert all(name.endswith(".jpg") for name in names) and image.format == "JPEG" and min(image.size) == 64
    assert make_shards_main(["embedded", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the split and resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_any_batch_continues_the_epoch_exactly(tmp_path, num_workers):
    source = synthetic_shards(tmp_path / "shards", [5, 3, 6, 4])  # uneven shards: spans cross them
    loader = build_dataloader(stream_config(source, num_workers=num_workers), "train", batch_size=3, seed=7)
    assert len(loader) == 6
    for epoch in (0, 1):
        full = list(loader.iterate(epoch))
        assert len(full) == 6 and len(set(sum(keys_of(full), []))) == 18  # every sample once
        for start in range(6):
            tail = list(loader.iterate(epoch, start))
            assert keys_of(tail) == keys_of(full[start:]), (epoch, start)
            for a, b in zip(tail, full[start:]):
                assert torch.equal(a["images"], b["images"])  # the same crops and flips too
    assert keys_of(loader.iterate(0)) != keys_of(loader.iterate(1))  # a new shard order and buffer each epoch


@pytest.mark.parametrize("interleave", [1, 3])
def test_an_epoch_covers_every_sample_once_over_processes_and_workers(tmp_path, interleave):
    source = synthetic_shards(tmp_path / "shards", [7, 2, 9, 5, 1])  # 24 samples
    names = shards.expand_pattern(source)
    spans = [shards.Span(i, 0, c) for i, c in enumerate(shards.shard_counts(names))]
    for world, workers, batch in ((1, 1, 4), (2, 3, 2), (3, 2, 4), (4, 1, 5)):
        seen = []
        for rank in range(world):
            stream = shards.ShardStream(names, spans, rank=rank, world=world, batch_size=batch, workers=workers,
                                        seed=0, shuffle=True, shuffle_buffer=3, interleave=interleave,
                                        make_item=lambda m, n, s: n, collate=list)
            stream.epoch = 2
            per_rank = [b for slot in range(workers) for b in stream.slot_batches(2, slot, 0)]
            assert len(per_rank) == len(stream) and all(len(b) == batch for b in per_rank)
            seen += sum(per_rank, [])
        layout = shards.EpochLayout(24, world, batch, workers)
        assert len(seen) == len(set(seen)) == 24 - layout.left_out, (world, workers, batch)


def test_resumable_batches_run_across_epochs_from_a_saved_position(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [4, 4, 4])
    loader = build_dataloader(stream_config(source, num_workers=2), "train", batch_size=5, seed=1)
    assert len(loader) == 2  # 12 samples: 2 batches of 5, 2 left out (and reported)
    state = TrainState()
    reference = [next(stream)["keys"] for stream in [resumable_batches(None, loader, state)] for _ in range(7)]
    for position in (1, 2, 5):
        resumed = resumable_batches(None, loader, TrainState(batches_seen=position))
        assert [next(resumed)["keys"] for _ in range(7 - position)] == reference[position:]


# ----------------------------------------------------------------------------- bad input


def test_patterns_that_match_nothing_or_miss_a_shard_are_errors_at_start(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [2, 2])
    with pytest.raises(FileNotFoundError, match="1 shard.* do not exist: .*part-002.tar"):
        shards.expand_pattern(source.replace("001", "002"))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        build_dataloader(stream_config(f"wds:{tmp_path}/nothing-*.tar"), "train", batch_size=2)
    with pytest.raises(ValueError, match="names no shards"):
        shards.expand_pattern("wds:")
    with pytest.raises(ValueError, match="set data.shard_index"):
        shards.shard_counts(["pipe:cat /nonexistent.tar"])
    with pytest.raises(ValueError, match="make no batch of 8"):
        build_dataloader(stream_config(source), "train", batch_size=8)


def test_samples_without_an_image_or_with_a_corrupt_one_are_counted_and_named(tmp_path):
    write_tar(tmp_path / "s" / "part-000.tar", [("a.png", png((1, 2, 3))), ("b.txt", b"caption only"),
                                                ("c.png", b"\x89PNG\r\n\x1a\n truncated"), ("d.png", png((4, 5, 6)))])
    loader = build_dataloader(stream_config(f"wds:{tmp_path}/s/part-000.tar"), "train", batch_size=4)
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 2 and batch["num_skipped"] == 2
    assert sorted(name.rsplit(":", 1)[1] for name in batch["skipped"]) == ["b", "c"]
    assert all(name.startswith(f"{tmp_path}/s/part-000.tar:") for name in batch["skipped"])


def test_a_truncated_shard_or_a_stale_index_is_a_clear_error(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [3, 3])
    path = tmp_path / "shards" / "part-001.tar"
    whole = path.read_bytes()
    path.write_bytes(whole[:1500])  # cut inside a header: tarfile alone would take it for the end
    with pytest.raises(RuntimeError, match="part-001.tar is truncated after its sample 0"):
        build_dataloader(stream_config(source), "train", batch_size=2)
    path.write_bytes(whole[:2600])  # cut inside the second sample's image: found while streaming, named
    (tmp_path / "shards" / "index.json").write_text(json.dumps(
        {"shards": [{"name": "part-000.tar", "count": 3}, {"name": "part-001.tar", "count": 3}]}))
    loader = build_dataloader(stream_config(source, shuffle_buffer=1), "train", batch_size=2, shuffle=False)
    with pytest.raises(RuntimeError, match="shard .*part-001.tar"):
        list(loader)
    (tmp_path / "shards" / "index.json").write_text(json.dumps(
        {"shards": [{"name": "part-000.tar", "count": 5}, {"name": "part-001.tar", "count": 3}]}))
    loader = build_dataloader(stream_config(source), "train", batch_size=2, shuffle=False)
    with pytest.raises(RuntimeError, match="part-000.tar holds 3 samples, but the index counts"):
        list(loader)


def test_eval_rows_are_held_out_of_the_training_stream(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [3, 3, 3])
    config = stream_config(source, num_eval_images=4, label_column="cls")
    held_out = build_dataset(config, "eval")
    assert len(held_out) == 4 and held_out[0]["label"] == 0
    train_keys = sum(keys_of(build_dataloader(config, "train", batch_size=1)), [])
    assert sorted(k.rsplit(":", 1)[1] for k in train_keys) == [f"{i:05d}" for i in range(4, 9)]


# ----------------------------------------------------------------------------- two processes


EPOCH_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from vqgan.data import DataConfig, build_dataloader
from vqgan.training.batches import resumable_batches
from vqgan.training.state import TrainState

accelerator = Accelerator()
config = DataConfig(source=sys.argv[1], image_size=32, num_workers=2, shuffle_buffer=4)
loader = build_dataloader(config, "train", batch_size=3, seed=0)
state = TrainState()
batches = resumable_batches(accelerator, loader, state)
keys = [key for _ in range(len(loader)) for key in next(batches)["keys"]]
everything = gather_object([keys])
if accelerator.is_main_process:
    print("KEYS " + json.dumps(everything))
"""


@pytest.mark.slow
def test_two_processes_see_each_image_once_in_an_epoch(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [5, 7, 4, 8, 6, 6])  # 36 = 2 processes x 6 batches x 3
    script = tmp_path / "epoch.py"
    script.write_text(EPOCH_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29571", str(script), source]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = json.loads(result.stdout.split("KEYS ", 1)[1].splitlines()[0])
    assert len(per_rank) == 2 and all(len(keys) == 18 for keys in per_rank)
    every = per_rank[0] + per_rank[1]
    assert len(set(every)) == 36 and not set(per_rank[0]) & set(per_rank[1])


# ----------------------------------------------------------------------------- kill and resume on a stream


def shards_recipe(tmp_path: Path) -> dict:
    from test_kill_resume import TOKENIZER_RECIPE

    index = make_shards("embedded", tmp_path / "shards", shard_size=2, resize=64, format="png", progress=False)
    return {**TOKENIZER_RECIPE,
            # 6 photos in 3 shards, 1 held out: on 1 process 2 batches of 2 per epoch (1 photo left out)
            "data": {"source": "wds:" + index["pattern"], "image_size": 32, "num_eval_images": 1, "num_workers": 2,
                     "shuffle_buffer": 3},
            "train": {**TOKENIZER_RECIPE["train"], "steps": 40, "batch_size": 2, "checkpoint_every": 7}}


@pytest.mark.slow
def test_tokenizer_on_shards_killed_at_random_moments_resumes_bit_identical(tmp_path):
    from test_kill_resume import kill_and_resume

    landed, compared, seconds = kill_and_resume(tmp_path, "tokenizer", shards_recipe(tmp_path), 40, processes=1,
                                                kills=4, targeted=("checkpoint-write:2",), seed=4, port=29561)
    print(f"tokenizer on shards, 1 process: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 3 and compared > 100


@pytest.mark.slow
def test_two_process_tokenizer_on_shards_killed_resumes_bit_identical(tmp_path):
    from test_kill_resume import kill_and_resume

    recipe = shards_recipe(tmp_path)  # 5 photos over 2 processes: 1 batch of 2 each per epoch
    landed, compared, seconds = kill_and_resume(tmp_path, "tokenizer", recipe, 40, processes=2, kills=3,
                                                targeted=(), seed=7, port=29567)
    print(f"tokenizer on shards, 2 processes: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 2 and compared > 100


# ----------------------------------------------------------------------------- streamed hub datasets


@pytest.fixture
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s each time a shuffled stream's shard threads end (an arrow shutdown workaround);
    every epoch of these tiny streams would pay it."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def parquet_dataset(root: Path, files: int, rows_per_file: int) -> Path:
    """A local copy of a hub dataset (the cifar10 layout): parquet files of solid PNGs and labels."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    n = 0
    for f in range(files):
        rows = {"img": [], "label": []}
        for _ in range(rows_per_file):
            rows["img"].append({"bytes": png(colour_of(n)), "path": None})
            rows["label"].append(n)
            n += 1
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            root / "plain_text" / f"train-{f:05d}-of-{files:05d}.parquet")
    return root


def labels_of(batches) -> list[list[int]]:
    return [batch["labels"].tolist() for batch in batches]


def streamed_config(tmp_path: Path, root: Path, **kwargs) -> DataConfig:
    return DataConfig(source=str(root), streaming=True, image_column="img", label_column="label", image_size=32,
                      cache_dir=str(tmp_path / "hf_cache"), **{"shuffle_buffer": 5, **kwargs})


def test_a_streamed_dataset_resumes_from_its_position_exactly(tmp_path, no_shutdown_sleep):
    root = parquet_dataset(tmp_path / "ds", files=4, rows_per_file=5)  # 20 rows: 6 batches of 3, 2 left out
    config = streamed_config(tmp_path, root, num_workers=2)
    stream = build_dataloader(config, "train", batch_size=3, seed=3)
    batches = iter(stream)
    reference = [next(batches) for _ in range(14)]  # into the third epoch
    assert stream.position == [2, 2] and stream.left_out == 4
    first_epoch = sum(labels_of(reference[:6]), [])
    assert len(set(first_epoch)) == 18 and set(first_epoch) <= set(range(20))
    for a, b in zip(reference, reference[1:]):
        assert labels_of([a]) != labels_of([b])
    assert sorted(first_epoch) != sorted(sum(labels_of(reference[6:12]), [])) or \
        labels_of(reference[:6]) != labels_of(reference[6:12])  # a new order each epoch
    for position, at in (([0, 4], 4), ([1, 0], 6), ([1, 5], 11)):
        resumed = build_dataloader(config, "train", batch_size=3, seed=3)
        resumed.seek(*position)
        tail = list(itertools.islice(iter(resumed), 14 - at))
        assert labels_of(tail) == labels_of(reference[at:]), position
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(tail, reference[at:]))


@pytest.mark.parametrize("files", [3, 4])  # split by rows (3 files for 2) or by files (4)
def test_streamed_processes_read_disjoint_rows_and_resume_on_their_own(tmp_path, no_shutdown_sleep, files):
    from vqgan.data.streaming import HubStream, RowItem, open_stream, stream_rows

    root = parquet_dataset(tmp_path / "ds", files=files, rows_per_file=4)
    config = streamed_config(tmp_path, root)

    def hub(rank: int) -> HubStream:
        stream, description = open_stream(config, "train")
        return HubStream(stream, description, rank=rank, world=2, batch_size=2, seed=0, shuffle=True, shuffle_buffer=4,
                         rows=stream_rows(config, "train"), make_item=RowItem(32, None, True, True, "img", "label"),
                         collate=lambda items: {"labels": torch.tensor([i["label"] for i in items])}, threads=1)

    seen = []
    per_epoch = files * 2 // 2  # 4 rows a file, 2 processes, batches of 2
    for rank in range(2):
        epoch = labels_of(itertools.islice(iter(hub(rank)), per_epoch))
        seen += sum(epoch, [])
        resumed = hub(rank)
        resumed.seek(0, 1)  # the process's own second batch, not a skip over every process's rows
        assert labels_of(itertools.islice(iter(resumed), per_epoch - 1)) == epoch[1:]
    assert sorted(seen) == list(range(files * 4))


def test_streamed_eval_rows_are_held_out_and_bad_settings_refused(tmp_path):
    root = parquet_dataset(tmp_path / "ds", files=2, rows_per_file=4)
    config = streamed_config(tmp_path, root, num_eval_images=3, shuffle_buffer=1)
    held_out = build_dataset(config, "eval")
    assert [held_out[i]["label"] for i in range(3)] == [0, 1, 2]
    train = sum(labels_of(itertools.islice(iter(build_dataloader(config, "train", batch_size=5, shuffle=False)), 1)), [])
    assert train == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="streaming: true is for hub datasets"):
        DataConfig(source="embedded", streaming=True)
    with pytest.raises(ValueError, match="no column 'image'"):
        build_dataloader(DataConfig(source=str(root), streaming=True, cache_dir=str(tmp_path / "c")), "train")


def streamed_recipe(tmp_path: Path, files: int) -> dict:
    from test_kill_resume import TOKENIZER_RECIPE

    from vqgan.data import embedded_dataset

    photos = embedded_dataset("train")  # a local copy of a "hub" dataset: 6 photos in parquet files
    for part in range(files):
        photos.shard(files, part).to_parquet(tmp_path / "ds" / "plain_text" / f"train-{part:05d}-of-{files:05d}.parquet")
    return {**TOKENIZER_RECIPE,
            "data": {"source": str(tmp_path / "ds"), "streaming": True, "image_size": 32, "resize": 64,
                     "num_eval_images": 1, "num_workers": 2, "shuffle_buffer": 3, "cache_dir": str(tmp_path / "c")},
            "train": {**TOKENIZER_RECIPE["train"], "steps": 40, "batch_size": 2, "checkpoint_every": 7}}


@pytest.mark.slow
def test_tokenizer_on_a_streamed_dataset_killed_at_random_moments_resumes_bit_identical(tmp_path):
    from test_kill_resume import kill_and_resume

    landed, compared, seconds = kill_and_resume(tmp_path, "tokenizer", streamed_recipe(tmp_path, 2), 40, processes=1,
                                                kills=4, targeted=("checkpoint-write:2",), seed=5, port=29563)
    print(f"tokenizer streamed, 1 process: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 3 and compared > 100


@pytest.mark.slow
def test_two_process_tokenizer_on_a_streamed_dataset_killed_resumes_bit_identical(tmp_path):
    from test_kill_resume import kill_and_resume

    # 3 files for 2 processes: datasets splits rows, not files, so the processes hold 2 and 3 photos
    landed, compared, seconds = kill_and_resume(tmp_path, "tokenizer", streamed_recipe(tmp_path, 3), 40, processes=2,
                                                kills=3, targeted=(), seed=6, port=29565)
    print(f"tokenizer streamed, 2 processes: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 2 and compared > 100


def test_the_quickstart_on_shards_builds_as_documented(tmp_path):
    from vqgan.train import load_train_config

    train, held_out = tmp_path / "shards" / "train", tmp_path / "shards" / "eval"
    assert make_shards_main(["embedded", str(train), "--resize", "96", "--format", "jpg", "--repeats", "64",
                             "--shard-size", "64", "--no-progress"]) == 0
    assert make_shards_main(["embedded", str(held_out), "--split", "eval", "--resize", "96", "--format", "jpg",
                             "--no-progress"]) == 0
    config = load_train_config(str(ROOT / "recipes" / "quickstart.yaml"), [
        f"data.source=wds:{train}/shard-{{000000..000005}}.tar", f"data.eval_split=wds:{held_out}/shard-000000.tar"])
    loader = build_dataloader(config.data, "train", batch_size=config.train.batch_size, seed=config.seed)
    assert len(loader) == 384 // 16  # 6 photos x 64 copies, every one used
    batch = next(iter(loader))
    assert batch["images"].shape == (16, 3, 32, 32) and len(set(k.rsplit(":", 1)[1] for k in batch["keys"])) == 16
    assert len(build_dataset(config.data, "eval")) == 2


def test_shards_stream_from_pipe_commands_and_a_failing_one_is_named(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [3, 2])
    names = [f"pipe:cat {name}" for name in shards.expand_pattern(source)]
    assert [key for _, key, _ in shards.read_samples(names[0], 1, 2)] == ["00001", "00002"]
    with pytest.raises(RuntimeError, match="cannot read shard pipe:cat /nonexistent.tar"):
        list(shards.read_samples("pipe:cat /nonexistent.tar", 0, 1))


# ----------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize("files", [2, 3])  # 2 files for 2 processes: datasets would split them by file
def test_streamed_hold_out_and_cap_are_rows_of_the_whole_stream_on_every_process(tmp_path, no_shutdown_sleep, files):
    from vqgan.data import source_of
    from vqgan.data.streaming import HubStream, RowItem, open_stream, stream_rows

    root = parquet_dataset(tmp_path / "ds", files=files, rows_per_file=4)
    config = streamed_config(tmp_path, root, num_eval_images=3, max_images=4)
    held_out = build_dataset(config, "eval")
    assert [held_out[i]["label"] for i in range(3)] == [0, 1, 2]

    def hub(rank: int) -> HubStream:  # what build_hub_stream builds on process `rank` of 2
        rows = stream_rows(config, "train")
        stream, description = open_stream(config, rows.split)
        return HubStream(stream, description, rank=rank, world=2, batch_size=2, seed=0, shuffle=True,
                         shuffle_buffer=config.shuffle_buffer, rows=rows, make_item=RowItem(32, None, True, True, "img",
                                                                                            "label"),
                         collate=lambda items: {"labels": torch.tensor([i["label"] for i in items])}, threads=1)

    trained = [sum(labels_of(itertools.islice(iter(hub(rank)), 1)), []) for rank in range(2)]
    assert sorted(trained[0] + trained[1]) == [3, 4, 5, 6]  # rows 3..6: none held out, none dropped
    for split, expected in (("eval", [0, 1, 2]), ("train", [3, 4, 5, 6])):  # tokenization picks the same rows
        keyed = [(key, item["label"]) for rank in range(2) for key, item in source_of(config).rows(split, 0, rank, 2)]
        assert sorted(label for _, label in keyed) == expected
        assert sorted(key for key, _ in keyed) == list(range(len(expected)))  # the row in the whole selection


def test_tokenizing_the_eval_split_takes_the_eval_rows_training_uses(tmp_path):
    from vqgan.data import source_of

    source = synthetic_shards(tmp_path / "shards", [3, 3])
    eval_pattern = synthetic_shards(tmp_path / "eval", [2, 2])
    config = stream_config(source, eval_split=eval_pattern, num_eval_images=3)
    rows = source_of(config).rows("eval", 0, 0, 1)
    assert len(rows) == len(build_dataset(config, "eval")) == 3
    root = parquet_dataset(tmp_path / "ds", files=1, rows_per_file=5)
    streamed = streamed_config(tmp_path, root, eval_split="train", num_eval_images=2)
    assert [item["label"] for _, item in source_of(streamed).rows("eval", 0, 0, 1)] == [0, 1]
    held_out = build_dataset(streamed, "eval")
    assert [held_out[i]["label"] for i in range(len(held_out))] == [0, 1]


def test_shards_read_by_a_pipe_command_train_with_their_index(tmp_path):
    source = synthetic_shards(tmp_path / "shards", [3, 3])
    names = shards.expand_pattern(source)
    (tmp_path / "index.json").write_text(json.dumps(
        {"shards": [{"name": Path(n).name, "count": 3} for n in names]}))
    assert shards.shard_file_name("pipe:aws s3 cp s3://bucket/train-0000.tar -") == "train-0000.tar"
    piped = f"wds:pipe:cat {tmp_path}/shards/part-{{000..001}}.tar"
    with pytest.raises(ValueError, match="set data.shard_index"):  # never an index "beside" a command
        build_dataloader(stream_config(piped), "train", batch_size=2)
    config = stream_config(piped, shard_index=str(tmp_path / "index.json"), num_eval_images=2)
    keys = sum(keys_of(build_dataloader(config, "train", batch_size=2, shuffle=False)), [])
    assert sorted(k.rsplit(":", 1)[1] for k in keys) == ["00002", "00003", "00004", "00005"]
    assert len(build_dataset(config, "eval")) == 2


def test_a_resume_under_another_stream_layout_is_refused_naming_the_change(tmp_path, no_shutdown_sleep):
    from vqgan.errors import DataError
    from vqgan.training.batches import record_stream_position

    source = synthetic_shards(tmp_path / "shards", [4, 4, 4])
    state = TrainState()
    loader = build_dataloader(stream_config(source), "train", batch_size=3, seed=1)
    next(resumable_batches(None, loader, state))
    record_stream_position(None, loader, state)
    saved = TrainState.from_dict(json.loads(json.dumps(state.to_dict())))  # as a checkpoint holds it
    assert saved.stream_layout["batch_size"] == 3 and saved.stream_layout["samples"] == 12
    next(resumable_batches(None, build_dataloader(stream_config(source), "train", batch_size=3, seed=1), saved))
    for change, named in (({"shuffle_buffer": 2}, "shuffle_buffer 4 -> 2"), ({"num_workers": 2}, "workers 1 -> 2"),
                          ({"max_images": 9}, "samples 12 -> 9")):
        other = build_dataloader(stream_config(source, **change), "train", batch_size=3, seed=1)
        with pytest.raises(DataError, match=named):
            next(resumable_batches(None, other, saved))
    with pytest.raises(DataError, match="batch_size 3 -> 2"):
        next(resumable_batches(None, build_dataloader(stream_config(source), "train", batch_size=2), saved))

    root = parquet_dataset(tmp_path / "ds", files=2, rows_per_file=4)
    hub = build_dataloader(streamed_config(tmp_path, root), "train", batch_size=3, seed=0)
    hub_state = TrainState(stream_layout=dict(hub.resume_layout), stream_positions=[[0, 1]])
    with pytest.raises(DataError, match="batch_size 3 -> 2"):
        next(resumable_batches(None, build_dataloader(streamed_config(tmp_path, root), "train", batch_size=2), hub_state))


def test_a_streamed_epoch_logs_the_rows_it_leaves_out(tmp_path, no_shutdown_sleep, caplog):
    root = parquet_dataset(tmp_path / "ds", files=1, rows_per_file=5)
    stream = build_dataloader(streamed_config(tmp_path, root), "train", batch_size=2, seed=0)
    with caplog.at_level("INFO", logger="vqgan.data.streaming"):
        list(itertools.islice(iter(stream), 3))  # epoch 0: 2 batches, 1 row left out
    assert stream.left_out == 1 and "left out the last 1 rows of epoch 0" in caplog.text


def test_the_shard_tool_leaves_no_temporary_file_when_a_shard_fails(tmp_path, monkeypatch, capsys):
    from vqgan.data import make_shards as tool

    def broken(path, expected):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(tool, "verify_shard", broken)
    with pytest.raises(RuntimeError, match="disk went away"):  # a failure not of the user's making: traceback
        make_shards_main(["embedded", str(tmp_path / "out"), "--shard-size", "4", "--no-progress"])
    assert not list((tmp_path / "out").glob(".*.tmp"))
    (tmp_path / "out" / "stale.tar").write_bytes(b"")
    with pytest.raises(FileExistsError):  # --debug: the exception itself
        make_shards_main(["embedded", str(tmp_path / "out"), "--no-progress", "--debug"])


HOLD_OUT_SCRIPT = """
import json, sys
import datasets
from accelerate import Accelerator
from accelerate.utils import gather_object
from vqgan.data import DataConfig, build_dataloader, build_dataset
from vqgan.prior.data import TokenGrids
from vqgan.prior.tokenize import tokenize_dataset

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
accelerator = Accelerator()
root, tokenizer, out = sys.argv[1:4]
config = DataConfig(source=root, streaming=True, image_column="img", label_column="label", image_size=32,
                    num_eval_images=3, cache_dir=out + "/c")
held_out = build_dataset(config, "eval")
loader = build_dataloader(config, "train", batch_size=2, seed=0)
trained = next(iter(loader))["labels"].tolist()
tokenize_dataset(accelerator, tokenizer, config, out + "/tokens_eval", "eval", batch_size=2)
everything = gather_object([{"eval": [held_out[i]["label"] for i in range(len(held_out))], "train": trained}])
if accelerator.is_main_process:
    grids = TokenGrids(out + "/tokens_eval")
    print("ROWS " + json.dumps({"ranks": everything, "tokens_eval": grids.labels[grids.order].tolist()}))
"""


@pytest.mark.slow
def test_two_processes_hold_out_the_same_streamed_rows_with_an_even_file_count(tmp_path):
    from vqgan.autoencoder import VQModel, preset
    from vqgan.tokenizer import VQTokenizer

    root = parquet_dataset(tmp_path / "ds", files=2, rows_per_file=4)  # 2 files, 2 processes: split by file
    tokenizer = VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(tmp_path / "tokenizer")
    script = tmp_path / "hold_out.py"
    script.write_text(HOLD_OUT_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29573", str(script), str(root), str(tokenizer), str(tmp_path)]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.split("ROWS ", 1)[1].splitlines()[0])
    assert [rank["eval"] for rank in rows["ranks"]] == [[0, 1, 2], [0, 1, 2]]
    assert rows["tokens_eval"] == [0, 1, 2]  # tokenizing --split eval on 2 processes: the same 3 rows
    first, second = (rank["train"] for rank in rows["ranks"])
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert set(first + second) <= {3, 4, 5, 6, 7}  # rows of the shuffled stream after the 3 held out


# ----------------------------------------------------------------------------- classes per batch (issue 20)


def class_folder(root: Path, classes: int, per_class: int) -> Path:
    """An image folder listed class by class (folders c0, c1, ...), `per_class` solid images in each."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), colour_of(c * per_class + i)).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def rows_in_shards(out: Path) -> list[tuple[int, int]]:
    """(source row, label) of every sample of a shard set, in the order its shards hold them."""
    index = json.loads((out / shards.INDEX_FILE).read_text())
    names = shards.expand_pattern("wds:" + index["pattern"])
    return [(int(key), int(members["cls"])) for name, count in zip(names, shards.shard_counts(names))
            for _, key, members in shards.read_samples(name, 0, count)]


def test_the_shard_tool_writes_rows_in_a_seeded_random_order_and_records_it(tmp_path, capsys):
    from vqgan.data.make_shards import load_rows, row_order

    folder = class_folder(tmp_path / "images", classes=4, per_class=6)
    cache = str(tmp_path / "hf_cache")
    labels = load_rows(str(folder), "train", "image", "label", cache)["label"]
    assert labels == sorted(labels) and len(set(labels)) == 4  # the source lists its rows class by class

    def write(name: str, *options: str) -> Path:
        out = tmp_path / name
        assert make_shards_main([str(folder), str(out), "--shard-size", "6", "--label-column", "label",
                                 "--cache-dir", cache, "--no-progress", *options]) == 0
        return out

    shuffled = write("shuffled")
    assert "in a random order (seed 0)" in capsys.readouterr().out
    index = json.loads((shuffled / shards.INDEX_FILE).read_text())
    assert index["row_order"] == "shuffled" and index["shuffle_seed"] == 0
    rows = rows_in_shards(shuffled)
    assert [row for row, _ in rows] == row_order(24, 0).tolist() != list(range(24))
    assert all(label == labels[row] for row, label in rows)  # each row keeps its own label
    assert all(len({label for _, label in rows[i : i + 6]}) >= 3 for i in range(0, 24, 6))  # each shard mixes
    again, reseeded = write("again"), write("reseeded", "--shuffle-seed", "1")
    assert [p.read_bytes() for p in sorted(again.glob("*.tar"))] == [p.read_bytes() for p in sorted(shuffled.glob("*.tar"))]
    assert json.loads((reseeded / shards.INDEX_FILE).read_text())["shuffle_seed"] == 1
    assert [row for row, _ in rows_in_shards(reseeded)] == row_order(24, 1).tolist() != row_order(24, 0).tolist()

    kept = write("kept", "--keep-order")
    assert "in the source's order" in capsys.readouterr().out
    index = json.loads((kept / shards.INDEX_FILE).read_text())
    assert index["row_order"] == "source" and index["shuffle_seed"] is None
    assert rows_in_shards(kept) == [(row, labels[row]) for row in range(24)]
    with pytest.raises(SystemExit):
        make_shards_main([str(folder), str(tmp_path / "both"), "--keep-order", "--shuffle-seed", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_batches_from_shards_mix_classes_and_shards_in_source_order_warn_at_start(tmp_path, caplog):
    import numpy as np

    folder = class_folder(tmp_path / "images", classes=8, per_class=16)  # 128 rows, 16 shards of 8
    for name, options in (("shuffled", []), ("kept", ["--keep-order"])):
        assert make_shards_main([str(folder), str(tmp_path / name), "--shard-size", "8", "--label-column", "label",
                                 "--cache-dir", str(tmp_path / "hf_cache"), "--no-progress", *options]) == 0

    def classes_per_batch(name: str, **settings) -> tuple[float, str]:
        pattern = json.loads((tmp_path / name / shards.INDEX_FILE).read_text())["pattern"]
        caplog.clear()
        with caplog.at_level("WARNING", logger="vqgan.data"):
            loader = build_dataloader(stream_config("wds:" + pattern, label_column="cls", **settings), "train",
                                      batch_size=16, seed=0)
        return float(np.mean([len(set(batch["labels"].tolist())) for batch in loader.iterate(0)])), caplog.text

    # uniform sampling: 8 * (1 - C(112, 16) / C(128, 16)) = 7.1 distinct classes in 16 rows
    mixed, warned = classes_per_batch("shuffled")
    assert mixed >= 6.5 and "source" not in warned
    interleaved, warned = classes_per_batch("kept")  # the loader alone: 8 shards at once per worker
    one_at_a_time, _ = classes_per_batch("kept", shard_interleave=1)  # the loader before: ~2 classes a batch
    assert interleaved >= one_at_a_time + 1.5, (interleaved, one_at_a_time)
    assert "the shards were written in source order" in warned and "vqgan-make-shards" in warned
    index_file = tmp_path / "kept" / shards.INDEX_FILE
    old = {k: v for k, v in json.loads(index_file.read_text()).items() if k not in ("row_order", "shuffle_seed")}
    index_file.write_text(json.dumps(old))  # an index written before the order was recorded
    assert "kept the source's order" in classes_per_batch("kept")[1]


def test_a_checkpoint_from_before_interleaving_resumes_only_with_one_shard_at_a_time(tmp_path):
    from vqgan.errors import DataError

    source = synthetic_shards(tmp_path / "shards", [4, 4, 4])
    before = build_dataloader(stream_config(source, shard_interleave=1), "train", batch_size=3, seed=1)
    saved = TrainState(batches_seen=1, stream_layout=dict(before.resume_layout))  # no shard_interleave key
    assert "shard_interleave" not in saved.stream_layout
    next(resumable_batches(None, build_dataloader(stream_config(source, shard_interleave=1), "train", batch_size=3,
                                                  seed=1), saved))
    with pytest.raises(DataError, match="shard_interleave None -> 8"):
        next(resumable_batches(None, build_dataloader(stream_config(source), "train", batch_size=3, seed=1), saved))


def test_the_class_mixing_benchmark_simulates_the_real_loaders_batches(tmp_path):
    import numpy as np

    from benchmarks.data import simulated_batches

    counts = [5, 3, 6, 4, 7, 2, 9]  # 36 samples whose keys are their positions
    source = synthetic_shards(tmp_path / "shards", counts)
    for workers, interleave in ((2, 8), (1, 1), (2, 3)):
        config = stream_config(source, num_workers=workers, shard_interleave=interleave)
        loader = build_dataloader(config, "train", batch_size=3, seed=5)
        for epoch in (0, 1):
            real = [[int(key.rsplit(":", 1)[1]) for key in keys] for keys in keys_of(loader.iterate(epoch))]
            [simulated] = simulated_batches(counts, np.arange(36), world=1, workers=workers, batch_size=3, seed=5,
                                            shuffle_buffer=config.shuffle_buffer, interleave=interleave, epoch=epoch)
            assert simulated.tolist() == real, (workers, interleave, epoch)


# ----------------------------------------------------------------------------- streamed prefetch (issue 20)


def test_a_streamed_dataset_is_read_ahead_by_a_thread_that_keeps_position_and_errors(tmp_path, no_shutdown_sleep):
    import threading
    import time

    from vqgan.data.streaming import PREFETCH_BATCHES
    from vqgan.errors import DataError

    root = parquet_dataset(tmp_path / "ds", files=2, rows_per_file=6)  # 12 rows: 6 batches of 2 an epoch
    config = streamed_config(tmp_path, root)
    reference = list(itertools.islice(iter(build_dataloader(config, "train", batch_size=2, seed=0)), 9))
    stream = build_dataloader(config, "train", batch_size=2, seed=0)
    made, decode = [], stream.make_item
    stream.make_item = lambda row, name, seed: made.append(name) or decode(row, name, seed)
    batches = iter(stream)
    taken = [next(batches)]
    deadline = time.monotonic() + 20
    while len(made) < 3 * 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the loop holds batch 0: the thread reads and decodes the next ones meanwhile
    time.sleep(0.2)
    assert 3 * 2 <= len(made) <= (2 + PREFETCH_BATCHES) * 2, made  # ahead, and bounded by the queue
    assert stream.position == [0, 1]  # the batches the loop took, not those made ahead
    taken += list(itertools.islice(batches, 6))
    assert stream.position == [1, 1]
    resumed = build_dataloader(config, "train", batch_size=2, seed=0)
    resumed.seek(*stream.position)
    taken += list(itertools.islice(iter(resumed), 2))
    assert labels_of(taken) == labels_of(reference)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(taken, reference))
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "vqgan-stream-prefetch" and t.is_alive()]

    broken = build_dataloader(config, "train", batch_size=2, seed=0)
    broken.make_item = lambda row, name, seed: 1 / 0  # an error in the thread reaches the loop
    with pytest.raises(ZeroDivisionError):
        next(iter(broken))
    with pytest.raises(DataError, match="fewer than batch_size=13"):
        next(iter(build_dataloader(config, "train", batch_size=13, seed=0)))
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "vqgan-stream-prefetch" and t.is_alive()]
