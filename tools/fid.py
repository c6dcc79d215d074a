#!/usr/bin/env python
"""FID between two image sources, with the TF-FID InceptionV3 features torch-fidelity and torchmetrics use.

    python tools/fid.py SRC1 SRC2 [--save-stats ref.npz]      # FID, and optionally keep SRC1's statistics
    python tools/fid.py SRC --save-stats ref.npz               # statistics only
    accelerate launch --multi_gpu --num_processes 8 tools/fid.py SRC1 SRC2   # same numbers, 8 shards

A source is
    DIR                      a folder of images (png/jpg/jpeg/bmp/webp, searched recursively, sorted; mixed
                             sizes are fine: the network resizes each image to 299x299 on its own)
    FILE.npz                 statistics written by --save-stats (refused when from another feature extractor)
    hf:NAME_OR_PATH          a `datasets` dataset: hub name, a save_to_disk folder, or an imagefolder directory
                             (--split, --config, --image-column)
    recon:TOKENIZER_DIR      the tokenizer's reconstructions of --images SRC (default: the other source): rFID
    prior:PRIOR_DIR          --num-samples samples of a prior: gFID (or sample to a folder and pass the folder)

Each process streams the disjoint shard i::world of the images into float64 sums (sum x, sum x x^T, count),
and one all-reduce of those sums yields exactly the single-process statistics: no padding, no duplicates,
and O(D^2) traffic however many images (gather_for_metrics would move N x D features and needs a DataLoader
prepared by Accelerate, which a tokenizer's or prior's batches are not).
The last line printed is JSON: {"fid": ..., "count1": ..., "count2": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from vqgan.metrics.fid import FIDStats, accumulate_features, fid_from_stats, load_stats, save_stats
from vqgan.metrics.inception import FEATURE_LAYERS, InceptionFeatures, extractor_identity, resolve_weights_path
from vqgan.utils import is_distributed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
Batches = Iterable[torch.Tensor]  # uint8 (B, 3, H, W)


# ----------------------------------------------------------------------------------------------- image sources
def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8, as torch-fidelity's TransformPILtoRGBTensor."""
    array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return rearrange(torch.from_numpy(array.copy()), "h w c -> c h w").contiguous()


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, 3, H, W) -> uint8 rounded as torchvision's save_image, so in-memory FID = FID of PNGs."""
    return (images.clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8)


class FolderImages(Dataset):
    """The image files under a folder, sorted by path, decoded to (3, H, W) uint8."""

    def __init__(self, root: Path, max_images: int | None = None):
        files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.files = files[:max_images]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return pil_to_uint8(image)


class HFImages(Dataset):
    """One image column of a `datasets.Dataset`, decoded to (3, H, W) uint8."""

    def __init__(self, dataset, column: str, max_images: int | None = None):
        if max_images is not None and max_images < len(dataset):
            dataset = dataset.select(range(max_images))
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return pil_to_uint8(self.dataset[index][self.column])


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


