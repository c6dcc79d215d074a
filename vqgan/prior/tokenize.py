"""Encode an image dataset into a token dataset with a trained tokenizer, on one or many processes.

Each process encodes the rows `rank::world` of the source (no padding, so no row is encoded twice at an
uneven tail); the main process gathers the rows, puts them back in source order and writes the dataset
atomically with the tokenizer's identity in its metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vqgan.data import BadItem, DataConfig, build_dataset
from vqgan.export import VQTokenizer
from vqgan.prior.data import save_token_dataset
from vqgan.utils import images_from_model_range


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 over the tokenizer's config.json and weights: the identity a token dataset records."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class _Shard(Dataset):
    """Rows rank, rank + world, ... of `dataset`, each returned with its row index."""

    dataset: Dataset
    rank: int
    world: int

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world))

    def __getitem__(self, i: int) -> tuple[int, Any]:
        row = self.rank + i * self.world
        return row, self.dataset[row]


def _collate(items: list[tuple[int, Any]]) -> dict[str, Any]:
    good = [(row, item) for row, item in items if not isinstance(item, BadItem)]
    return {
        "rows": [row for row, _ in good],
        "images": torch.stack([item["image"] for _, item in good]) if good else None,  # (B', 3, S, S) in [-1, 1]
        "labels": [item.get("label") for _, item in good],
        "skipped": [item.name for _, item in items if isinstance(item, BadItem)],
    }


@torch.no_grad()
def tokenize_dataset(
    accelerator: Accelerator,
    tokenizer_path: str | Path,
    data: DataConfig,
    out_path: str | Path,
    split: str = "train",
    batch_size: int = 32,
    hflip_rows: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the token dataset of `data`'s `split` to `out_path`; returns its metadata (on every process)."""
    tokenizer = VQTokenizer.from_pretrained(tokenizer_path, device=accelerator.device)
    source = build_dataset(data, split, seed=seed)
    shard = _Shard(source, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=data.num_workers, collate_fn=_collate)

    records: list[tuple[int, bool, list, Any]] = []  # (row, flipped, tokens, label)
    skipped: list[str] = []
    for batch in tqdm(loader, desc=f"tokenize {split}", disable=not accelerator.is_local_main_process):
        skipped.extend(batch["skipped"])
        if batch["images"] is None:
            continue
        images = images_from_model_range(batch["images"].to(accelerator.device))  # (B, 3, S, S) in [0, 1]
        variants = [(False, images)] + ([(True, images.flip(-1))] if hflip_rows else [])
        for flipped, view in variants:
            ids = tokenizer.encode(view).cpu()  # (B, h, w)
            records.extend((row, flipped, grid.tolist(), label)
                           for row, grid, label in zip(batch["rows"], ids, batch["labels"]))

    records = gather_object(records)
    skipped = gather_object(skipped)
    h, w = tokenizer.grid_shape(data.image_size, data.image_size)
    metadata = {"num_codes": tokenizer.num_codes, "grid": [h, w], "tokenizer_hash": tokenizer_fingerprint(tokenizer_path),
                "tokenizer": str(tokenizer_path), "source": data.source, "split": split, "hflip_rows": hflip_rows,
                "num_rows": len(records), "skipped_files": len(skipped)}
    if accelerator.is_main_process:
        if not records:
            raise ValueError(f"no image of {data.source} [{split}] could be tokenized ({len(skipped)} unreadable)")
        records.sort(key=lambda record: (record[0], record[1]))
        tokens = torch.tensor([record[2] for record in records], dtype=torch.long)  # (N, h, w)
        has_labels = records[0][3] is not None
        labels = [record[3] for record in records] if has_labels else None
        save_token_dataset(out_path, tokens, labels, metadata)
    accelerator.wait_for_everyone()
    return metadata
