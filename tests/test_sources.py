"""The one Source interface: every source kind gives each row to exactly one process, by the one rule."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from test_streams import no_shutdown_sleep, parquet_dataset  # noqa: F401  (a fixture)
from vqgan.data import DataConfig, rank_share, source_of
from vqgan.data.make_shards import load_rows, make_shards
from vqgan.errors import DataError


def test_rank_share_blocks_are_disjoint_and_cover_every_item_once():
    for total in range(0, 23):
        for world in range(1, 6):
            blocks = [rank_share(total, rank, world) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(total))  # in rank order, no gap, no overlap
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            equal = [rank_share(total, rank, world, equal=True) for rank in range(world)]
            assert [i for block in equal for i in block] == list(range(world * (total // world)))
            assert {len(block) for block in equal} == {total // world}  # processes that step together
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        rank_share(4, 2, 2)


ROWS = 12  # 4 parquet files of 3 rows, labels 0..11


def config_of(kind: str, tmp_path) -> DataConfig:
    """The same 12 labelled images as a table, as shards written by the shard tool, and as a stream."""
    root = tmp_path / "ds"
    if not root.exists():
        parquet_dataset(root, files=4, rows_per_file=3)
    common = dict(image_column="img", label_column="label", image_size=32, num_workers=2,
                  cache_dir=str(tmp_path / "hf_cache"))
    if kind == "map":
        return DataConfig(source=str(root), **common)
    if kind == "stream":
        return DataConfig(source=str(root), streaming=True, **common)
    out = tmp_path / "shards"
    make_shards(str(root), out, shard_size=5, image_column="img", label_column="label", cache_dir=common["cache_dir"],
                progress=False)
    return DataConfig(source=f"wds:{out}/shard-{{000000..000002}}.tar", label_column="cls",
                      image_size=32, num_workers=2)


@pytest.mark.parametrize("kind", ["map", "shards", "stream"])
def test_every_source_kind_gives_each_row_to_exactly_one_process(tmp_path, no_shutdown_sleep, kind):  # noqa: F811
    source = source_of(config_of(kind, tmp_path))
    assert type(source).__name__ == {"map": "MapSource", "shards": "ShardSource", "stream": "StreamSource"}[kind]
    for world in (1, 2, 3, 5):  # 5: blocks of 2 and 3 rows (a stream: datasets' split by example)
        keys, labels = [], []
        for rank in range(world):
            rows = source.rows("train", 0, rank, world)  # what tokenization reads, the way it reads it
            loader = DataLoader(rows, batch_size=2, num_workers=source.rows_workers, collate_fn=list)
            pairs = [pair for batch in loader for pair in batch]
            keys += [key for key, _ in pairs]
            labels += [item["label"] for _, item in pairs]
        assert sorted(labels) == list(range(ROWS)), (kind, world)  # every image once over all processes
        assert len(set(keys)) == ROWS, (kind, world)  # and a key of its own
        assert sorted(keys) == list(range(ROWS)), (kind, world)  # (a stream split by files: as many rows each)


def test_the_shard_tool_reads_through_the_source_and_refuses_a_stream_or_shards(tmp_path):
    config = config_of("map", tmp_path)
    table = load_rows(config.source, "train", "img", "label", config.cache_dir)
    assert table["label"] == list(range(ROWS))
    with pytest.raises(DataError, match="is shards already"):
        load_rows("wds:/nowhere/shard-000000.tar", "train", "image", None, None)
