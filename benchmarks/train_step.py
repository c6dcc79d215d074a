"""Benchmark one VQGAN training step: images/s and peak memory, against taming-transformers.

Two configs: `quickstart` (recipes/quickstart.yaml through vqgan.train.load_train_config: model,
discriminator, loss, optimizers, batch size, image size, EMA) and `taming_f4` (the preset: ch 64,
ch_mult (1, 2, 2), one res block, attention at 8x8, 64-dim codes, K=1024; 32px, batch 16, taming's
default discriminator: ndf 64, 3 layers, BatchNorm; LossConfig and OptimConfig defaults, no EMA).
Two steps per config:

- `gen`: forward, loss = L1 + quantizer loss, backward, Adam step: `generator_step` with a LossConfig
  that turns the GAN and perceptual terms off (disc_start never reached, perceptual weight 0), then
  `apply_updates` without clipping. The same work as the figure quoted in the issue for
  taming-transformers (about 33 images/s at batch 16 on a 2-core machine).
- `full`: the step vqgan/train.py runs once the discriminator is on: the loop's own object,
  `vqgan.training.tokenizer_step.TokenizerStep` (through `RealStep`), on one window of one micro-batch:
  WindowSnapshot, seed_window, `vqgan.training.gan_step.generator_step` (L1 + codebook + adversarial
  term with the adaptive weight), `discriminator_step`, the non-finite and overflow flags and their one read
  (reduce_window_flags), `apply_updates` (gradient clipping, both Adams), the schedulers, the EMA
  update with ema_decay_at when the config has one. VQModel.check_finite is off, as in the loop. LPIPS is off: its VGG
  weights are not available offline. One process: Accelerate's backward, torch autocast in the case's
  dtype (the loop's accelerator.autocast() is the same call), no DDP wrapper.

With `--taming`, taming-transformers' own generator (Encoder, Decoder, VectorQuantizer2 from the
`taming-transformers-rom1504` wheel that setup.sh installs, glued as its VQModel by
benchmarks/taming_step.py) at the taming_f4 layout runs the same `gen` step on the same machine,
interleaved with ours.

Timing: after `--warmup` steps, `--rounds` rounds in which the steps of all cases alternate, `--iters`
timed steps each (a burst of load on the shared machine slows every case alike); the median of each
round, best round reported. Memory: on CUDA torch.cuda.max_memory_allocated above
the level before the step (weights, gradients of the previous step freed, Adam state present); on
CPU the same quantity as peak resident set size (VmHWM reset through /proc/self/clear_refs) in a
child process run with MALLOC_MMAP_THRESHOLD_=65536, so that every large buffer is its own mmap and
resident memory follows live memory.

    .venv/bin/python benchmarks/train_step.py --threads 2 --dtype fp32 bf16 --taming
    .venv/bin/python benchmarks/train_step.py --threads 1 --dtype fp32 bf16 --taming --append
    .venv/bin/python benchmarks/train_step.py --device cuda --dtype fp32 bf16 --channels-last [--compile] --append

Each run writes one section (a fresh file, or added to it with --append); `--profile` adds a
torch.profiler table per case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from accelerate import Accelerator  # noqa: E402
from torch import nn  # noqa: E402

from common import peak_extra_bytes, source_commit, timed  # noqa: E402
from vqgan.autoencoder import VQModel, VQModelConfig, preset  # noqa: E402
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator  # noqa: E402
from vqgan.losses import LeCAM, LossConfig  # noqa: E402
from vqgan.optim import OptimConfig, build_optimizer, build_scheduler  # noqa: E402
from vqgan.train import load_train_config  # noqa: E402
from vqgan.training.ema import create_ema  # noqa: E402
from vqgan.training.gan_step import generator_step  # noqa: E402
from vqgan.training.run import compile_in_place  # noqa: E402
from vqgan.training.state import TrainState  # noqa: E402
from vqgan.training.tokenizer_step import TokenizerStep  # noqa: E402
from vqgan.training.window import Update, apply_updates  # noqa: E402
from vqgan.utils import atomic_write_text, count_parameters, format_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_step.md"
CONFIGS = ("quickstart", "taming_f4")
STEPS = ("gen", "full")
TAMING_QUOTED_IMAGES_PER_S = 33.0  # from the issue: taming's generator step, batch 16, 2-core machine
GOAL_RATIO = 1.3
NEVER = 2**62  # a disc_start no step reaches: the `gen` step's GAN term stays off
# the `gen` step's objective: L1 + codebook only (taming's setup), through the same generator_step
GEN_LOSS = LossConfig(reconstruction_kind="l1", perceptual_weight=0.0, codebook_weight=1.0, disc_start=NEVER)


@dataclass(frozen=True)
class Setup:
    """Everything one config needs to build a training step."""

    model: VQModelConfig
    discriminator: DiscriminatorConfig
    loss: LossConfig
    optim: OptimConfig
    disc_optim: OptimConfig
    batch_size: int
    image_size: int
    ema_decay: float
    total_steps: int  # train.steps: the schedulers' length


def load_setup(name: str) -> Setup:
    """The quickstart recipe or the taming_f4 preset, with LPIPS off and the discriminator on from step 0."""
    if name == "quickstart":
        cfg = load_train_config(str(ROOT / "recipes" / "quickstart.yaml"), [])
        loss = dataclasses.replace(cfg.loss, perceptual_weight=0.0, disc_start=0)
        return Setup(cfg.model, cfg.discriminator, loss, cfg.optim, cfg.disc_optim, cfg.train.batch_size,
                     cfg.data.image_size, cfg.train.ema_decay, cfg.train.steps)
    if name == "taming_f4":
        loss = LossConfig(perceptual_weight=0.0, disc_start=0)
        return Setup(preset("taming_f4"), DiscriminatorConfig(), loss, OptimConfig(), OptimConfig(), 16, 32, 0.0, 1000)
    raise ValueError(f"unknown config {name!r}; expected one of {CONFIGS}")


@dataclass(frozen=True)
class Case:
    config: str
    step: str  # "gen" or "full"
    impl: str  # "vqgan" or "taming"
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)

    @property
    def key(self) -> str:
        return f"{self.config}:{self.step}:{self.impl}:{self.dtype}"

    @staticmethod
    def from_key(key: str) -> Case:
        return Case(*key.split(":"))


def autocast(dtype: str, device: str | torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@functools.cache
def single_process(device_type: str) -> Accelerator:
    """The one-process Accelerator whose flags the window reads (reduce_window_flags), as vqgan/train.py's."""
    return Accelerator(cpu=device_type == "cpu")


