"""Encode an image dataset into a token dataset with a trained tokenizer, on one or many processes.

Each process encodes the rows `rank::world` of the source (no padding, so no row is encoded twice at an
uneven tail); the main process gathers the rows, puts them back in source order and writes the dataset
atomically with the tokenizer's identity in its metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vqgan.data import BadItem, DataConfig, build_dataset
from vqgan.export import CONFIG_NAME, ExportError, VQTokenizer, read_tokenizer_config
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


def _tokenizer_config_file(tokenizer_path: str | Path) -> Path:
    """config.json of a local tokenizer folder, or of a Hub repo (that one file only, no weights)."""
    path = Path(tokenizer_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ExportError(f"tokenizer folder {path} has no {CONFIG_NAME}")
        return path / CONFIG_NAME
    text = str(tokenizer_path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ExportError(f"tokenizer folder {text} does not exist (and is not a Hub repo id such as 'owner/name')")
    from huggingface_hub import hf_hub_download  # only here: local folders need no hub client

    try:
        return Path(hf_hub_download(repo_id=text, filename=CONFIG_NAME))
    except Exception as err:  # offline, unknown repo, bad id: all mean the same to the caller
        raise ExportError(f"{text} is not a local folder and its {CONFIG_NAME} could not be fetched: {err}") from err


def check_tokenizer_fits_prior(tokenizer_path: str, data: DataConfig, num_codes: int, grid: Sequence[int],
                               num_classes: int, *, prior: str = "transformer") -> None:
    """Raise ValueError naming the recipe keys when tokenizing `data` would give tokens the prior cannot use.

    Reads only the tokenizer's config.json (no weights), so a run fails in seconds instead of after
    tokenizing a whole dataset. `prior` is the recipe section of the prior ("transformer" / "pixelcnn").
    Checks K (codebook size = prior's num_codes), the grid (data.image_size / downsampling factor, the
    crops being square) and that a class-conditional prior will get labels.
    """
    config, _ = read_tokenizer_config(_tokenizer_config_file(tokenizer_path))
    k, f, size = config.quantizer.num_codes, config.downsample_factor, data.image_size
    grid = tuple(grid)
    problems = []
    if k != num_codes:
        problems.append(f"{prior}.num_codes={num_codes} but tokenizer {tokenizer_path} has K={k}: set "
                        f"{prior}.num_codes={k}, or tokens.tokenizer to a tokenizer with K={num_codes}")
    if size % f:
        problems.append(f"tokens.data.image_size={size} is not a multiple of the downsampling factor f={f} of "
                        f"tokenizer {tokenizer_path}: set tokens.data.image_size to a multiple of {f}")
    elif (size // f, size // f) != grid:
        side = size // f
        fix = f"set {prior}.grid=[{side}, {side}]"
        if grid[0] == grid[1]:
            fix += f" or tokens.data.image_size={grid[0] * f}"
        problems.append(f"{prior}.grid={list(grid)} but tokens.data.image_size={size} / f={f} of tokenizer "
                        f"{tokenizer_path} gives a {side}x{side} grid: {fix}")
    if num_classes > 0 and not data.label_column:
        problems.append(f"{prior}.num_classes={num_classes} but tokens.data.label_column is not set, so the "
                        f"tokens would have no labels: set tokens.data.label_column (e.g. label) or "
                        f"{prior}.num_classes=0")
    if problems:
        raise ValueError("the tokenizer and tokens.data do not fit the prior: " + "; ".join(problems))


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

    keys, grids, labels, skipped = [], [], [], []  # this process's rows: key = 2 * row + flipped
    for batch in tqdm(loader, desc=f"tokenize {split}", disable=not accelerator.is_local_main_process):
        skipped.extend(batch["skipped"])
        if batch["images"] is None:
            continue
        images = images_from_model_range(batch["images"].to(accelerator.device))  # (B, 3, S, S) in [0, 1]
        rows = torch.tensor(batch["rows"], dtype=torch.long)
        variants = [(0, images)] + ([(1, images.flip(-1))] if hflip_rows else [])
        for flipped, view in variants:
            keys.append(2 * rows + flipped)
            grids.append(tokenizer.encode(view).to(torch.int32).cpu())  # (B, h, w)
            labels.append(torch.tensor([-1 if label is None else label for label in batch["labels"]]))

    # Each process leaves its rows in a shard file and the main process merges them: gathering Python
    # objects would copy every process's tokens to every process (ImageNet: tens of GB each).
    h, w = tokenizer.grid_shape(data.image_size, data.image_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shard = out_path.parent / f".{out_path.name}.shard{accelerator.process_index}.safetensors"
    empty = torch.zeros(0, dtype=torch.long)
    save_file({"keys": torch.cat(keys) if keys else empty,
               "tokens": torch.cat(grids) if grids else torch.zeros(0, h, w, dtype=torch.int32),
               "labels": torch.cat(labels) if labels else empty}, shard)
    skipped = gather_object(skipped)
    num_rows = sum(gather_object([sum(len(k) for k in keys)]))
    accelerator.wait_for_everyone()
    metadata = {"num_codes": tokenizer.num_codes, "grid": [h, w], "tokenizer_hash": tokenizer_fingerprint(tokenizer_path),
                "tokenizer": str(tokenizer_path), "source": data.source, "split": split, "hflip_rows": hflip_rows,
                "num_rows": num_rows, "skipped_files": len(skipped)}
    if accelerator.is_main_process:
        shards = [out_path.parent / f".{out_path.name}.shard{rank}.safetensors" for rank in range(accelerator.num_processes)]
        parts = [load_file(path) for path in shards]
        merged = {name: torch.cat([part[name] for part in parts]) for name in ("keys", "tokens", "labels")}
        if merged["keys"].numel() == 0:
            raise ValueError(f"no image of {data.source} [{split}] could be tokenized ({len(skipped)} unreadable)")
        order = merged["keys"].argsort()  # back to source order, each row's flipped copy after it
        has_labels = bool((merged["labels"] >= 0).all())
        save_token_dataset(out_path, merged["tokens"][order], merged["labels"][order] if has_labels else None, metadata)
        for path in shards:
            path.unlink()
    accelerator.wait_for_everyone()
    return metadata
