"""Images/s of tokenization (vqgan.prior.tokenize: read, decode, encode, write token shards), CPU or GPU.

A tokenizer of the given preset with random weights (the speed does not depend on the weights)
tokenizes the same generated JPEGs benchmarks/data.py uses, from the folder (map-style) and from its
WebDataset shards, and writes memory-mapped token shards. The encoder runs in fp32 (the default,
the API's ids) or, with --precision bf16, in bf16 autocast. Prints a markdown table and writes it to
benchmarks/results/tokenize.md (tokenize_gpu.md on a GPU).

    .venv/bin/python benchmarks/tokenization.py                          # CPU, preset tiny, 128px, 1000 images
    .venv/bin/python benchmarks/tokenization.py --device cuda --preset imagenet256_f16 --image-size 256 --images 3000
    .venv/bin/python benchmarks/tokenization.py --quick                  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe_machine  # noqa: E402
from data import CACHE, make_jpegs  # noqa: E402
from vqgan.autoencoder import VQModel, preset  # noqa: E402
from vqgan.data import DataConfig  # noqa: E402
from vqgan.data.make_shards import make_shards  # noqa: E402
from vqgan.tokenizer import VQTokenizer  # noqa: E402
from vqgan.prior.tokenize import tokenize_dataset  # noqa: E402
from vqgan.utils import atomic_write_text  # noqa: E402


def jpeg_sources(images: int, width: int, height: int, workers: int) -> tuple[Path, str]:
    """The generated JPEG folder (benchmarks/data.py's, cached) and its WebDataset shards; -> (folder, wds: source)."""
    folder = make_jpegs(CACHE / f"jpegs-{images}-{width}x{height}", images, width, height)
    shards_dir = CACHE / f"shards-{images}-{width}x{height}"
    if not (shards_dir / "index.json").is_file():
        shutil.rmtree(shards_dir, ignore_errors=True)
        make_shards(str(folder), shards_dir, shard_size=max(1, images // 16), label_column="label",
                    workers=max(1, workers), cache_dir=str(CACHE / "hf"), progress=False)
    return folder, "wds:" + json.loads((shards_dir / "index.json").read_text())["pattern"]


def measure_tokenization(preset_name: str, cases: dict[str, DataConfig], batch_size: int,
                         device: torch.device, precision: str = "fp32") -> list[tuple[str, int, float]]:
    """tokenize_dataset of each case with a random-weight tokenizer of `preset_name`, the encoder in `precision`
    (as vqgan-tokenize --precision); -> (case, images, seconds)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    work = Path(tempfile.mkdtemp(prefix="vqgan-tokenize-bench-"))
    torch.manual_seed(0)
    VQTokenizer.from_model(VQModel(preset(preset_name)).eval()).save_pretrained(work / "tokenizer")
    rows = []
    try:
        for name, data in cases.items():
            start = time.perf_counter()
            meta = tokenize_dataset(accelerator, work / "tokenizer", data, work / "tokens", batch_size=batch_size,
                                    precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append((name, meta["num_rows"], seconds))
            print(f"{name}: {meta['num_rows']} images in {seconds:.1f} s = {meta['num_rows'] / seconds:.1f} images/s",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the encoder's, as vqgan-tokenize --precision")
    parser.add_argument("--quick", action="store_true", help="48 small JPEGs at 32px, 1 worker")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.width, args.height, args.image_size, args.workers, args.batch_size = 48, 320, 240, 32, 1, 16
    device = torch.device(args.device)
    output = args.output or Path(__file__).parent / "results" / (
        ("tokenize_quick" if args.quick else "tokenize") + ("_gpu" if device.type == "cuda" else "") + ".md")
    folder, pattern = jpeg_sources(args.images, args.width, args.height, args.workers)
    common = dict(image_size=args.image_size, resize=args.image_size, random_crop=False, hflip=False,
                  num_workers=args.workers)
    cases = {"folder (map-style)": DataConfig(source=str(folder), cache_dir=str(CACHE / "hf"), **common),
             "shards (wds:)": DataConfig(source=pattern, **common)}
    rows = measure_tokenization(args.preset, cases, args.batch_size, device, args.precision)
    lines = ["# Tokenization throughput\n", f"Machine: {describe_machine(device)}\n",
             f"Tokenizer preset {args.preset} (random weights), {args.image_size}px centre crops of {args.images} "
             f"{args.width}x{args.height} JPEGs, batch {args.batch_size}, {args.workers} workers, "
             f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'} encoder; "
             "includes start-up and writing the shards. "
             f"Command: `python benchmarks/tokenization.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
             "| source | images | seconds | images/s |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {s:.1f} | {n / s:.1f} |" for name, n, s in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