# LEAD: wire these two to the tokenizer / prior APIs when they land.
def tokenizer_reconstructions(tokenizer_path: str, batches: Batches, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 image batches -> the tokenizer's reconstructions as uint8 (planned vqgan.export.VQTokenizer API)."""
    try:
        from vqgan.export import VQTokenizer
    except ImportError as err:
        raise NotImplementedError(f"recon: needs vqgan.export.VQTokenizer, which is not available yet ({err})") from err
    tokenizer = VQTokenizer.from_pretrained(tokenizer_path)
    if hasattr(tokenizer, "to"):
        tokenizer = tokenizer.to(device)
    for images in batches:
        images01 = images.to(device).float() / 255.0  # (B, 3, H, W) in [0, 1]
        yield float_to_uint8(tokenizer.decode(tokenizer.encode(images01)))


def prior_samples(prior_path: str, rank: int, world: int, args: argparse.Namespace, device: torch.device) -> Batches:
    """This process's share (samples rank, rank + world, ...) of --num-samples prior samples as uint8, for gFID.

    A class-conditional prior gets class (i mod num_classes) for global sample i, so the classes are balanced
    (50 per class for 50k ImageNet samples); each process seeds its own generator with seed + rank.
    """
    from vqgan.export import VQTokenizer
    from vqgan.prior.generate import generate_images
    from vqgan.prior.io import load_prior
    from vqgan.prior.sampling import SamplingConfig

    prior, meta = load_prior(prior_path, device=str(device))
    tokenizer_path = args.prior_tokenizer or meta.get("tokenizer")
    if not tokenizer_path:
        raise ValueError(f"{prior_path} does not record its tokenizer: pass --prior-tokenizer")
    tokenizer = VQTokenizer.from_pretrained(tokenizer_path, device=device)
    indices = list(range(rank, args.num_samples, world))
    num_classes = prior.config.num_classes
    for begin in range(0, len(indices), args.batch_size):
        chunk = indices[begin : begin + args.batch_size]
        config = SamplingConfig(num_samples=len(chunk), batch_size=len(chunk), temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                                seed=args.seed + rank * 1_000_003 + begin)
        labels = [i % num_classes for i in chunk] if num_classes > 0 else None
        _, images = generate_images(prior, tokenizer, config, labels)
        yield float_to_uint8(images)


@dataclass(frozen=True)
class ImageSource:
    """A set of images that each process can stream a disjoint shard of."""

    description: str
    count: int
    shard: Callable[[int, int], Batches]  # (rank, world) -> uint8 batches of this process's shard


def dataset_source(description: str, dataset: Dataset, args: argparse.Namespace, pin: bool) -> ImageSource:
    def shard(rank: int, world: int) -> Batches:
        return shard_batches(dataset, rank, world, args.batch_size, args.num_workers, pin)

    return ImageSource(description, len(dataset), shard)


def open_source(spec: str, other: str | None, args: argparse.Namespace, device: torch.device) -> ImageSource | str:
    """An ImageSource, or the path of a statistics file (loaded later, once the extractor identity is known)."""
    pin = device.type == "cuda"
    if spec.startswith("hf:"):
        dataset, column = load_hf_dataset(spec[3:], args.split, args.config, args.image_column)
        images = HFImages(dataset, column, args.max_images)
        return dataset_source(f"dataset {spec[3:]} [{args.split}] column {column!r}", images, args, pin)
    if spec.startswith("recon:"):
        base_spec = args.images or other
        if base_spec is None:
            raise ValueError("recon: needs the images to reconstruct: pass --images SRC or a second image source")
        base = open_source(base_spec, None, args, device)
        if not isinstance(base, ImageSource) or base_spec.startswith(("recon:", "prior:")):
            raise ValueError(f"recon: reconstructs a folder or a dataset, not {base_spec}")

        def shard(rank: int, world: int) -> Batches:
            return tokenizer_reconstructions(spec[6:], base.shard(rank, world), device)

        return ImageSource(f"reconstructions by {spec[6:]} of {base.description}", base.count, shard)
    if spec.startswith("prior:"):
        if args.num_samples is None:
            raise ValueError("prior: needs --num-samples")

        def shard(rank: int, world: int) -> Batches:
            return prior_samples(spec[6:], rank, world, args, device)

        return ImageSource(f"{args.num_samples} samples of {spec[6:]}", args.num_samples, shard)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist")
        return str(path)
    if path.is_dir():
        return dataset_source(f"folder {path}", FolderImages(path, args.max_images), args, pin)
    raise ValueError(f"source {spec!r} is not a folder, an .npz, or one of hf:, recon:, prior:")


# ----------------------------------------------------------------------------------------------- statistics
def source_statistics(
    source: ImageSource, extractor: InceptionFeatures, state: PartialState, device: torch.device, autocast: bool
) -> FIDStats:
    """Stream this process's shard through the extractor, then all-reduce the float64 sums across processes."""
    from tqdm import tqdm

    shard_size = len(range(state.process_index, source.count, state.num_processes))
    progress = tqdm(total=shard_size, desc=source.description[:40], unit="img", disable=not state.is_main_process)

    def extract(images: torch.Tensor) -> torch.Tensor:  # autocast the extractor only, never a tokenizer or prior
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return extractor(images)

    start = time.perf_counter()
    batches = source.shard(state.process_index, state.num_processes)
    sums = accumulate_features(batches, extract, extractor.dim, device, progress.update)
    progress.close()
    if int(sums.count.item()) != shard_size:
        raise RuntimeError(f"process {state.process_index} streamed {int(sums.count.item())} images, expected {shard_size}")
    stats = sums.all_reduce().to_stats(extractor.identity)
    slowest = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=sums.total.device)
    if is_distributed():
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    if state.is_main_process:
        seconds = max(slowest.item(), 1e-9)
        print(f"{source.description}: {stats.count} images in {seconds:.1f} s, {stats.count / seconds:.2f} images/s "
              f"over {state.num_processes} process(es)")
    return stats


