"""Token datasets: the (h, w) grids a tokenizer produced, saved for training a prior.

Multi-scale tokenizers (kind msvq) give each image one flat sequence of sum(s * s) ids, scale after scale:
their rows are (L,) instead of (h, w), and the metadata says so with "scales" (`token_row_shape`).

Two layouts on disk, both with `tokenizer.json` ({"num_codes", "grid", "tokenizer_hash", ...}) so that
a prior refuses tokens from a tokenizer with another codebook size or grid:

- sharded (what tokenization writes): `tokens-RANK-PART.npy` (n, h, w) uint16 (int32 when K > 65536),
  `labels-...npy` (n,) int64 and `keys-...npy` (n,) int64 (2 x source row + flipped), one set per
  process and chunk, listed in tokenizer.json["shards"]. The prior reads them memory-mapped
  (`TokenGrids`): every rank of a node shares one page-cached copy instead of holding an int64 copy
  of the whole set each (ImageNet with flipped rows: ~5 GB per rank before).
- a HF `datasets` dataset (`save_to_disk`) with columns "tokens" and an optional "label"
  (`save_token_dataset`, for token sets built in memory); read into memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vqgan.errors import DataError
from vqgan.utils import atomic_write_text, replace_folder_atomically

METADATA_FILE = "tokenizer.json"
METADATA_KEYS = ("num_codes", "grid", "tokenizer_hash")


def check_token_dataset(metadata: dict[str, Any], num_codes: int, grid: Sequence[int],
                        scales: Sequence[int] | None = None) -> None:
    """Raise DataError (a ValueError) when the dataset's codebook size, grid or scale layout differ from the prior's.

    `scales`: the next-scale prior's pyramid; None for the one-grid priors, which refuse a multi-scale set
    (metadata "scales": more than one side, the layout of each row's sum(s * s) ids, coarse to fine).
    """
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise DataError(f"token dataset metadata lacks {missing}; expected keys {list(METADATA_KEYS)}")
    data_scales = tuple(int(s) for s in metadata.get("scales") or ())
    if scales is None and len(data_scales) > 1:
        raise DataError(
            f"token dataset holds multi-scale tokens (scales {list(data_scales)}, {sum(s * s for s in data_scales)} "
            f"ids per image, tokenizer {metadata['tokenizer_hash']}): a one-grid prior cannot read them; "
            "train the next-scale prior (prior: var) on them, or tokenize with a one-scale tokenizer"
        )
    if scales is not None and data_scales != tuple(scales):
        raise DataError(f"token dataset has scales {list(data_scales) or 'none (one grid)'}, the next-scale prior "
                        f"expects scales {list(scales)} (tokenizer {metadata['tokenizer_hash']})")
    problems = []
    if int(metadata["num_codes"]) != num_codes:
        problems.append(f"num_codes: dataset has K={metadata['num_codes']}, prior expects K={num_codes}")
    if tuple(metadata["grid"]) != tuple(grid):
        problems.append(f"grid: dataset has {tuple(metadata['grid'])}, prior expects {tuple(grid)}")
    if problems:
        raise DataError(
            "token dataset does not match the prior config (tokenizer "
            f"{metadata['tokenizer_hash']}): " + "; ".join(problems)
        )


def token_row_shape(metadata: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one row of a token set: (h, w) for one grid, (sum s * s,) for a multi-scale set ("scales")."""
    scales = [int(s) for s in metadata.get("scales") or ()]
    if len(scales) > 1:
        return (sum(s * s for s in scales),)
    return tuple(int(s) for s in metadata["grid"])


def save_token_dataset(
    path: str | Path, tokens: Tensor, labels: Tensor | Sequence[int] | None, metadata: dict[str, Any]
) -> None:
    """Write (N, h, w) tokens and optional (N,) labels with metadata; a reader never sees half a dataset."""
    path = Path(path)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (N, h, w), got shape {tuple(tokens.shape)}")
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}; expected keys {list(METADATA_KEYS)}")
    if tuple(metadata["grid"]) != tuple(tokens.shape[1:]):
        raise ValueError(f"metadata grid {tuple(metadata['grid'])} does not match tokens of shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= int(metadata["num_codes"])):
        raise ValueError(
            f"token ids must lie in [0, {metadata['num_codes']}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )
    features = {"tokens": datasets.List(datasets.List(datasets.Value("int32")))}
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() != tokens.shape[0]:
            raise ValueError(f"got {labels.numel()} labels for {tokens.shape[0]} token grids")
        features["label"] = datasets.Value("int64")
    meta = {"num_codes": int(metadata["num_codes"]), "grid": [int(s) for s in metadata["grid"]],
            "tokenizer_hash": str(metadata["tokenizer_hash"])}
    meta.update({k: v for k, v in metadata.items() if k not in meta})

    def write(folder: Path) -> None:
        _token_table(tokens, labels, datasets.Features(features)).save_to_disk(str(folder))
        atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2))

    replace_folder_atomically(path, write)


