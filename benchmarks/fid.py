#!/usr/bin/env python
"""Feature-extraction speed of our FID pipeline vs torch-fidelity's on the same images, and 1 vs 2 processes.

    python benchmarks/fid.py [--num-images 64] [--rounds 3] [--size 64] [--device cpu|cuda] [--skip-multiprocess]

Writes a markdown table to stdout and to benchmarks/results/fid.md. Uses a random-valued InceptionV3 file in the
real file's format (speed does not depend on the values), and reports the 2048-d FID of both pipelines on the
two halves of the images as a correctness check. The two single-process pipelines run alternately for several
rounds and each reports its best and median round, so that load from other jobs on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import source_commit  # noqa: E402 - the script's folder is on sys.path
from vqgan.metrics.fid import accumulate_features, frechet_distance
from vqgan.metrics.inception import InceptionFeatures, write_random_inception_weights
from vqgan.metrics import sources as fid_tool  # the vqgan-fid pipeline
from vqgan.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        image = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((size // 8, size // 8, 1)))
        image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def ours(folders: list[Path], weights: Path, device: str, batch_size: int, workers: int) -> tuple[float, list]:
    """Our pipeline: sorted folder, DataLoader workers decoding uint8, float64 streaming sums."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = InceptionFeatures(weights).to(device).eval()
    with torch.inference_mode():
        extractor(torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=device))  # warm-up, as for theirs
    start, stats = time.perf_counter(), []
    for folder in folders:
        dataset = fid_tool.FolderImages(folder)
        batches = fid_tool.shard_batches(dataset, 0, 1, batch_size, workers, device == "cuda")
        sums = accumulate_features(batches, extractor, extractor.dim, device)
        stats.append((sums.mean(), sums.covariance()))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, stats


def theirs(folders: list[Path], weights: Path, device: str, batch_size: int) -> tuple[float, list]:
    """torch-fidelity's own extraction (ImagesPathDataset + its DataLoader) and its statistics."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    cuda = device == "cuda"
    kwargs = dict(feature_extractor_weights_path=str(weights), verbose=False, cache=False, cuda=cuda)
    extractor = create_feature_extractor("inception-v3-compat", ["2048"], **kwargs)
    with torch.no_grad():
        extractor(torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=device))
    start, stats = time.perf_counter(), []
    for folder in folders:
        features = extract_featuresdict_from_input_id(1, extractor, input1=str(folder), batch_size=batch_size, **kwargs)
        s = fid_features_to_statistics(features["2048"])
        stats.append((s["mu"], s["sigma"]))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, stats


def tool_rate(folder: Path, weights: Path, processes: int, batch_size: int, device: str, out: Path) -> float:
    """images/s of vqgan-fid over `processes` accelerate processes: all images / the slowest process's time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                "--num_processes", str(processes)]
    if processes > 1:
        launcher.append("--multi_gpu")
    env = dict(os.environ)
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    command = [*launcher, "-m", "vqgan.cli.fid", str(folder), "--save-stats", str(out),
               "--inception-weights", str(weights), "--batch-size", str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(re.search(r"([\d.]+) images/s over", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / torch-fidelity")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (resized to 299 inside)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="our DataLoader workers")
    parser.add_argument("--skip-multiprocess", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fid.md")
    args = parser.parse_args()
    exact = fid_tool.exact_float32() if args.device == "cuda" else contextlib.nullcontext()

    load_before = os.getloadavg()[0]
    with exact, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_random_inception_weights(tmp / "inception-random.pth")
        half = args.num_images // 2
        folders = [tmp / "a", tmp / "b"]
        write_images(folders[0], half, args.size, seed=0)
        write_images(folders[1], args.num_images - half, args.size, seed=1)

        rates: dict[str, list[float]] = {"ours (vqgan-fid pipeline), 1 process": [],
                                         "torch-fidelity 0.4.0 extraction, 1 process": []}
        for _ in range(args.rounds):
            seconds, stats_ours = ours(folders, weights, args.device, args.batch_size, args.workers)
            rates["ours (vqgan-fid pipeline), 1 process"].append(args.num_images / seconds)
            seconds, stats_theirs = theirs(folders, weights, args.device, args.batch_size)
            rates["torch-fidelity 0.4.0 extraction, 1 process"].append(args.num_images / seconds)
        if not args.skip_multiprocess:
            write_images(tmp / "all", args.num_images, args.size, seed=2)
            for _ in range(args.rounds):
                for processes in (1, 2):
                    rate = tool_rate(tmp / "all", weights, processes, args.batch_size, args.device, tmp / "s.npz")
                    rates.setdefault(f"vqgan-fid, accelerate launch, {processes} process(es), all of them", [])
                    rates[f"vqgan-fid, accelerate launch, {processes} process(es), all of them"].append(rate)
        fid_ours = frechet_distance(*stats_ours[0], *stats_ours[1])
        fid_theirs = frechet_distance(*stats_theirs[0], *stats_theirs[1])

    lines = [
        "# FID feature extraction speed",
        "",
        f"Machine: {machine_description(args.device)}; device {args.device}; {source_commit()}.",
        f"{args.num_images} PNG images of {args.size}x{args.size} (resized to 299x299 inside the network), "
        f"batch {args.batch_size}, InceptionV3 pool3 (2048-d), fp32, random-valued weights file.",
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after: other jobs shared the "
        "CPU, so compare rows of one run only, and prefer the best round.",
        "",
        "| pipeline | images/s, best | images/s, median | rounds |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {max(r):.2f} | {np.median(r):.2f} | {len(r)} |" for name, r in rates.items()],
        "",
        f"2048-d FID between the two halves: ours {fid_ours:.6f}, torch-fidelity statistics {fid_theirs:.6f} "
        f"(relative difference {abs(fid_ours - fid_theirs) / abs(fid_theirs):.2e}).",
        "",
        "Notes:",
        "- Both single-process rows run torch-fidelity's own network in fp32, so parity is what to expect; around it",
        "  ours decodes in DataLoader workers and streams float64 sums, holding O(D^2) = 32 MB of statistics where",
        "  torch-fidelity keeps the N x D feature matrix (400 MB for 50k images).",
        "- The multi-process rows count all images over the slowest process's time, start-up excluded. On CPU each",
        "  process gets cores / processes threads; on a CPU shared with other jobs a 2-thread parallel region waits",
        "  for its slower thread, so single-thread processes can scale better than linearly. On GPUs each process",
        "  owns a device and shares one all-reduce of the (D, D) float64 sums per source.",
        "",
        "Command: `.venv/bin/python benchmarks/fid.py " + " ".join(sys.argv[1:]) + "`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
