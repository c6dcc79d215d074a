"""Encode an image dataset into a token dataset with a trained tokenizer, on one or many processes.

Each process encodes its share of the source (`Source.rows`: a block of a table's or the shards' rows,
vqgan.data.ranks.rank_share; a streamed hub dataset's rows as datasets splits them; no padding, so no
row is encoded twice at an uneven tail) and writes its own token shards; the
main process writes the index with the tokenizer's identity and renames the folder into place. Rows
carry their source key, so readers see them in source order whatever the number of processes (streamed
hub sources split by files, without a hold-out or cap: in an order that depends on it; see
vqgan.data.streaming.StreamedRows).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vqgan.data import BadItem, DataConfig, source_of
from vqgan.errors import DataError
from vqgan.folder_format import CONFIG_NAME, ExportError, read_tokenizer_config
from vqgan.prior.data import finish_token_shards, write_token_shard
from vqgan.prior.tokenizer_identity import (  # noqa: F401  (tokenizer_fingerprint: re-exported)
    TokenizerIdentity,
    resolve_tokenizer,
    tokenizer_fingerprint,
)
from vqgan.tokenizer import VQTokenizer
from vqgan.utils import images_from_model_range, replace_folder_atomically


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
                               num_classes: int, *, prior: str = "transformer",
                               scales: Sequence[int] | None = None) -> None:
    """Raise ValueError naming the recipe keys when tokenizing `data` would give tokens the prior cannot use.

    Reads only the tokenizer's config.json (no weights), so a run fails in seconds instead of after
    tokenizing a whole dataset. `prior` is the recipe section of the prior ("transformer" / "pixelcnn").
    Checks K (codebook size = prior's num_codes), the grid (data.image_size / downsampling factor, the
    crops being square), that a class-conditional prior will get labels, and the scale layout: `scales` (the
    next-scale prior's) must be the multi-scale tokenizer's, and None (a one-grid prior) needs a one-grid tokenizer.
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
    multi_scale = tuple(config.quantizer.scales) if config.quantizer.kind == "msvq" else None
    if scales is not None and multi_scale != tuple(scales):
        problems.append(f"{prior}.scales={list(scales)} but tokenizer {tokenizer_path} has "
                        + (f"scales {list(multi_scale)}: set {prior}.scales={list(multi_scale)}" if multi_scale else
                           f"one grid (kind {config.quantizer.kind}): the next-scale prior needs a kind=msvq tokenizer"))
    if scales is None and multi_scale is not None:
        problems.append(f"tokenizer {tokenizer_path} is multi-scale (kind msvq, scales {list(multi_scale)}): "
                        f"a one-grid prior cannot read its tokens; set prior: var")
    if num_classes > 0 and not data.label_column:
        problems.append(f"{prior}.num_classes={num_classes} but tokens.data.label_column is not set, so the "
                        f"tokens would have no labels: set tokens.data.label_column (e.g. label) or "
                        f"{prior}.num_classes=0")
    if problems:
        raise DataError("the tokenizer and tokens.data do not fit the prior: " + "; ".join(problems))


def _collate(items: list[tuple[int, Any]]) -> dict[str, Any]:
    good = [(row, item) for row, item in items if not isinstance(item, BadItem)]
    return {
        "rows": [row for row, _ in good],
        "images": torch.stack([item["image"] for _, item in good]) if good else None,  # (B', 3, S, S) in [-1, 1]
        "labels": [item.get("label") for _, item in good],
        "skipped": [item.name for _, item in items if isinstance(item, BadItem)],
    }


# Grids per token shard file: ~33 MB of uint16 at 16x16 tokens; a process holds at most one chunk.
ROWS_PER_SHARD = 65536

# How the encoder runs: "fp32" gives the ids VQTokenizer.encode gives (CPU or GPU, TF32 off, so ids do not
# depend on the device beyond float rounding); "bf16" (autocast) is faster on GPUs and may move ids whose
# nearest codes are near ties. Recorded in the token metadata either way.
EncodePrecision = Literal["fp32", "bf16"]
ENCODE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encode precision {precision!r} is not one of {list(ENCODE_PRECISIONS)}")


@contextmanager
def encoder_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run the encoder in `precision`: fp32 with TF32 off (restored after), or bf16 autocast."""
    check_precision(precision)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    # NOTE: PyTorch runs cuDNN convolutions in TF32 by default; that is not the fp32 the API's ids promise
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):  # a caller's autocast must not reach the encoder
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    rows_per_shard: int = ROWS_PER_SHARD,
    precision: EncodePrecision = "fp32",
    revision: str | None = None,
) -> dict[str, Any]:
    """Write the token dataset of `data`'s `split` to `out_path`; returns its metadata (on every process).

    Any source streams through (`Source.rows`): map-style rows and "wds:" shards in blocks by process,
    streamed hub datasets as datasets splits them. Each process writes its own token shards
    (vqgan.prior.data, sharded layout) into a hidden folder beside `out_path`; the main process writes
    the index and renames the folder into place, so a reader never sees half a dataset. The tokenizer (folder or Hub repo id) is resolved and
    fingerprinted once, before any image is encoded (a Hub id at `revision`, pinned to the commit the
    main process resolved); the metadata records it and the encoder `precision`.
    """
    device = accelerator.device
    check_precision(precision)  # before any work
    folder, identity = resolve_on_every_process(accelerator, tokenizer_path, revision)
    tokenizer = VQTokenizer.from_pretrained(folder, device=device)
    source = source_of(data)
    rows = source.rows(split, seed, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=source.rows_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    h, w = tokenizer.grid_shape(data.image_size, data.image_size)
    # msvq: each row is one flat sequence of sum(s * s) ids, scale after scale (vqgan.prior.data.token_row_shape)
    scales = list(tokenizer.model.quantizer.scales) if tokenizer.config.quantizer.kind == "msvq" else None
    out_path = Path(out_path).absolute()
    partial = out_path.parent / f".{out_path.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        entries, skipped = _encode_rows(accelerator, tokenizer, loader, partial, data, split, hflip_rows,
                                        rows_per_shard, precision)
    except BaseException:
        if accelerator.is_main_process:  # never leave a half-written dataset behind
            shutil.rmtree(partial, ignore_errors=True)
        raise

    entries = gather_object(entries)
    skipped = gather_object(skipped)
    num_rows = sum(e["rows"] for e in entries)
    metadata = {"num_codes": tokenizer.num_codes, "grid": [h, w], **({"scales": scales} if scales else {}),
                **identity.metadata(),
                "encode_precision": precision, "source": data.source, "split": split, "hflip_rows": hflip_rows,
                "num_rows": num_rows, "skipped_files": len(skipped)}
    accelerator.wait_for_everyone()
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            if num_rows == 0:
                raise DataError(f"no image of {data.source} [{split}] could be tokenized ({len(skipped)} unreadable)")
            finish_token_shards(partial, entries, metadata)
            replace_folder_atomically(out_path, lambda tmp: _move_contents(partial, tmp))
        except Exception as err:
            error = err
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    if error is not None:
        raise error
    accelerator.wait_for_everyone()
    return metadata


def resolve_on_every_process(accelerator: Accelerator, tokenizer_path: str | Path,
                             revision: str | None) -> tuple[Path, TokenizerIdentity]:
    """The main process resolves the tokenizer (a Hub id to a commit), the others fetch that very commit;
    every process checks that it holds the same files, so no rank encodes with other weights."""
    from accelerate.utils import broadcast_object_list

    resolved: list[TokenizerIdentity | Exception | None] = [None]
    if accelerator.is_main_process:
        try:
            resolved = [resolve_tokenizer(tokenizer_path, revision=revision)[1]]
        except ValueError as err:  # ExportError: every process raises it, none waits for a broadcast forever
            resolved = [err]
    identity = broadcast_object_list(resolved)[0]
    if isinstance(identity, Exception):
        raise identity
    pinned = identity.revision if identity.revision else revision
    folder, mine = resolve_tokenizer(tokenizer_path, revision=pinned)
    if mine.hash != identity.hash:
        raise DataError(f"process {accelerator.process_index} reads tokenizer {mine.describe()} but the main process "
                        f"read {identity.describe()}: the tokenizer must be the same files on every process "
                        "(a shared folder, not rewritten while tokenizing)")
    return folder, identity


def _encode_rows(accelerator: Accelerator, tokenizer: VQTokenizer, loader: DataLoader, partial: Path,
                 data: DataConfig, split: str, hflip_rows: bool, rows_per_shard: int,
                 precision: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Encode this process's rows into token shards in `partial` -> (their entries, names of unreadable files)."""
    device = accelerator.device
    entries: list[dict[str, Any]] = []
    keys, grids, labels, skipped = [], [], [], []  # this process's current chunk: key = 2 * row + flipped

    def flush() -> None:
        if keys:
            entries.append(write_token_shard(
                partial, accelerator.process_index, len(entries), np.concatenate(grids),
                np.concatenate(labels) if data.label_column else None, np.concatenate(keys), tokenizer.num_codes))
            keys.clear(), grids.clear(), labels.clear()

    held = 0
    for batch in tqdm(loader, desc=f"tokenize {split}", disable=not accelerator.is_local_main_process):
        skipped.extend(batch["skipped"])
        if batch["images"] is None:
            continue
        images = images_from_model_range(batch["images"].to(device, non_blocking=True))  # (B, 3, S, S) in [0, 1]
        row_keys = torch.tensor(batch["rows"], dtype=torch.long)
        variants = [(0, images)] + ([(1, images.flip(-1))] if hflip_rows else [])
        for flipped, view in variants:
            with encoder_precision(precision, device):
                codes = tokenizer.encode(view)  # (B, h, w), or (B, sum s * s) for msvq
            keys.append((2 * row_keys + flipped).numpy())
            grids.append(codes.to(torch.int32).cpu().numpy())
            labels.append(np.array([-1 if label is None else label for label in batch["labels"]], dtype=np.int64))
            held += len(row_keys)
        if held >= rows_per_shard:
            flush()
            held = 0
    flush()
    return entries, skipped


def _move_contents(source: Path, target: Path) -> None:
    for path in source.iterdir():
        os.replace(path, target / path.name)