class RealStep:
    """One window of one micro-batch of vqgan/train.py's loop: the loop's own `TokenizerStep`, on fixed images.

    `model` and `discriminator` are on the device already (and in channels_last where asked); the
    EMA copy, the optimizers and schedulers are built here, then both modules are compiled in place
    when `compile` is set, in the loop's order. Call it once per optimizer step. A non-finite loss
    stops it (max_nonfinite_in_row=1: a RuntimeError) rather than discarding the window: a benchmark
    must not time skipped steps.
    """

    def __init__(self, model: VQModel, discriminator: nn.Module, loss: LossConfig, optim: OptimConfig,
                 disc_optim: OptimConfig, images: torch.Tensor, dtype: str, ema_decay: float = 0.0,
                 perceptual: nn.Module | None = None, compile: bool = False, total_steps: int = 10**6):
        device = images.device
        model.check_finite = False  # as vqgan/train.py: the window's non-finite flag catches a NaN input
        lecam = LeCAM(loss.lecam_decay).to(device) if loss.lecam_weight > 0 else None
        self.opt_g, self.opt_d = build_optimizer(model, optim), build_optimizer(discriminator, disc_optim)
        sched_g = build_scheduler(self.opt_g, optim, total_steps)
        sched_d = build_scheduler(self.opt_d, disc_optim, max(1, total_steps - loss.disc_start))
        self.ema = create_ema(model) if ema_decay > 0 else None
        if compile:
            compile_in_place(model, discriminator)
        # the one-process Accelerator of the loop, without its mixed precision: autocast is the case's dtype
        self.step = TokenizerStep(single_process(device.type), model, discriminator, perceptual, lecam, self.opt_g,
                                  self.opt_d, sched_g, sched_d, self.ema, loss, optim.grad_clip, disc_optim.grad_clip,
                                  ema_decay, autocast=functools.partial(autocast, dtype, device))
        self.state = TrainState()
        self.images = images

    def draw(self) -> tuple[torch.Tensor, bool]:
        self.state.batches_seen += 1  # as resumable_batches counts each batch it yields
        return self.images, False

    def __call__(self) -> None:
        self.step(self.state, self.draw)  # None only for a discarded window, which max_nonfinite_in_row=1 forbids
        self.state.step += 1