def _token_table(tokens: Tensor, labels: Tensor | None, features: datasets.Features,
                 rows_per_part: int = 16384) -> datasets.Dataset:
    """Arrow table of the grids, built a slice at a time: Python lists of a whole ImageNet (hundreds of
    millions of ints) would not fit in memory, a 16k-row slice does."""
    parts = []
    for begin in range(0, max(1, tokens.shape[0]), rows_per_part):
        columns: dict[str, Any] = {"tokens": tokens[begin : begin + rows_per_part].int().tolist()}
        if labels is not None:
            columns["label"] = labels[begin : begin + rows_per_part].tolist()
        parts.append(datasets.Dataset.from_dict(columns, features=features))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_token_dataset(path: str | Path) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Read a dataset written by `save_token_dataset` -> (dataset, metadata)."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a token dataset (expected {METADATA_FILE})")
    metadata = json.loads(meta_path.read_text())
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}; expected keys {list(METADATA_KEYS)}")
    if metadata.get("format") == SHARDED_FORMAT:  # small sets and tests: the sharded layout, in memory
        grids = TokenGrids(path, metadata)
        tokens = torch.from_numpy(grids.tokens_in_order().astype(np.int32))
        columns: dict[str, Any] = {"tokens": tokens.tolist()}
        row = datasets.Value("int32") if tokens.dim() == 2 else datasets.List(datasets.Value("int32"))
        features = {"tokens": datasets.List(row)}
        if grids.labels is not None:
            columns["label"], features["label"] = grids.labels[grids.order].tolist(), datasets.Value("int64")
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), metadata
    dataset = datasets.load_from_disk(str(path))
    if "tokens" not in dataset.column_names:
        raise ValueError(f"{path} has columns {dataset.column_names}; expected 'tokens' (and optional 'label')")
    return dataset, metadata


def token_dataset_tensors(dataset: datasets.Dataset) -> tuple[Tensor, Tensor | None]:
    """Whole dataset in memory -> ((N, h, w) long tokens, (N,) long labels or None)."""
    columns = dataset.with_format("torch")[:]  # one dict of stacked tensors
    tokens = columns["tokens"].long()
    labels = columns["label"].long() if "label" in columns else None
    return tokens, labels


# ----------------------------------------------------------------------------- sharded, memory-mapped layout

SHARDED_FORMAT = "npy-shards"


def token_dtype(num_codes: int) -> np.dtype:
    """The narrowest integer type that holds ids [0, num_codes): 2 bytes a token up to K = 65536."""
    return np.dtype(np.uint16) if num_codes <= 1 << 16 else np.dtype(np.int32)


def shard_stem(rank: int, part: int) -> str:
    return f"{rank:05d}-{part:04d}"


def write_token_shard(folder: str | Path, rank: int, part: int, tokens: np.ndarray, labels: np.ndarray | None,
                      keys: np.ndarray, num_codes: int) -> dict[str, Any]:
    """Write one process's chunk of grids into `folder` (each file renamed into place whole); -> its entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokens.ndim not in (2, 3) or keys.shape != (tokens.shape[0],):
        raise ValueError(f"tokens must be (n, h, w) grids or (n, L) multi-scale sequences with n keys, got "
                         f"{tokens.shape} and {keys.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= num_codes):
        raise ValueError(f"token ids must lie in [0, {num_codes}), got [{int(tokens.min())}, {int(tokens.max())}]")
    stem = shard_stem(rank, part)
    arrays = {"tokens": tokens.astype(token_dtype(num_codes)), "keys": keys.astype(np.int64)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    for name, array in arrays.items():
        final = folder / f"{name}-{stem}.npy"
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, final)
    return {"stem": stem, "rows": int(tokens.shape[0]), "labels": labels is not None}


def finish_token_shards(folder: str | Path, entries: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    """Write tokenizer.json listing the shards (last: a folder with it is complete); checks labels agree."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}; expected keys {list(METADATA_KEYS)}")
    entries = [e for e in entries if e["rows"] > 0]
    if not entries:
        raise ValueError("no token grids to write: every process produced none")
    with_labels = {e["labels"] for e in entries}
    if len(with_labels) != 1:
        raise ValueError("some token shards have labels and some do not")
    meta = {**metadata, "format": SHARDED_FORMAT, "shards": sorted(entries, key=lambda e: e["stem"]),
            "num_rows": sum(e["rows"] for e in entries), "has_labels": with_labels.pop()}
    atomic_write_text(Path(folder) / METADATA_FILE, json.dumps(meta, indent=2))


