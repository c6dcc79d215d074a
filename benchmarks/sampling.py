"""Sampling speed of the priors: tokens/s for a 16x16 grid, transformer with and without KV cache, PixelCNN.

    .venv/bin/python benchmarks/sampling.py                 # CPU, writes benchmarks/results/sampling.md
    .venv/bin/python benchmarks/sampling.py --device cuda

Random weights: speed does not depend on what the model learned. Each measurement samples whole grids
(all h*w tokens) after one warm-up grid; the cached and uncached paths draw identical tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import describe_machine, timed
from vqgan.prior import PixelCNNConfig, PixelCNNPrior, TransformerConfig, TransformerPrior
from vqgan.prior.sampling import sample_pixelcnn, sample_transformer
from vqgan.utils import atomic_write_text, count_parameters, format_count


NOTE = (
    "A cached step processes one token per sequence, so at batch 1 it reads every weight once per token and "
    "is bound by memory bandwidth, while the uncached step re-encodes the prefix and is bound by compute; "
    "the speed-up therefore grows with the batch."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--num-codes", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--pixelcnn-hidden", type=int, default=64)
    parser.add_argument("--pixelcnn-layers", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "sampling.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    grid = (args.grid, args.grid)
    tokens_per_grid = args.grid * args.grid

    tcfg = TransformerConfig(num_codes=args.num_codes, grid=grid, num_classes=0, dim=args.dim,
                             depth=args.depth, heads=args.heads, positions="rope2d")
    pcfg = PixelCNNConfig(num_codes=args.num_codes, grid=grid, hidden=args.pixelcnn_hidden,
                          num_layers=args.pixelcnn_layers, kernel_size=5)
    transformer = TransformerPrior(tcfg).to(device).eval()
    pixelcnn = PixelCNNPrior(pcfg).to(device).eval()
    described = describe_machine(device)
    print(f"machine: {described}")
    print(f"transformer: {tcfg}\n  {format_count(count_parameters(transformer))} parameters")
    print(f"pixelcnn: {pcfg}\n  {format_count(count_parameters(pixelcnn))} parameters")

    runs = {
        "transformer, KV cache": lambda n, g: sample_transformer(transformer, n, generator=g, use_kv_cache=True),
        "transformer, no cache": lambda n, g: sample_transformer(transformer, n, generator=g, use_kv_cache=False),
        "pixelcnn": lambda n, g: sample_pixelcnn(pixelcnn, n, generator=g),
    }
    rows, seconds, samples = [], {}, {}
    for batch in args.batch_sizes:
        for name, run in runs.items():
            run(1, torch.Generator().manual_seed(1))  # warm-up: allocator, kernels, caches
            secs = timed(lambda: samples.__setitem__((name, batch), run(batch, torch.Generator().manual_seed(0))),
                         device)
            seconds[name, batch] = secs
            rate = batch * tokens_per_grid / secs
            rows.append((name, batch, secs, rate))
            print(f"  {name:24s} batch {batch:3d}: {secs:8.2f} s  {rate:10.1f} tokens/s", flush=True)
        if not torch.equal(samples["transformer, KV cache", batch], samples["transformer, no cache", batch]):
            raise SystemExit(f"cached and uncached sampling disagree at batch {batch}")

    table = [
        "| model | batch | seconds per batch | tokens/s | KV cache speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, batch, secs, rate in rows:
        speedup = (f"{seconds['transformer, no cache', batch] / secs:.1f}x"
                   if name == "transformer, KV cache" else "")
        table.append(f"| {name} | {batch} | {secs:.2f} | {rate:.1f} | {speedup} |")
    report = "\n".join([
        "# Prior sampling speed",
        "",
        f"Command: `.venv/bin/python benchmarks/sampling.py --device {args.device}"
        + (f" --threads {args.threads}" if args.threads else "") + "`",
        "",
        f"Machine: {described}",
        "",
        f"Sampling whole {args.grid}x{args.grid} grids ({tokens_per_grid} tokens each), K = {args.num_codes}, "
        "temperature 1, random weights, one warm-up grid first.",
        f"- transformer: dim {tcfg.dim}, depth {tcfg.depth}, heads {tcfg.heads}, mlp_ratio {tcfg.mlp_ratio}, "
        f"rope2d, {format_count(count_parameters(transformer))} parameters. `no cache` recomputes the "
        "whole prefix for every token (the reference path); both paths gave identical tokens.",
        f"- pixelcnn: hidden {pcfg.hidden}, {pcfg.num_layers} gated layers, kernel {pcfg.kernel_size}, "
        f"{format_count(count_parameters(pixelcnn))} parameters; reruns the net on rows 0..r for each token.",
        "",
        *table,
        "",
        NOTE,
        "",
    ])
    print()
    print("\n".join(table))
    atomic_write_text(args.output, report)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
