"""Sampling speed of the priors: grids/s and tokens/s for a 16x16 grid, GPT with and without KV cache,
PixelCNN, MaskGIT at 8, 12 and 16 parallel steps and the next-scale prior (VAR, 10 steps over VAR's
pyramid 1..16, 680 tokens), all families at a similar parameter count.

    .venv/bin/python benchmarks/sampling.py                 # CPU, writes benchmarks/results/sampling.md
    .venv/bin/python benchmarks/sampling.py --device cuda
    .venv/bin/python benchmarks/sampling.py --quick         # tiny models: checks the script, writes nothing

Random weights: speed does not depend on what the model learned. Each measurement samples whole grids
(all h*w tokens) after one warm-up grid; the cached and uncached paths draw identical tokens.
Goal (issue 14): MaskGIT at 12 steps >= 10x the cached GPT's tokens/s at batch 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from common import describe_machine, timed
from vqgan.prior import MaskGITConfig, MaskGITPrior, PixelCNNConfig, PixelCNNPrior, TransformerConfig, TransformerPrior
from vqgan.prior.maskgit_sampling import sample_maskgit
from vqgan.prior.next_scale_input import VAR_SCALES, ResidualPyramidInput
from vqgan.prior.sampling import sample_pixelcnn, sample_transformer
from vqgan.prior.var import VARConfig, VARPrior
from vqgan.prior.var_sampling import sample_var
from vqgan.utils import atomic_write_text, count_parameters, format_count


NOTE = (
    "A cached step processes one token per sequence, so at batch 1 it reads every weight once per token and "
    "is bound by memory bandwidth, while the uncached step re-encodes the prefix and is bound by compute; "
    "the speed-up therefore grows with the batch. MaskGIT runs the whole grid through a bidirectional "
    "transformer once per step (no cache), so its cost is `steps` full forwards instead of L cached ones."
)
GOAL_STEPS, GOAL_SPEEDUP = 12, 10.0
QUICK = dict(grid=4, num_codes=64, dim=32, depth=2, heads=2, pixelcnn_hidden=16, pixelcnn_layers=2,
             batch_sizes=[1, 2], maskgit_steps=[4, 8, 12])  # 12 steps still fit a 4x4 grid: the goal line runs


def build_models(sizes, device: torch.device) -> tuple[TransformerPrior, PixelCNNPrior, MaskGITPrior]:
    """The three priors of the table, random weights (seed 0), eval mode; `sizes` has this script's size options."""
    torch.manual_seed(0)
    grid = (sizes.grid, sizes.grid)
    tcfg = TransformerConfig(num_codes=sizes.num_codes, grid=grid, num_classes=0, dim=sizes.dim,
                             depth=sizes.depth, heads=sizes.heads, positions="rope2d")
    pcfg = PixelCNNConfig(num_codes=sizes.num_codes, grid=grid, hidden=sizes.pixelcnn_hidden,
                          num_layers=sizes.pixelcnn_layers, kernel_size=5)
    # MaskGIT: the GPT's architecture with attention unmasked, one more position (the class token) and a
    # [MASK] embedding, so the two have the same parameter count up to one embedding row.
    mcfg = MaskGITConfig(num_codes=sizes.num_codes, grid=grid, num_classes=0, dim=sizes.dim, depth=sizes.depth,
                         heads=sizes.heads, positions="rope2d")
    return (TransformerPrior(tcfg).to(device).eval(), PixelCNNPrior(pcfg).to(device).eval(),
            MaskGITPrior(mcfg).to(device).eval())


VAR_INPUT_DIM = 32  # VAR's tokenizer: 32-dim codes


def var_scales(grid: int) -> tuple[int, ...]:
    """VAR's pyramid ending at `grid` (16: VAR's own ten scales)."""
    return tuple(s for s in VAR_SCALES if s < grid) + (grid,)


def build_var(sizes, device: torch.device, target_params: int) -> tuple[VARPrior, ResidualPyramidInput]:
    """The next-scale prior at the GPT's dim and heads, its depth chosen for the nearest parameter count (its
    AdaLN adds 6 dim^2 a block to the GPT's 12), and a random-codebook NextScaleInput with VAR's 3x3 phi."""
    torch.manual_seed(0)

    def config(depth: int) -> VARConfig:
        return VARConfig(num_codes=sizes.num_codes, scales=var_scales(sizes.grid), input_dim=VAR_INPUT_DIM,
                         num_classes=0, dim=sizes.dim, depth=depth, heads=sizes.heads)

    depth = min(range(1, 2 * sizes.depth + 1),
                key=lambda d: abs(count_parameters(VARPrior(config(d))) - target_params))
    model = VARPrior(config(depth)).to(device).eval()
    conv = torch.nn.Conv2d(VAR_INPUT_DIM, VAR_INPUT_DIM, 3, padding=1).to(device)
    phi = lambda h, k: h * 0.5 + conv(h) * 0.5  # noqa: E731 - VAR's Phi with quant_resi 0.5, one shared conv
    codebook = torch.randn(sizes.num_codes, VAR_INPUT_DIM, device=device)
    return model, ResidualPyramidInput(codebook, model.config.scales, phi)


def var_runs(var: VARPrior, inputs: ResidualPyramidInput) -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    """The next-scale prior's row: one cached step per scale."""
    steps = len(var.config.scales)
    return {f"var, {steps} steps": lambda n, g: sample_var(var, inputs, n, generator=g)}