def prepare_module(module: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    module = module.to(args.device).train()
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def build_step(case: Case, args: argparse.Namespace) -> tuple[Callable[[], None], int, str]:
    """(one training step as a closure, batch size, model description) for `case`."""
    setup = load_setup(case.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(setup.batch_size, 3, setup.image_size, setup.image_size, device=device) * 2.0 - 1.0
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    if case.impl == "taming":
        if case.step != "gen":
            raise ValueError("only the generator step is benchmarked for the taming reference")
        from taming_step import TamingSize, TamingVQModel  # noqa: PLC0415 (the optional wheel)

        size = TamingSize(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=64,
                          resolution=32, n_embed=1024, embed_dim=64)  # the taming_f4 preset's layout
        taming = prepare_module(TamingVQModel(size), args)
        opt = build_optimizer(taming, setup.optim)  # Adam, taming's betas (0.5, 0.9)
        if args.compile:
            compile_in_place(taming)
        params = list(taming.parameters())

        def taming_gen_step() -> None:  # taming's VQModel returns (decoded, qloss): the same objective by hand
            with autocast(case.dtype, device):
                decoded, quant_loss = taming(images)
                ((decoded.float() - images).abs().mean() + quant_loss).backward()  # L1 + codebook
            apply_updates([Update(opt, params, 0.0)], None)

        return taming_gen_step, setup.batch_size, f"taming generator {format_count(count_parameters(taming))} params"

    model = prepare_module(VQModel(setup.model), args)
    about = f"vqgan generator {format_count(count_parameters(model))} params"
    if case.step == "gen":
        model.check_finite = False  # as vqgan/train.py
        opt_g = build_optimizer(model, setup.optim)
        if args.compile:
            compile_in_place(model)
        params = list(model.parameters())

        def gen_step() -> None:
            with autocast(case.dtype, device):
                # disc_start is never reached: no discriminator is called (hence None)
                generator_step(model, model, None, None, images, GEN_LOSS, 0)
            apply_updates([Update(opt_g, params, 0.0)], None)  # taming's step does not clip

        return gen_step, setup.batch_size, about

    disc = prepare_module(PatchDiscriminator(setup.discriminator), args)
    step = RealStep(model, disc, setup.loss, setup.optim, setup.disc_optim, images, case.dtype,
                    ema_decay=setup.ema_decay, compile=args.compile, total_steps=setup.total_steps)
    about += f", discriminator {format_count(count_parameters(disc))}" + (", EMA" if step.ema is not None else "")
    return step, setup.batch_size, about


def measure_memory(case: Case, args: argparse.Namespace) -> int:
    """Peak extra bytes of one step after two warm-up steps; on CPU in a child process (module doc)."""
    if torch.device(args.device).type == "cuda" or args.measure_child:
        step, _, _ = build_step(case, args)
        step()
        step()
        return peak_extra_bytes(step, torch.device(args.device))
    command = [sys.executable, __file__, "--measure-child", case.key, "--device", args.device,
               "--threads", str(torch.get_num_threads())]
    command += ["--channels-last"] if args.channels_last else []
    command += ["--compile"] if args.compile else []
    command += ["--taming"] if args.taming else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or "unknown CPU"
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    cpu = match.group(1).strip() if match else cpu
    return f"CPU {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def load_text() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def profile(case: Case, args: argparse.Namespace, rows: int = 25) -> str:
    """torch.profiler table of `case` over 5 steps, sorted by self CPU time (CUDA time on GPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile  # noqa: PLC0415

    step, _, _ = build_step(case, args)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    sort = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    cases = []
    for dtype in args.dtype:
        for config in args.configs:
            for step in args.steps:
                cases.append(Case(config, step, "vqgan", dtype))
                if args.taming and config == "taming_f4" and step == "gen":
                    cases.append(Case(config, step, "taming", dtype))
    load_before = load_text()
    print(f"load average before: {load_before}", flush=True)

    built = {}
    for case in cases:
        step, batch, about = build_step(case, args)
        for _ in range(args.warmup):
            step()
        built[case] = (step, batch, about)
        print(f"built {case.key}: {about}", flush=True)
    medians: dict[Case, list[float]] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        # Steps of all cases alternate (A B C A B C ...), so a burst of load on the shared machine
        # slows every case alike and the ratios between them hold.
        times: dict[Case, list[float]] = {case: [] for case in cases}
        for _ in range(args.iters):
            for case in cases:
                times[case].append(timed(built[case][0], device))
        for case in cases:
            medians[case].append(statistics.median(times[case]))
            print(f"round {round_index}: {case.key} {built[case][1] / medians[case][-1]:.1f} images/s", flush=True)
        print(f"load after round {round_index}: {load_text()}", flush=True)
    load_after = load_text()
    memory = {case: measure_memory(case, args) for case in cases}

    def images_per_s(case: Case) -> float:
        return built[case][1] / min(medians[case])

    def taming_ratio(case: Case, dtype: str) -> str:
        ref = Case("taming_f4", "gen", "taming", dtype)
        return f"{images_per_s(case) / images_per_s(ref):.2f}x" if ref in medians else ""

    lines = [
        f"## {describe_device(device)}: {', '.join(args.dtype)}",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/train_step.py', *sys.argv[1:]])}`",
        "",
        f"- Device: {describe_device(device)}; torch {torch.__version__}; Python {platform.python_version()}; {source_commit()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"- channels_last {args.channels_last}, torch.compile {args.compile}, "
        "VQModel.check_finite False (as vqgan/train.py); bf16 = torch.autocast(bfloat16), weights and Adam in fp32.",
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after} "
        f"(machine shared with other jobs: throughput under load is lower than on an idle machine).",
        f"- Timing: {args.warmup} warm-up steps per case, then {args.rounds} rounds of {args.iters} timed steps per "
        "case, the steps of all cases alternating; images/s = batch / median step time of the best round (all "
        "rounds listed).",
        "- Memory: peak above the level before the step (weights, Adam state present): "
        + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else
           "peak RSS (VmHWM after /proc/self/clear_refs) in a child process with MALLOC_MMAP_THRESHOLD_=65536."),
        "- `gen`: vqgan.training.gan_step.generator_step with L1 + quantizer loss only (GAN and perceptual terms "
        "off), then apply_updates without clipping: forward, backward, Adam (the taming figure's work). `full`: "
        "vqgan/train.py's own step (TokenizerStep) on one micro-batch: WindowSnapshot, seed_window, "
        "generator_step (L1 + codebook + adaptive-weighted hinge adversarial term), discriminator_step, the "
        "non-finite and overflow flags and their one read, apply_updates (grad clipping, both Adams), schedulers, EMA with "
        "ema_decay_at where the config has one. LPIPS is OFF in both (its VGG weights are not available offline).",
        "- quickstart: recipes/quickstart.yaml via vqgan.train.load_train_config (disc_start set to 0). taming_f4: "
        "preset('taming_f4'), taming's default PatchGAN (ndf 64, 3 layers, BatchNorm), default loss/optim, no EMA.",
        "- Ratios (taming_f4 `gen` only): against taming run here at the same precision, against taming run here "
        "in fp32 (how taming-transformers trains), and against the quoted 33 images/s (fp32, another 2-core machine).",
        "",
        "| config | step | implementation | precision | batch | images/s | ms/step | rounds (images/s) "
        "| peak step memory | vs taming, same precision | vs taming fp32 | vs quoted 33 img/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        batch, about = built[case][1], built[case][2]
        ips = images_per_s(case)
        rounds = ", ".join(f"{batch / m:.1f}" for m in medians[case])
        same = fp32 = quoted = ""
        if case.config == "taming_f4" and case.step == "gen":
            same, fp32 = taming_ratio(case, case.dtype), taming_ratio(case, "fp32")
            quoted = f"{ips / TAMING_QUOTED_IMAGES_PER_S:.2f}x"
        lines.append(
            f"| {case.config} | {case.step} | {about} | {case.dtype} | {batch} | {ips:.1f} "
            f"| {1e3 * min(medians[case]):.1f} | {rounds} | {memory[case] / 2**20:,.0f} MB "
            f"| {same} | {fp32} | {quoted} |"
        )
    lines += ["", f"Goal: at least {GOAL_RATIO}x taming's images/s on the taming_f4 `gen` step."]
    for dtype in args.dtype:
        ours = Case("taming_f4", "gen", "vqgan", dtype)
        if ours not in medians:
            continue
        ref = Case("taming_f4", "gen", "taming", "fp32")
        if ref in medians:
            ratio = images_per_s(ours) / images_per_s(ref)
            lines.append(f"- vqgan {dtype} vs taming fp32, same machine and run: {ratio:.2f}x "
                         f"({'met' if ratio >= GOAL_RATIO else 'NOT met'}).")
        ratio = images_per_s(ours) / TAMING_QUOTED_IMAGES_PER_S
        lines.append(f"- vqgan {dtype} vs the quoted 33 images/s: {ratio:.2f}x "
                     f"({'met' if ratio >= GOAL_RATIO else 'NOT met'}; another machine, so only indicative).")
    if args.taming:
        lines.append("The taming reference is taming-transformers' own Encoder, Decoder and VectorQuantizer2 "
                     "(taming-transformers-rom1504 0.0.6) with its VQModel forward (benchmarks/taming_step.py); "
                     "it gets the same precision, layout and compile flags as ours.")
    else:
        lines.append("No same-machine taming run (pass --taming): only the quoted figure is compared.")
    if args.profile:
        for case in cases:
            lines += ["", f"### Profile: {case.key}", "", "```", profile(case, args), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                        help="one or more precisions; bf16: torch.autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generator and discriminator in place (nn.Module.compile), as vqgan.train")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating steps; the best is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--taming", action="store_true",
                        help="also time taming-transformers' generator step (its wheel; setup.sh installs it)")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="accepted for older command lines: VQModel.check_finite is now always False, as in "
                        "vqgan/train.py")
    parser.add_argument("--profile", action="store_true", help="append a torch.profiler table per case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    parser.add_argument("--measure-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    if args.taming:
        from taming_step import TamingMissing, import_taming  # noqa: PLC0415

        try:
            import_taming()
        except TamingMissing as err:
            raise SystemExit(str(err)) from err
    if args.measure_child:  # child process of measure_memory
        print(measure_memory(Case.from_key(args.measure_child), args))
        return
    report = run(args)
    print()
    print(report)
    if args.append and args.out.exists():
        report = args.out.read_text().rstrip("\n") + "\n\n" + report
    else:
        report = "# Training step benchmark\n\n" + report
    atomic_write_text(args.out, report)
    print(f"{'appended to' if args.append else 'wrote'} {args.out}")


if __name__ == "__main__":
    main()
