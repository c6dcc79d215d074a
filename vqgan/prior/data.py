"""Token datasets: the (h, w) grids a tokenizer produced, saved for training a prior.

On disk: a HF `datasets` dataset (`save_to_disk`) with columns "tokens" (h lists of w ints) and an
optional "label", plus `tokenizer.json` in the same folder with {"num_codes", "grid", "tokenizer_hash"}
so that a prior refuses tokens from a tokenizer with another codebook size or grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch
from torch import Tensor

from vqgan.utils import atomic_write_text, replace_folder_atomically

METADATA_FILE = "tokenizer.json"
METADATA_KEYS = ("num_codes", "grid", "tokenizer_hash")


def check_token_dataset(metadata: dict[str, Any], num_codes: int, grid: Sequence[int]) -> None:
    """Raise ValueError when the dataset's codebook size or grid differ from the prior's config."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"token dataset metadata lacks {missing}; expected keys {list(METADATA_KEYS)}")
    problems = []
    if int(metadata["num_codes"]) != num_codes:
        problems.append(f"num_codes: dataset has K={metadata['num_codes']}, prior expects K={num_codes}")
    if tuple(metadata["grid"]) != tuple(grid):
        problems.append(f"grid: dataset has {tuple(metadata['grid'])}, prior expects {tuple(grid)}")
    if problems:
        raise ValueError(
            "token dataset does not match the prior config (tokenizer "
            f"{metadata['tokenizer_hash']}): " + "; ".join(problems)
        )


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
