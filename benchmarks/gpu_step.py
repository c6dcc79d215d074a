"""Benchmark the ImageNet tokenizer's real training step on one CUDA GPU: eager / compile x NCHW / channels_last.

The model is the `imagenet256_f16_l2` preset (72M params, K=16384 l2-normalised 8-dim codes) with
the PatchGAN of recipes/imagenet256_f16_l2.yaml (ndf 64, 3 layers, BatchNorm), that recipe's loss
and optimizers (read through vqgan.train.load_train_config) except `loss.disc_start=0`, so that the
full generator + discriminator step runs from the first step. 256px random images, batch
`--batch-size`, bf16 autocast. LPIPS is on only when its VGG16 weights are found without a
download (the output says which); the recipe's `train.require_lpips` is not enforced here.

The step timed is `train_step.RealStep`: vqgan/train.py's own step (vqgan.training.tokenizer_step.TokenizerStep)
on a window of one micro-batch (WindowSnapshot, seed_window, generator_step, discriminator_step, the non-finite
and overflow flags and their one read, apply_updates with clipping, schedulers, EMA with
ema_decay_at). Variants: eager or compiled in place (nn.Module.compile, as vqgan.training.run.compile_in_place), each in
NCHW and in channels_last. Per variant, after `--warmup` steps (which include compilation):
images/s over `--steps` steps with torch.cuda.synchronize around them; peak memory
(torch.cuda.max_memory_allocated after reset_peak_memory_stats, weights and optimizer state
included); and, outside the timed region, the host syncs of one more step counted with
torch.cuda.set_sync_debug_mode("warn").

    .venv/bin/python benchmarks/gpu_step.py [--batch-size 16] [--variants eager compile_cl]
    .venv/bin/python benchmarks/gpu_step.py --dry-run-cpu   # same code path on CPU, tiny preset; no results file

Without CUDA (and without --dry-run-cpu) it exits with status 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, common (also when imported)

from common import describe_machine  # noqa: E402
from train_step import RealStep  # noqa: E402
from vqgan.autoencoder import VQModel, preset  # noqa: E402
from vqgan.discriminator import PatchDiscriminator  # noqa: E402
from vqgan.perceptual import LPIPS, lpips_available  # noqa: E402
from vqgan.train import TrainConfig, load_train_config  # noqa: E402
from vqgan.utils import atomic_write_text, count_parameters, format_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "imagenet256_f16_l2.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_step.md"
VARIANTS = {  # name -> (compile, channels_last)
    "eager": (False, False),
    "eager_cl": (False, True),
    "compile": (True, False),
    "compile_cl": (True, True),
}


@dataclass(frozen=True)
class Result:
    variant: str
    compiled: bool
    channels_last: bool
    warmup_s: float  # the warm-up steps, compilation included
    images_per_s: float
    ms_per_step: float
    peak_bytes: int | None  # None on CPU
    syncs: int | None  # None when not counted (CPU)
    sync_sites: tuple[str, ...]  # "file:line xN" of the counted syncs


def load_config(dry_run: bool) -> TrainConfig:
    """The recipe with disc_start 0; the dry run swaps in the tiny preset at 32px."""
    config = load_train_config(str(RECIPE), ["loss.disc_start=0"])
    if dry_run:
        data = dataclasses.replace(config.data, image_size=32)
        config = dataclasses.replace(config, model=preset("tiny"), data=data)
    return config


def build_perceptual(config: TrainConfig, device: torch.device) -> tuple[LPIPS | None, TrainConfig, str]:
    """LPIPS when its VGG16 weights are on disk (no download attempt: GPU hosts may be offline); else the term off."""
    if config.loss.perceptual_weight == 0:
        return None, config, "LPIPS off (perceptual_weight 0 in the recipe)"
    weights = config.train.lpips_weights or None
    if not lpips_available(weights, allow_download=False):
        loss = dataclasses.replace(config.loss, perceptual_weight=0.0)
        return None, dataclasses.replace(config, loss=loss), "LPIPS OFF: VGG16 weights not found (no download tried)"
    return LPIPS(weights_path=weights).to(device), config, "LPIPS on (VGG16 weights found)"


def count_syncs(step: RealStep) -> tuple[int, tuple[str, ...]]:
    """Host syncs of one call of `step`: the warnings torch.cuda.set_sync_debug_mode("warn") raises."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            # NOTE: no synchronize inside the counted region: it would count itself
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), tuple(f"{site} x{n}" for site, n in sites.most_common())


@dataclass(frozen=True)
class Timing:
    warmup_s: float  # the warm-up steps, compilation included
    images_per_s: float
    ms_per_step: float
    peak_bytes: int | None  # None on CPU


def time_step(step: Callable[[], None], batch_size: int, warmup: int, steps: int, device: torch.device) -> Timing:
    """`warmup` untimed calls of step(), then `steps` timed ones between device drains; peak memory of those (CUDA)."""
    cuda = device.type == "cuda"

    def drain() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    drain()
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    drain()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Timing(warmup_s, steps * batch_size / elapsed, 1e3 * elapsed / steps, peak)


