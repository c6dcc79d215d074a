"""Image sources for FID: folders, datasets, a tokenizer's reconstructions, a prior's samples; sharded and streamed.

A source is
    DIR                      a folder of images (png/jpg/jpeg/bmp/webp, searched recursively, sorted; mixed
                             sizes are fine: the network resizes each image to 299x299 on its own)
    FILE.npz                 statistics written by `vqgan-fid --save-stats` (refused when from another extractor)
    hf:NAME_OR_PATH          a `datasets` dataset: hub name, a save_to_disk folder, or an imagefolder directory
    recon:TOKENIZER          the tokenizer's reconstructions of another source (rFID)
    prior:PRIOR              samples of a prior decoded by its tokenizer (gFID)
and, for vqgan-evaluate, the "train" or "eval" split of a training DataConfig (`data_config_source`).

Each process streams a disjoint shard of the images into float64 sums (sum x, sum x x^T, count), and one
all-reduce of those sums yields exactly the single-process statistics: no padding, no duplicates, and
O(D^2) traffic however many images (gather_for_metrics would move N x D features and needs a DataLoader
prepared by Accelerate, which a tokenizer's or prior's batches are not).

A protocol fixes the preprocessing before the extractor (vqgan/metrics/protocols.py): papers' rFID on
ImageNet val resizes the shorter side to 256 and centre-crops, and a number is only comparable under it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from einops import rearrange
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from vqgan.image_io import float_to_uint8
from vqgan.metrics.fid import FIDStats, accumulate_features
from vqgan.metrics.inception import InceptionFeatures
from vqgan.metrics.protocols import preprocess
from vqgan.utils import is_distributed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
Batches = Iterable[torch.Tensor]  # uint8 (B, 3, H, W)


@dataclass(frozen=True)
class SourceOptions:
    """How sources are read: the settings of `vqgan-fid` that are not the sources themselves."""

    batch_size: int = 64
    num_workers: int = 0
    max_images: int | None = None
    protocol: str = "native"  # see vqgan.metrics.protocols.PROTOCOLS
    split: str = "train"  # hf: dataset split
    config: str | None = None  # hf: dataset configuration
    image_column: str | None = None  # hf: image column (default: the first Image feature)
    images: str | None = None  # recon: the images to reconstruct (default: the other source)
    num_samples: int | None = None  # prior: number of samples
    seed: int = 0  # prior: batch b of the samples draws from seed + b, whatever the number of processes
    prior_tokenizer: str | None = None  # prior: the tokenizer decoding the samples (default: the prior's)
    allow_tokenizer_mismatch: bool = False  # prior: decode with a tokenizer whose hash is not the prior's (warns)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    steps: int = 12  # prior: MaskGIT's parallel decoding steps (the other families ignore the three below)
    mask_schedule: str = "cosine"
    choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"--max-images must be positive, got {self.max_images}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num-samples must be positive, got {self.num_samples}")


# ----------------------------------------------------------------------------------------------- image sources
def pil_to_uint8(image: Image.Image, protocol: str = "native") -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 after the protocol's preprocessing, as torch-fidelity's TransformPILtoRGBTensor."""
    array = np.asarray(preprocess(image, protocol))  # (H, W, 3)
    return rearrange(torch.from_numpy(array.copy()), "h w c -> c h w").contiguous()


class FolderImages(Dataset):
    """The image files under a folder, sorted by path, decoded to (3, H, W) uint8."""

    def __init__(self, root: Path, max_images: int | None = None, protocol: str = "native"):
        files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}: the folder is empty "
                                    "or holds other files; point at a folder of images")
        self.files = files[:max_images]
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return pil_to_uint8(image, self.protocol)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err}; remove or replace the file") from None


class HFImages(Dataset):
    """One image column of a `datasets.Dataset`, decoded to (3, H, W) uint8."""

    def __init__(self, dataset, column: str, max_images: int | None = None, protocol: str = "native"):
        if max_images is not None and max_images < len(dataset):
            dataset = dataset.select(range(max_images))
        if len(dataset) == 0:
            raise ValueError("the dataset split has no rows")
        self.dataset = dataset.select_columns([column])
        self.column = column
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return pil_to_uint8(self.dataset[index][self.column], self.protocol)


