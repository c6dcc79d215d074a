"""Benchmark one VQGAN training step: images/s and peak memory, against taming-transformers.

Two configs: `quickstart` (recipes/quickstart.yaml through vqgan.train.load_train_config: model,
discriminator, loss, optimizers, batch size, image size, EMA) and `taming_f4` (the preset: ch 64,
ch_mult (1, 2, 2), one res block, attention at 8x8, 64-dim codes, K=1024; 32px, batch 16, taming's
default discriminator: ndf 64, 3 layers, BatchNorm; LossConfig and OptimConfig defaults, no EMA).
Two steps per config:

- `gen`: forward, loss = L1 + quantizer loss, backward, Adam step. The same work as the figure
  quoted in the issue for taming-transformers (about 33 images/s at batch 16 on a 2-core machine).
- `full`: the step vqgan/train.py runs once the discriminator is on: generator update (L1 +
  codebook + adversarial term with the adaptive weight, through vqgan.losses.generator_loss, the
  finite-loss check, gradient clipping, Adam) then discriminator update
  (vqgan.losses.discriminator_loss, clipping, Adam), then the EMA update when the config has one.
  LPIPS is off: its VGG weights are not available offline. Plain torch, no Accelerate wrapper
  (in one process its backward, clip and autocast are these same calls).

With `--taming-ref DIR`, DIR must hold `taming_ref.py` with a `taming_f4_32px()` factory returning
taming's VQModel (Encoder, Decoder, VectorQuantizer2) whose forward returns (decoded, qloss); its
`gen` step then runs on the same machine, interleaved with ours. That copy is NOT part of this
repository (taming's code stays out of it).

Timing: after `--warmup` steps, `--rounds` rounds in which the steps of all cases alternate, `--iters`
timed steps each (a burst of load on the shared machine slows every case alike); the median of each
round, best round reported. Memory: on CUDA torch.cuda.max_memory_allocated above
the level before the step (weights, gradients of the previous step freed, Adam state present); on
CPU the same quantity as peak resident set size (VmHWM reset through /proc/self/clear_refs) in a
child process run with MALLOC_MMAP_THRESHOLD_=65536, so that every large buffer is its own mmap and
resident memory follows live memory.

    .venv/bin/python benchmarks/train_step.py --threads 2 --dtype fp32 bf16 --taming-ref /tmp/taming_ref
    .venv/bin/python benchmarks/train_step.py --threads 1 --dtype fp32 bf16 --taming-ref /tmp/taming_ref --append
    .venv/bin/python benchmarks/train_step.py --device cuda --dtype fp32 bf16 --channels-last [--compile] --append

Each run writes one section (a fresh file, or added to it with --append); `--profile` adds a
torch.profiler table per case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
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

from common import peak_extra_bytes, timed  # noqa: E402
from vqgan.autoencoder import VQModel, VQModelConfig, preset  # noqa: E402
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator  # noqa: E402
from vqgan.ema import create_ema, update_ema  # noqa: E402
from vqgan.losses import LossConfig, discriminator_loss, generator_loss  # noqa: E402
from vqgan.optim import OptimConfig, build_optimizer  # noqa: E402
from vqgan.train import load_train_config  # noqa: E402
from vqgan.utils import atomic_write_text, count_parameters, format_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_step.md"
CONFIGS = ("quickstart", "taming_f4")
STEPS = ("gen", "full")
TAMING_QUOTED_IMAGES_PER_S = 33.0  # from the issue: taming's generator step, batch 16, 2-core machine
GOAL_RATIO = 1.3


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


def load_setup(name: str) -> Setup:
    """The quickstart recipe or the taming_f4 preset, with LPIPS off and the discriminator on from step 0."""
    if name == "quickstart":
        cfg = load_train_config(str(ROOT / "recipes" / "quickstart.yaml"), [])
        loss = dataclasses.replace(cfg.loss, perceptual_weight=0.0, disc_start=0)
        return Setup(cfg.model, cfg.discriminator, loss, cfg.optim, cfg.disc_optim, cfg.train.batch_size,
                     cfg.data.image_size, cfg.train.ema_decay)
    if name == "taming_f4":
        loss = LossConfig(perceptual_weight=0.0, disc_start=0)
        return Setup(preset("taming_f4"), DiscriminatorConfig(), loss, OptimConfig(), OptimConfig(), 16, 32, 0.0)
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


def autocast(dtype: str, device: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


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
        if args.taming_ref is None:
            raise ValueError("the taming case needs --taming-ref DIR")
        sys.path.insert(0, str(args.taming_ref))
        import taming_ref  # noqa: PLC0415 (optional, outside the repository)

        raw = prepare_module(taming_ref.taming_f4_32px(), args)
    else:
        raw = prepare_module(VQModel(setup.model), args)
        raw.check_finite = not args.no_check_finite
    about = f"{case.impl} generator {format_count(count_parameters(raw))} params"
    model = torch.compile(raw) if args.compile else raw
    opt_g = build_optimizer(raw.parameters(), setup.optim)  # Adam, taming's betas (0.5, 0.9)

    if case.step == "gen":
        def gen_step() -> None:
            with autocast(case.dtype, args.device):
                decoded, quant = model(images)
                quant_loss = quant if case.impl == "taming" else quant.loss
                loss = (decoded.float() - images).abs().mean() + quant_loss  # L1 + codebook (taming's setup)
                loss.backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

        return gen_step, setup.batch_size, about

    if case.impl == "taming":
        raise ValueError("only the generator step is benchmarked for the taming reference")
    raw_disc = prepare_module(PatchDiscriminator(setup.discriminator), args)
    disc = torch.compile(raw_disc) if args.compile else raw_disc
    opt_d = build_optimizer(raw_disc.parameters(), setup.disc_optim)
    ema = create_ema(raw).to(device) if setup.ema_decay > 0 else None
    loss_cfg = setup.loss
    about += f", discriminator {format_count(count_parameters(raw_disc))}" + (", EMA" if ema is not None else "")
    counter = iter(range(10**9))

    def full_step() -> None:  # the body of vqgan/train.py's loop once disc_on, perceptual off
        step = next(counter)
        with autocast(case.dtype, args.device):
            decoded, quant = model(images)
            recon = decoded
            raw_disc.requires_grad_(False)  # the generator's update must not touch D's gradients
            logits_fake = raw_disc(recon)
            raw_disc.requires_grad_(True)
            g_total, _ = generator_loss(loss_cfg, images, decoded, recon, quant.loss, logits_fake,
                                        raw.last_layer_weight, step, None)
            if not torch.isfinite(g_total.detach()).item():  # the loop's non-finite check (a host sync)
                raise RuntimeError("non-finite generator loss in the benchmark")
            g_total.backward()
            if setup.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), setup.optim.grad_clip)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            d_total, _ = discriminator_loss(loss_cfg, disc, images, recon.detach(), step)
            d_total.backward()
            if setup.disc_optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), setup.disc_optim.grad_clip)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw, setup.ema_decay)

    return full_step, setup.batch_size, about


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
    command += ["--no-check-finite"] if args.no_check_finite else []
    command += ["--taming-ref", str(args.taming_ref)] if args.taming_ref else []
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
                if args.taming_ref is not None and config == "taming_f4" and step == "gen":
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
        f"- Device: {describe_device(device)}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"- channels_last {args.channels_last}, torch.compile {args.compile}, "
        f"VQModel.check_finite {not args.no_check_finite}; bf16 = torch.autocast(bfloat16), weights and Adam in fp32.",
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after} "
        f"(machine shared with other jobs: throughput under load is lower than on an idle machine).",
        f"- Timing: {args.warmup} warm-up steps per case, then {args.rounds} rounds of {args.iters} timed steps per "
        "case, the steps of all cases alternating; images/s = batch / median step time of the best round (all "
        "rounds listed).",
        "- Memory: peak above the level before the step (weights, Adam state present): "
        + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else
           "peak RSS (VmHWM after /proc/self/clear_refs) in a child process with MALLOC_MMAP_THRESHOLD_=65536."),
        "- `gen`: forward, L1 + quantizer loss, backward, Adam (the taming figure's work). `full`: generator step "
        "with L1 + codebook + adaptive-weighted hinge adversarial term (vqgan.losses.generator_loss), finite "
        "check, grad clipping, Adam; then the discriminator step (vqgan.losses.discriminator_loss); then EMA "
        "where the config has one. LPIPS is OFF in both (its VGG weights are not available offline).",
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
    if args.taming_ref is not None:
        lines.append("The taming reference is a minimal copy of taming-transformers' Encoder, Decoder and "
                     "VectorQuantizer2 (legacy beta) with its VQModel glue, kept outside this repository and "
                     "passed with --taming-ref; it gets the same precision, layout and compile flags as ours.")
    else:
        lines.append("No same-machine taming run (pass --taming-ref DIR): only the quoted figure is compared.")
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator and discriminator")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating steps; the best is reported")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--taming-ref", type=Path, default=None,
                        help="folder with taming_ref.py (taming's generator, kept outside the repo)")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="set VQModel.check_finite = False (skips the input finiteness check and its sync)")
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
    if args.taming_ref is not None and not (args.taming_ref / "taming_ref.py").is_file():
        raise SystemExit(f"--taming-ref {args.taming_ref}: expected a folder holding taming_ref.py")
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