def set_exact_float32() -> None:
    """Full fp32 convolutions and matmuls on GPUs: TF32 (PyTorch's default for cuDNN convs) shifts features."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SRC", help="one or two sources (see above)")
    parser.add_argument("--save-stats", type=Path, help="write the statistics of the first source to this .npz")
    parser.add_argument("--inception-weights", type=Path, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--no-download", action="store_true", help="never fetch the weights; fail instead")
    parser.add_argument("--feature-layer", default="2048", choices=FEATURE_LAYERS, help="2048 = pool3, FID's layer")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass per process")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers per process")
    parser.add_argument("--max-images", type=int, help="use only the first N images of a folder or dataset")
    parser.add_argument("--split", default="train", help="hf: dataset split")
    parser.add_argument("--config", help="hf: dataset configuration name")
    parser.add_argument("--image-column", help="hf: image column (default: the first Image feature)")
    parser.add_argument("--images", help="recon: the images to reconstruct (default: the other source)")
    parser.add_argument("--num-samples", type=int, help="prior: number of samples")
    parser.add_argument("--seed", type=int, default=0, help="prior: sampling seed (each process and batch its own)")
    parser.add_argument("--prior-tokenizer", help="prior: tokenizer that decodes the samples (default: the prior's own)")
    parser.add_argument("--temperature", type=float, default=1.0, help="prior: sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="prior: keep the k most likely codes")
    parser.add_argument("--top-p", type=float, default=None, help="prior: nucleus sampling mass")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="prior: classifier-free guidance scale")
    parser.add_argument("--device", help="default: this process's accelerator device, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU: faster, not bit-comparable")
    args = parser.parse_args(argv)
    if len(args.sources) > 2:
        parser.error(f"expected one or two sources, got {len(args.sources)}")
    if len(args.sources) == 1 and args.save_stats is None:
        parser.error("with one source, pass --save-stats PATH (or give a second source to compute FID)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # NOTE: PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU; without cpu=True a CPU launch comes up
    # as one process per rank that each think they are alone.
    cpu = args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if is_distributed() and torch.distributed.get_world_size() != state.num_processes:
        raise RuntimeError(f"{torch.distributed.get_world_size()} ranks but accelerate sees {state.num_processes}")
    device = torch.device(args.device) if args.device else state.device
    if args.num_workers is None:
        args.num_workers = min(4, max(0, (os.cpu_count() or 1) // state.num_processes - 1))
    if device.type == "cuda":
        set_exact_float32()
    with state.main_process_first():  # only the first process may download the weights
        weights = resolve_weights_path(args.inception_weights, download=not args.no_download)
    identity = extractor_identity(weights, args.feature_layer)
    sources = [
        open_source(spec, args.sources[1 - i] if len(args.sources) == 2 else None, args, device)
        for i, spec in enumerate(args.sources)
    ]
    stats: list[FIDStats | None] = [load_stats(s, identity) if isinstance(s, str) else None for s in sources]
    if state.is_main_process:
        print(f"features: {identity.describe()}; {state.num_processes} process(es) on {device}")
    extractor = None
    for i, source in enumerate(sources):
        if isinstance(source, ImageSource):
            if extractor is None:
                with warnings.catch_warnings():
                    if not state.is_main_process:  # one copy of load-time warnings is enough
                        warnings.simplefilter("ignore")
                    extractor = InceptionFeatures(weights, args.feature_layer).to(device).eval()
            stats[i] = source_statistics(source, extractor, state, device, args.bf16 and device.type == "cuda")
    result: dict = {"count1": stats[0].count}
    if state.is_main_process:  # the O(D^3) square root once, not on every process
        if any(s.count <= s.mu.shape[0] for s in stats):
            print(f"NOTE: fewer images than feature dimensions ({stats[0].mu.shape[0]}): singular covariances, and FID "
                  "is biased upward at small counts; published FIDs typically use 50k images")
        if len(stats) == 2:
            result = {"fid": fid_from_stats(stats[0], stats[1]), "count1": stats[0].count, "count2": stats[1].count}
            print(f"FID: {result['fid']:.6f}  ({args.sources[0]}: {result['count1']} images, "
                  f"{args.sources[1]}: {result['count2']} images)")
        if args.save_stats is not None:
            save_stats(args.save_stats, stats[0])
            print(f"statistics of {args.sources[0]} ({stats[0].count} images) -> {args.save_stats}")
            result["stats"] = str(args.save_stats)
        print(json.dumps(result), flush=True)
    state.wait_for_everyone()
    return result


if __name__ == "__main__":
    main()