class DataConfigImages(Dataset):
    """The rows of a training config's split (vqgan.data: embedded, hub, folder, shards, held-out rows), each
    decoded whole as training decodes it (EXIF rotation, RGB) and prepared by the protocol, not cropped."""

    def __init__(self, table, column: str, description: str, protocol: str = "native", max_images: int | None = None):
        if max_images is not None and max_images < len(table):
            table = table.select(range(max_images))
        self.table, self.column, self.description, self.protocol = table, column, description, protocol

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> torch.Tensor:
        from vqgan.data import decode_image

        cell = self.table[index][self.column]
        try:
            image = decode_image(cell)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
            name = cell.get("path") or f"{self.description} row {index}"
            raise ValueError(f"cannot read image {name}: {type(err).__name__}: {err}; a protocol figure needs every "
                             "image of the split: remove or replace the file") from None
        return pil_to_uint8(image, self.protocol)


def load_hf_dataset(name: str, split: str, config: str | None, column: str | None):
    """A hub name, a save_to_disk folder or an imagefolder directory -> (Dataset, image column name)."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name} has splits {list(dataset)}, not --split {split!r}")
            dataset = dataset[split]
    elif path.is_dir():
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    else:
        dataset = datasets.load_dataset(name, config, split=split)
    image_columns = [key for key, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if column is None:
        if not image_columns:
            raise ValueError(f"{name} has no image column; columns: {list(dataset.features)}")
        column = image_columns[0]
    elif column not in dataset.features:
        raise ValueError(f"{name} has no column {column!r}; columns: {list(dataset.features)}")
    return dataset, column


def collate_runs(items: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stack runs of equal-sized images. The extractor resizes every image on its own, so grouping is exact."""
    groups: list[list[torch.Tensor]] = []
    for item in items:
        if groups and groups[-1][0].shape == item.shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [torch.stack(group) for group in groups]  # each (b, 3, H, W)


def shard_batches(dataset: Dataset, rank: int, world: int, batch_size: int, num_workers: int, pin: bool) -> Batches:
    """This process's images, indices rank, rank + world, ... (no padding), decoded in DataLoader workers."""
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_runs, pin_memory=pin
    )
    for groups in loader:
        yield from groups