def run_variant(name: str, config: TrainConfig, perceptual: LPIPS | None, args: argparse.Namespace,
                device: torch.device) -> tuple[Result, str]:
    """Build fresh modules for one variant, warm up, time, measure memory and syncs; -> (result, description)."""
    compiled, channels_last = VARIANTS[name]
    torch.manual_seed(0)
    model = VQModel(config.model).to(device).train()
    disc = PatchDiscriminator(config.discriminator).to(device).train()
    size = config.data.image_size
    images = torch.rand(args.batch_size, 3, size, size, device=device) * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1]
    if channels_last:
        model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    about = (f"generator {format_count(count_parameters(model))} params, discriminator "
             f"{format_count(count_parameters(disc))}, EMA {config.train.ema_decay}")
    step = RealStep(model, disc, config.loss, config.optim, config.disc_optim, images, "bf16",
                    ema_decay=config.train.ema_decay, perceptual=perceptual, compile=compiled,
                    total_steps=config.train.steps)
    cuda = device.type == "cuda"
    timing = time_step(step, args.batch_size, args.warmup, args.steps, device)
    syncs, sites = count_syncs(step) if cuda else (None, ())
    result = Result(name, compiled, channels_last, timing.warmup_s, timing.images_per_s, timing.ms_per_step,
                    timing.peak_bytes, syncs, sites)
    del step, model, disc, images
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # the next variant's fresh modules compile from scratch, not against old guards
    if cuda:
        torch.cuda.empty_cache()
    return result, about


def report(results: list[Result], config: TrainConfig, about: str, lpips_note: str, device: torch.device,
           args: argparse.Namespace) -> str:
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_machine(device).split(";")[0]
    size, f = config.data.image_size, config.model.downsample_factor
    loss, optim = config.loss, config.optim
    lines = [
        f"## {hw}: {'imagenet256_f16_l2' if not args.dry_run_cpu else 'tiny (dry run)'}, batch {args.batch_size}, bf16",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/gpu_step.py', *sys.argv[1:]])}`",
        "",
        f"- Device: {hw}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"- Model: {about}; {size}px -> {size // f}x{size // f} tokens, K={config.model.quantizer.num_codes}.",
        f"- Loss ({RECIPE.relative_to(ROOT)}, disc_start 0): {loss.reconstruction_kind} x {loss.reconstruction_weight}, "
        f"perceptual x {loss.perceptual_weight}, codebook x {loss.codebook_weight}, {loss.disc_loss} GAN x "
        f"{loss.disc_weight} (adaptive weight {loss.use_adaptive_weight}); Adam lr {optim.lr} betas {optim.betas}, "
        f"grad clip {optim.grad_clip} / {config.disc_optim.grad_clip}. {lpips_note}.",
        "- Step: train_step.RealStep (vqgan/train.py's own TokenizerStep on a window of one micro-batch), "
        "torch.autocast(bfloat16), weights and Adam in fp32; compile = nn.Module.compile in place on G and D.",
        f"- Timing: {args.warmup} warm-up step(s) (compilation included), then {args.steps} steps between "
        "torch.cuda.synchronize calls. Peak memory: torch.cuda.max_memory_allocated over the timed steps "
        "(weights, Adam state, EMA included). Host syncs: torch.cuda.set_sync_debug_mode('warn') warnings "
        "of one more step, outside the timed region.",
        "",
        "| variant | torch.compile | channels_last | images/s | ms/step | warm-up s | peak memory | host syncs / step |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        peak = f"{r.peak_bytes / 2**30:.2f} GiB" if r.peak_bytes is not None else "n/a"
        syncs = str(r.syncs) if r.syncs is not None else "not counted"
        lines.append(f"| {r.variant} | {r.compiled} | {r.channels_last} | {r.images_per_s:.1f} | {r.ms_per_step:.1f} "
                     f"| {r.warmup_s:.1f} | {peak} | {syncs} |")
    sited = [r for r in results if r.sync_sites]
    if sited:
        lines += ["", "Where the syncs come from (warning location, count):"]
        lines += [f"- {r.variant}: {', '.join(r.sync_sites)}" for r in sited]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation included)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="_cl: channels_last")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check the script on CPU: tiny preset, 32px, batch 2, 1 warm-up + 2 timed steps, "
                        "no sync counting, no results file")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        args.batch_size, args.warmup, args.steps = 2, 1, 2
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(f"need --batch-size >= 1, --steps >= 1, --warmup >= 0; got {args.batch_size}, {args.steps}, "
                     f"{args.warmup}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py: no CUDA device (torch.cuda.is_available() is False); nothing measured, "
                         "no results written (use --dry-run-cpu to check the script on CPU)")
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    config = load_config(args.dry_run_cpu)
    perceptual, config, lpips_note = build_perceptual(config, device)
    print(lpips_note, flush=True)
    results, about = [], ""
    for name in args.variants:
        result, about = run_variant(name, config, perceptual, args, device)
        results.append(result)
        print(f"{name}: {result.images_per_s:.1f} images/s, warm-up {result.warmup_s:.1f} s, "
              f"syncs {result.syncs}", flush=True)
    text = report(results, config, about, lpips_note, device, args)
    print()
    print(text)
    if args.dry_run_cpu:
        print("dry run: results file not written")
        return
    atomic_write_text(args.out, "# GPU training step benchmark\n\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