class TokenGrids(Dataset):
    """Memory-mapped sharded token set: item i = ((h, w) long tokens,) or (tokens, label), in source order;
    ((L,) tokens,) for a multi-scale set (`token_row_shape`).

    Nothing is read until indexed; `__getitems__` reads a whole batch with one fancy index per shard.
    Row i is the i-th in key order (source row, then its flipped copy), whatever the number of
    processes that tokenized it; except for a streamed hub source that datasets split by files (no
    hold-out or cap), whose keys are unique but whose order depends on it (vqgan.prior.tokenize).
    """

    def __init__(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or json.loads((self.path / METADATA_FILE).read_text())
        if self.metadata.get("format") != SHARDED_FORMAT:
            raise ValueError(f"{path} is not a sharded token dataset (format {self.metadata.get('format')!r})")
        self.row_shape = token_row_shape(self.metadata)
        self.tokens, labels, keys = [], [], []
        for entry in self.metadata["shards"]:
            stem = entry["stem"]
            files = [self.path / f"{name}-{stem}.npy" for name in ("tokens", "keys") + (("labels",) if entry["labels"] else ())]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"token dataset {path} is incomplete: {absent[0]} is missing")
            grid = np.load(files[0], mmap_mode="r")
            if grid.shape[0] != entry["rows"] or tuple(grid.shape[1:]) != self.row_shape:
                raise ValueError(f"{files[0]} holds {grid.shape}, its index says {entry['rows']} rows of "
                                 f"{list(self.row_shape)}")
            self.tokens.append(grid)
            keys.append(np.load(files[1]))
            if entry["labels"]:
                labels.append(np.load(files[2], mmap_mode="r"))
        self.offsets = np.cumsum([0] + [t.shape[0] for t in self.tokens])
        # (n,) int64 each: a few bytes a row, against h * w * 8 for an int64 copy of the grids
        self.order = np.argsort(np.concatenate(keys), kind="stable")
        self.labels = np.concatenate(labels) if labels else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), *row_shape) grids of physical rows, read shard by shard."""
        out = np.empty((len(rows), *self.row_shape), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = rows[where] - self.offsets[shard]
            sort = np.argsort(local)  # memmap reads in file order
            out[where[sort]] = self.tokens[shard][local[sort]]
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, ...]]:
        rows = self.order[np.asarray(indices, dtype=np.int64)]
        grids = torch.from_numpy(self._rows(rows))
        if self.labels is None:
            return [(grid,) for grid in grids]
        labels = torch.from_numpy(self.labels[rows].astype(np.int64))
        return list(zip(grids, labels))

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.__getitems__([index])[0]

    def tokens_in_order(self) -> np.ndarray:
        return self._rows(self.order)


def open_token_grids(path: str | Path) -> tuple[Dataset, Tensor | None, dict[str, Any]]:
    """Either layout as a map-style dataset of (tokens,) / (tokens, label) -> (dataset, labels or None, metadata)."""
    meta_path = Path(path) / METADATA_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("format") == SHARDED_FORMAT:
        grids = TokenGrids(path)
        labels = None if grids.labels is None else torch.from_numpy(grids.labels[grids.order].astype(np.int64))
        return grids, labels, grids.metadata
    dataset, metadata = load_token_dataset(path)
    tokens, labels = token_dataset_tensors(dataset)
    columns = (tokens,) if labels is None else (tokens, labels)
    return torch.utils.data.TensorDataset(*columns), labels, metadata