def crop_to_multiple(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Centre-crop (B, C, H, W) to the largest H, W that are multiples of `factor` (a tokenizer's grid)."""
    h, w = images.shape[-2] // factor * factor, images.shape[-1] // factor * factor
    if h == 0 or w == 0:
        raise ValueError(f"an image of {images.shape[-2]}x{images.shape[-1]} is smaller than the tokenizer's "
                         f"downsampling factor {factor}; use --protocol imagenet-val (or larger images)")
    top, left = (images.shape[-2] - h) // 2, (images.shape[-1] - w) // 2
    return images[..., top : top + h, left : left + w]


def reconstruct(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (B, 3, H, W) -> (the images as the tokenizer saw them, cropped to multiples of f (uint8),
    their ids (B, h, w), the reconstructions (B, 3, H', W') as floats in [0, 1])."""
    images = crop_to_multiple(images, tokenizer.downsample_factor)
    ids = tokenizer.encode(images)  # uint8 accepted: (B, h, w)
    return images, ids, tokenizer.decode(ids).clamp(0.0, 1.0)


def tokenizer_reconstructions(tokenizer, batches: Batches) -> Iterator[torch.Tensor]:
    """uint8 image batches of any sizes -> the tokenizer's reconstructions as uint8.

    Images whose sides are not multiples of f are centre-cropped to them first, as a tokenizer must see
    them; the reference statistics then come from the uncropped images, which differ by < f pixels per side.
    """
    for images in batches:  # each batch holds one image size (collate_runs)
        yield float_to_uint8(reconstruct(tokenizer, images)[2])


def sample_batches(count: int, batch_size: int) -> list[range]:
    """Global sample indices cut into batches of `batch_size`, the same however many processes share them."""
    return [range(begin, min(begin + batch_size, count)) for begin in range(0, count, batch_size)]


def prior_samples(prior_path: str, rank: int, world: int, options: SourceOptions, device: torch.device) -> Batches:
    """This process's share of `options.num_samples` prior samples as uint8, for gFID.

    Batch b of the global batches goes to process b mod world and samples with seed options.seed + b, so the
    set of samples (and the gFID) does not depend on the number of processes. A class-conditional prior gets
    class (i mod num_classes) for global sample i: balanced classes (50 each for 50k ImageNet samples).
    """
    from vqgan.prior.generate import generate_images
    from vqgan.prior.pretrained import from_pretrained as load_prior
    from vqgan.prior.sampling import SamplingConfig
    from vqgan.prior.tokenizer_identity import load_matching_tokenizer

    prior, meta = load_prior(prior_path, device=str(device))
    if not (options.prior_tokenizer or meta.get("tokenizer")):
        raise ValueError(f"{prior_path} does not record its tokenizer: pass --prior-tokenizer")
    tokenizer = load_matching_tokenizer(options.prior_tokenizer, meta, f"prior {prior_path}", device=device,
                                        allow_mismatch=options.allow_tokenizer_mismatch,
                                        override="--allow-tokenizer-mismatch")
    num_classes = prior.config.num_classes
    for b, chunk in enumerate(sample_batches(options.num_samples, options.batch_size)):
        if b % world != rank:
            continue
        config = SamplingConfig(num_samples=len(chunk), batch_size=len(chunk), temperature=options.temperature,
                                top_k=options.top_k, top_p=options.top_p, cfg_scale=options.cfg_scale,
                                seed=options.seed + b, steps=options.steps, mask_schedule=options.mask_schedule,
                                choice_temperature=options.choice_temperature)
        labels = [i % num_classes for i in chunk] if num_classes > 0 else None
        _, images = generate_images(prior, tokenizer, config, labels)
        yield float_to_uint8(images)


@dataclass(frozen=True)
class ImageSource:
    """A set of images that each process can stream a disjoint shard of."""

    description: str
    count: int
    shard: Callable[[int, int], Batches]  # (rank, world) -> uint8 batches of this process's shard
    shard_indices: Callable[[int, int], Sequence[int]]  # (rank, world) -> global indices of that shard, in order


def strided_indices(count: int) -> Callable[[int, int], Sequence[int]]:
    return lambda rank, world: range(rank, count, world)


def dataset_source(description: str, dataset: Dataset, options: SourceOptions, pin: bool) -> ImageSource:
    def shard(rank: int, world: int) -> Batches:
        return shard_batches(dataset, rank, world, options.batch_size, options.num_workers, pin)

    return ImageSource(description, len(dataset), shard, strided_indices(len(dataset)))


def open_source(spec: str, other: str | None, options: SourceOptions, device: torch.device) -> ImageSource | str:
    """An ImageSource, or the path of a statistics file (loaded later, once the extractor identity is known)."""
    pin = device.type == "cuda"
    protocol = f", protocol {options.protocol}"
    if spec.startswith("hf:"):
        dataset, column = load_hf_dataset(spec[3:], options.split, options.config, options.image_column)
        images = HFImages(dataset, column, options.max_images, options.protocol)
        return dataset_source(f"dataset {spec[3:]} [{options.split}] column {column!r}{protocol}", images, options, pin)
    if spec.startswith("recon:"):
        base_spec = options.images or other
        if base_spec is None or base_spec.endswith(".npz"):
            raise ValueError("recon: needs the images to reconstruct: pass --images SRC (the same split as the "
                             "reference statistics) or give the images as the other source")
        if base_spec.startswith(("recon:", "prior:")):
            raise ValueError(f"recon: reconstructs a folder or a dataset, not {base_spec}")
        base = open_source(base_spec, None, options, device)
        from vqgan.tokenizer import VQTokenizer

        tokenizer = VQTokenizer.from_pretrained(spec[6:], device=device)

        def shard(rank: int, world: int) -> Batches:
            return tokenizer_reconstructions(tokenizer, base.shard(rank, world))

        return ImageSource(f"reconstructions by {spec[6:]} of {base.description}", base.count, shard,
                           base.shard_indices)
    if spec.startswith("prior:"):
        if options.num_samples is None:
            raise ValueError("prior: needs --num-samples")
        from vqgan.prior.sampling import SamplingConfig

        SamplingConfig(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                       cfg_scale=options.cfg_scale, steps=options.steps, mask_schedule=options.mask_schedule,
                       choice_temperature=options.choice_temperature)  # bad settings fail now, before any image is read
        count, batch = options.num_samples, options.batch_size

        def shard(rank: int, world: int) -> Batches:
            return prior_samples(spec[6:], rank, world, options, device)

        def shard_indices(rank: int, world: int) -> list[int]:
            return [i for b, c in enumerate(sample_batches(count, batch)) if b % world == rank for i in c]

        return ImageSource(f"{count} samples of {spec[6:]} (seed {options.seed}, batch {batch})", count, shard,
                           shard_indices)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist")
        return str(path)
    if path.is_dir():
        return dataset_source(f"folder {path}{protocol}", FolderImages(path, options.max_images, options.protocol),
                              options, pin)
    raise ValueError(f"source {spec!r} is not a folder, an .npz, or one of hf:, recon:, prior: "
                     "(does the path exist?)")


def data_config_source(config, split: str, options: SourceOptions, device: torch.device) -> ImageSource:
    """The images of split "train" or "eval" of a vqgan.data.DataConfig as an ImageSource, prepared by
    options.protocol; the config's crop settings play no part."""
    import dataclasses

    from vqgan.data import build_dataset

    # NOTE: a resize skips build_dataset's check that training crops fit the images: the protocol sizes them here
    rows = build_dataset(dataclasses.replace(config, resize=config.resize or config.image_size), split)
    images = DataConfigImages(rows.table, rows.image_column, rows.description, options.protocol, options.max_images)
    return dataset_source(f"{rows.description}, protocol {options.protocol}", images, options, device.type == "cuda")


# ----------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class SourceFeatures:
    """What one pass over a source gives: FID statistics, and per-image features when IS or P/R need them."""

    stats: FIDStats
    features: torch.Tensor | None = None  # (N, D) float32 of the FID layer, in global image order
    logits: torch.Tensor | None = None  # (N, 1008) float32 Inception logits (for the Inception Score)


def source_statistics(
    source: ImageSource, extractor: InceptionFeatures, state: PartialState, device: torch.device, autocast: bool,
    keep_features: bool = False, keep_logits: bool = False,
) -> SourceFeatures:
    """Stream this process's shard through the extractor, then all-reduce the float64 sums across processes.

    With keep_features / keep_logits the per-image outputs are also gathered (N x D on every process) and put
    in the global order of the source, so that IS and precision/recall see the images as one process would.
    `extractor` must have been built with extra_layers=(LOGITS_LAYER,) for keep_logits.
    """
    from tqdm import tqdm

    indices = list(source.shard_indices(state.process_index, state.num_processes))
    shard_size = len(indices)
    progress = tqdm(total=shard_size, desc=source.description[:40], unit="img", disable=not state.is_main_process)
    kept: dict[str, list[torch.Tensor]] = {"features": [], "logits": []}

    def extract(images: torch.Tensor) -> torch.Tensor:  # autocast the extractor only, never a tokenizer or prior
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = extractor.forward_layers(images)
        if keep_features:
            kept["features"].append(outputs[0].float().cpu())
        if keep_logits:
            kept["logits"].append(outputs[-1].float().cpu())
        return outputs[0]

    start = time.perf_counter()
    batches = source.shard(state.process_index, state.num_processes)
    sums = accumulate_features(batches, extract, extractor.dim, device, progress.update)
    progress.close()
    if int(sums.count.item()) != shard_size:
        raise RuntimeError(f"process {state.process_index} streamed {int(sums.count.item())} images, expected {shard_size}")
    stats = sums.all_reduce().to_stats(extractor.identity, source.description)
    slowest = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=sums.total.device)
    if is_distributed():
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    if state.is_main_process:
        seconds = max(slowest.item(), 1e-9)
        print(f"{source.description}: {stats.count} images in {seconds:.1f} s, {stats.count / seconds:.2f} images/s "
              f"over {state.num_processes} process(es)")
    gathered = {name: gather_in_order(torch.cat(parts), indices) if parts else None for name, parts in kept.items()}
    return SourceFeatures(stats, gathered["features"], gathered["logits"])


def gather_in_order(local: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Every process's rows (n_r, D), each row's global index given, -> all rows (N, D) in global order."""
    parts = [(list(indices), local)]
    if is_distributed():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (list(indices), local))
    order = torch.tensor([i for idx, _ in parts for i in idx])
    rows = torch.cat([rows for _, rows in parts])
    return rows[torch.argsort(order)]


@contextmanager
def exact_float32() -> Iterator[None]:
    """Full fp32 convolutions and matmuls inside (TF32, PyTorch's default for cuDNN convs, shifts features and
    reconstructions on Ampere and later GPUs); the flags as they were afterwards, so training code keeps its own."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