def sampling_runs(transformer: TransformerPrior, pixelcnn: PixelCNNPrior | None, maskgit: MaskGITPrior,
                  maskgit_steps: list[int]) -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    """name -> sample(batch, generator) for each row of the table (pixelcnn None: no pixelcnn row)."""
    runs = {
        "transformer, KV cache": lambda n, g: sample_transformer(transformer, n, generator=g, use_kv_cache=True),
        "transformer, no cache": lambda n, g: sample_transformer(transformer, n, generator=g, use_kv_cache=False),
    }
    if pixelcnn is not None:
        runs["pixelcnn"] = lambda n, g: sample_pixelcnn(pixelcnn, n, generator=g)
    for steps in maskgit_steps:
        runs[f"maskgit, {steps} steps"] = (lambda n, g, steps=steps: sample_maskgit(maskgit, n, generator=g, steps=steps))
    return runs


def time_sampling(run: Callable[[int, torch.Generator], torch.Tensor], batch: int,
                  device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds to sample `batch` whole grids after one warm-up grid (allocator, kernels, caches); -> (s, grids)."""
    run(1, torch.Generator().manual_seed(1))
    out = {}
    seconds = timed(lambda: out.__setitem__("grids", run(batch, torch.Generator().manual_seed(0))), device)
    return seconds, out["grids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--num-codes", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--pixelcnn-hidden", type=int, default=128, help="128 x 8 layers: 5.7M, like the GPT's 5.3M")
    parser.add_argument("--pixelcnn-layers", type=int, default=8)
    parser.add_argument("--maskgit-steps", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny models and grids: check the script in seconds")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown report (default benchmarks/results/sampling.md; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.output is None and not args.quick:
        args.output = Path(__file__).parent / "results" / "sampling.md"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens_per_grid = args.grid * args.grid
    transformer, pixelcnn, maskgit = build_models(args, device)
    tcfg, pcfg = transformer.config, pixelcnn.config
    described = describe_machine(device)
    print(f"machine: {described}")
    print(f"transformer: {tcfg}\n  {format_count(count_parameters(transformer))} parameters")
    print(f"pixelcnn: {pcfg}\n  {format_count(count_parameters(pixelcnn))} parameters")
    print(f"maskgit: {maskgit.config}\n  {format_count(count_parameters(maskgit))} parameters")
    var, var_inputs = build_var(args, device, count_parameters(transformer))
    print(f"var: {var.config}\n  {format_count(count_parameters(var))} parameters")

    runs = {**sampling_runs(transformer, pixelcnn, maskgit, args.maskgit_steps), **var_runs(var, var_inputs)}
    drawn_per_grid = {name: var.config.seq_len if name.startswith("var") else tokens_per_grid for name in runs}
    rows, seconds, samples = [], {}, {}
    for batch in args.batch_sizes:
        for name, run in runs.items():
            secs, samples[name, batch] = time_sampling(run, batch, device)
            seconds[name, batch] = secs
            rate = batch * drawn_per_grid[name] / secs
            rows.append((name, batch, secs, rate))
            print(f"  {name:24s} batch {batch:3d}: {secs:8.3f} s  {batch / secs:8.2f} grids/s  {rate:10.1f} tokens/s",
                  flush=True)
        if not torch.equal(samples["transformer, KV cache", batch], samples["transformer, no cache", batch]):
            raise SystemExit(f"cached and uncached sampling disagree at batch {batch}")

    table = [
        "| model | batch | seconds per batch | grids/s | tokens/s | KV cache speed-up | vs cached GPT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, batch, secs, rate in rows:
        speedup = (f"{seconds['transformer, no cache', batch] / secs:.1f}x"
                   if name == "transformer, KV cache" else "")
        versus = f"{seconds['transformer, KV cache', batch] / secs:.1f}x"
        table.append(f"| {name} | {batch} | {secs:.3f} | {batch / secs:.2f} | {rate:.1f} | {speedup} | {versus} |")
    goal = ""
    goal_key = (f"maskgit, {GOAL_STEPS} steps", 1)
    if goal_key in seconds and ("transformer, KV cache", 1) in seconds:
        ratio = seconds["transformer, KV cache", 1] / seconds[goal_key]
        goal = (f"Goal: MaskGIT at {GOAL_STEPS} steps >= {GOAL_SPEEDUP:.0f}x the cached GPT's tokens/s at batch 1: "
                f"{ratio:.1f}x, {'met' if ratio >= GOAL_SPEEDUP else 'NOT met'}.")
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
        f"- maskgit: the transformer's dim, depth, heads and rope2d, bidirectional, "
        f"{format_count(count_parameters(maskgit))} parameters; cosine schedule, choice temperature 4.5, "
        "one full forward per step.",
        f"- var: next-scale prior, dim {var.config.dim}, depth {var.config.depth} (its AdaLN makes a block 1.5x "
        f"the GPT's: depth chosen for the nearest parameter count), heads {var.config.heads}, "
        f"{format_count(count_parameters(var))} parameters; scales {list(var.config.scales)}: "
        f"{len(var.config.scales)} cached steps, each over one scale's tokens, drawing {var.config.seq_len} tokens "
        f"for the {args.grid}x{args.grid} grid (its tokens/s counts all of them: compare grids/s). Inputs from a "
        "random codebook (32-dim) and one 3x3 phi conv, as VAR's tokenizer; decoding not included.",
        "",
        *table,
        "",
        goal,
        "",
        NOTE,
        "",
    ])
    print()
    print("\n".join(table))
    print(goal)
    if args.output is not None:
        atomic_write_text(args.output, report)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
