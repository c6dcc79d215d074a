"""The parts of benchmarks/gpu_acceptance.py: each measures one thing on the GPU and returns its markdown section.

`PARTS` maps a part's name to its function `(Scale) -> Section`; gpu_acceptance.py runs each one in a
process of its own (`python benchmarks/gpu_parts.py PART --out FILE [--dry-run-cpu]`) under a time limit.
`GPU` is the scale of the real run; `DRY` the tiny CPU rehearsal of the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_step, sampling, tokenization import their neighbours so

from safetensors.torch import load_file  # noqa: E402

from vqgan.utils import atomic_write_text, count_parameters, format_count  # noqa: E402


@dataclass(frozen=True)
class Section:
    text: str  # markdown, without the part's "## " heading
    ok: bool  # False: the part ran but its check failed (a goal miss is not a failure; a broken run is)


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: `GPU` (one H100, about 8 minutes for every part) or `DRY` (CPU rehearsal)."""

    device: str
    dtype: str  # mixed precision of the training runs and the step benchmark
    step_batches: tuple[int, ...]
    step_warmup: int
    step_steps: int
    sampling: SimpleNamespace  # benchmarks/sampling.py's size options
    sampling_batches: tuple[int, ...]
    maskgit_steps: tuple[int, ...]
    tokenizer_preset: str
    tokenize_size: int
    tokenize_batch: int
    encoder_batches: int  # timed batches of the encoder-only measurement
    jpegs: tuple[int, int, int]  # count, width, height of the generated JPEGs tokenized end to end
    loader_workers: int  # the tokenization part's DataLoader workers
    train_workers: int  # each training run's (the usage part runs four at once)
    small_model: dict  # the `model.autoencoder` of the usage and resume runs (f16)
    train_size: int  # px of the usage and resume runs
    usage_codes: int  # K of the usage runs
    usage_steps: int
    usage_batch: int
    resume_steps: int
    resume_kill_window: int  # SIGKILL inside this window (after the checkpoint before it)
    resume_every: int  # checkpoint_every of the resume runs


GPU = Scale(
    device="cuda", dtype="bf16", step_batches=(16, 32), step_warmup=3, step_steps=10,
    sampling=SimpleNamespace(grid=16, num_codes=1024, dim=256, depth=6, heads=8, pixelcnn_hidden=128,
                             pixelcnn_layers=8),
    sampling_batches=(1, 16), maskgit_steps=(8, 12),
    tokenizer_preset="imagenet256_f16_l2", tokenize_size=256, tokenize_batch=64, encoder_batches=10,
    jpegs=(1024, 512, 384), loader_workers=8, train_workers=3,
    small_model=dict(base_channels=64, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[],
                     z_channels=64, resolution=128),
    train_size=128, usage_codes=16384, usage_steps=300, usage_batch=32,
    resume_steps=40, resume_kill_window=25, resume_every=10,
)
DRY = Scale(
    device="cpu", dtype="no", step_batches=(2,), step_warmup=1, step_steps=1,
    sampling=SimpleNamespace(grid=4, num_codes=64, dim=32, depth=2, heads=2, pixelcnn_hidden=16, pixelcnn_layers=2),
    sampling_batches=(1, 2), maskgit_steps=(8, 12),
    tokenizer_preset="tiny", tokenize_size=32, tokenize_batch=16, encoder_batches=1,
    jpegs=(48, 320, 240), loader_workers=1, train_workers=0,
    small_model=dict(base_channels=16, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[],
                     z_channels=16, num_groups=8, resolution=32),
    train_size=32, usage_codes=256, usage_steps=3, usage_batch=2,
    resume_steps=6, resume_kill_window=4, resume_every=2,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------- 1. the CUDA-marked tests


def part_cuda_tests(scale: Scale) -> Section:
    """`pytest -m cuda tests`: each test's outcome and time (all skipped without CUDA)."""
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
        report = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                               "--continue-on-collection-errors", f"--junitxml={report}", "tests"], cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-5000:], proc.stderr[-3000:], sep="\n")
        if not report.is_file():
            return Section(f"pytest wrote no report (exit status {proc.returncode}):\n\n```\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}\n```\n", False)
        cases = ElementTree.parse(report).getroot().iter("testcase")
        rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
        for case in cases:
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "skipped" if child.tag == "skipped" else "failed"
                    message = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
            counts[outcome] += 1
            message = message.replace("|", "/")
            rows.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} | {message} |")
    lines = [f"`python -m pytest -m cuda tests`: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped (exit status {proc.returncode}).", "",
             "| test | outcome | seconds | message |", "| --- | --- | ---: | --- |", *rows]
    if counts["failed"]:
        lines += ["", "```", proc.stdout[-3000:], "```"]
    # exit status 0: all passed or skipped; 5 would mean no test carries the marker
    return Section("\n".join(lines) + "\n", proc.returncode == 0 and len(rows) > 0)


# ---------------------------------------------------------------- 2. the training step against taming


def _dry_compile_backend() -> None:
    """CPU rehearsal only: dynamo traces as on the GPU, but runs the graphs eagerly (inductor's C++ build
    of the tiny model takes minutes on two cores; the GPU run uses the default backend, inductor)."""
    original = torch.nn.Module.compile

    def traced_only(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "backend": "eager"})

    torch.nn.Module.compile = traced_only


def _taming_row(batch: int, scale: Scale, device: torch.device) -> tuple[str, float]:
    from gpu_step import time_step
    from taming_step import IMAGENET_F16_16384, TINY, TamingStep, TamingVQModel, build_taming_loss

    size = TINY if device.type == "cpu" else IMAGENET_F16_16384
    torch.manual_seed(0)
    model = TamingVQModel(size).to(device).train()
    loss = build_taming_loss(disc_layers=3, disc_ndf=64).to(device).train()
    images = torch.rand(batch, 3, size.resolution, size.resolution, device=device) * 2.0 - 1.0
    step = TamingStep(model, loss, images, "bf16")
    timing = time_step(step, batch, scale.step_warmup, scale.step_steps, device)
    row = (f"| taming (wheel), eager | {batch} | {timing.images_per_s:.1f} | {timing.ms_per_step:.1f} | "
           f"{gib(timing.peak_bytes)} | {timing.warmup_s:.1f} | | {format_count(count_parameters(model))} G |")
    del step, model, loss, images
    gc.collect()
    return row, timing.images_per_s


def step_section(scale: Scale, variants: tuple[str, ...], with_taming: bool) -> Section:
    """Our imagenet256_f16_l2 step (gpu_step.run_variant) per variant and batch, beside taming's at the same batch."""
    import gpu_step

    device = torch.device(scale.device)
    if device.type == "cpu" and any(gpu_step.VARIANTS[v][0] for v in variants):
        _dry_compile_backend()
    config = gpu_step.load_config(dry_run=device.type == "cpu")
    # LPIPS off on both sides: taming's would need its downloaded weights, and the GPU host is offline
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, perceptual_weight=0.0))
    rows, ours, theirs, about, sync_notes = [], {}, {}, "", []
    taming_error = ""
    for batch in scale.step_batches:
        args = SimpleNamespace(batch_size=batch, warmup=scale.step_warmup, steps=scale.step_steps)
        for variant in variants:
            result, about = gpu_step.run_variant(variant, config, None, args, device)
            ours[variant, batch] = result.images_per_s
            syncs = "not counted (CPU)" if result.syncs is None else str(result.syncs)
            if result.sync_sites:
                sync_notes.append(f"- {variant}, batch {batch}: {', '.join(result.sync_sites)}")
            rows.append(f"| ours, {variant} | {batch} | {result.images_per_s:.1f} | {result.ms_per_step:.1f} | "
                        f"{gib(result.peak_bytes)} | {result.warmup_s:.1f} | {syncs} | |")
            print(rows[-1], flush=True)
        if with_taming and not taming_error:
            try:
                row, theirs[batch] = _taming_row(batch, scale, device)
                rows.append(row)
                print(row, flush=True)
            except Exception as err:  # noqa: BLE001 - reported in the section, our rows stay
                taming_error = f"{type(err).__name__}: {err}"
    size = config.data.image_size
    lines = [
        f"Ours: {'imagenet256_f16_l2' if device.type == 'cuda' else 'tiny (dry run)'} ({about}), {size}px, "
        "the recipe's loss and optimizers with disc_start 0 and LPIPS off, bf16 autocast, one window of one "
        "micro-batch of vqgan/train.py (benchmarks/train_step.py RealStep, as benchmarks/gpu_step.py); _cl: "
        "channels_last, as the recipe trains. Host syncs: set_sync_debug_mode('warn') warnings of one more step "
        "(the window flag's one read is expected).",
    ]
    if with_taming:
        lines.append(
            "taming: its ImageNet f16 K=16384 VQGAN (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16, "
            "256-dim codes) and NLayerDiscriminator (ndf 64, 3 layers, BatchNorm) from the "
            "taming-transformers-rom1504 wheel, one Lightning training_step per optimizer "
            "(benchmarks/taming_step.py: two generator forwards per step), LPIPS off, the same bf16 autocast.")
    lines += ["", "| step | batch | images/s | ms/step | peak memory | warm-up s | host syncs | params |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", *rows]
    if sync_notes:
        lines += ["", "Where the syncs come from:", *sync_notes]
    if theirs:
        lines += ["", "Ratio (ours / taming, images/s, the same batch): " + "; ".join(
            f"{variant} batch {batch}: {ours[variant, batch] / theirs[batch]:.2f}x"
            for batch in scale.step_batches if batch in theirs for variant in variants if (variant, batch) in ours)]
    if taming_error:
        lines += ["", f"taming's step FAILED: {taming_error}"]
    return Section("\n".join(lines) + "\n", not taming_error)


def part_step_eager(scale: Scale) -> Section:
    return step_section(scale, ("eager", "eager_cl"), with_taming=True)


def part_step_compiled(scale: Scale) -> Section:
    """Compiled in place as train.compile does; taming has no compile option, so the ratio is to its eager step."""
    section = step_section(scale, ("compile_cl",), with_taming=False)
    note = ("Compare with taming's eager rows of the previous section (taming has no compile option). "
            + ("Dry run: dynamo with backend 'eager'." if scale.device == "cpu" else "Default backend (inductor)."))
    return Section(section.text + "\n" + note + "\n", section.ok)


# ---------------------------------------------------------------- 3. sampling: cached GPT against MaskGIT


def part_sampling(scale: Scale) -> Section:
    """benchmarks/sampling.py's models and timing: the cached GPT and MaskGIT at 8 / 12 steps, batch 1 and 16."""
    from sampling import GOAL_SPEEDUP, GOAL_STEPS, build_models, sampling_runs, time_sampling

    device = torch.device(scale.device)
    transformer, _, maskgit = build_models(scale.sampling, device)
    runs = sampling_runs(transformer, None, maskgit, list(scale.maskgit_steps))
    del runs["transformer, no cache"]
    tokens = scale.sampling.grid ** 2
    rows, seconds = [], {}
    for batch in scale.sampling_batches:
        for name, run in runs.items():
            secs, _ = time_sampling(run, batch, device)
            seconds[name, batch] = secs
            versus = seconds["transformer, KV cache", batch] / secs
            rows.append(f"| {name} | {batch} | {secs:.3f} | {batch / secs:.2f} | {batch * tokens / secs:.0f} | "
                        f"{versus:.1f}x |")
            print(rows[-1], flush=True)
    ratio = seconds["transformer, KV cache", 1] / seconds[f"maskgit, {GOAL_STEPS} steps", 1]
    lines = [
        f"{scale.sampling.grid}x{scale.sampling.grid} grids ({tokens} tokens), K={scale.sampling.num_codes}, "
        f"dim {scale.sampling.dim}, depth {scale.sampling.depth}, rope2d, random weights; GPT "
        f"{format_count(count_parameters(transformer))} params, MaskGIT {format_count(count_parameters(maskgit))}. "
        "One warm-up grid, then one timed batch (benchmarks/sampling.py). images/s: grids of tokens per second, "
        "decoding not included.", "",
        "| sampler | batch | seconds per batch | images/s | tokens/s | vs cached GPT |",
        "| --- | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        f"Goal: MaskGIT at {GOAL_STEPS} steps >= {GOAL_SPEEDUP:.0f}x the cached GPT's tokens/s at batch 1: "
        f"{ratio:.1f}x, {'met' if ratio >= GOAL_SPEEDUP else 'NOT met'}.",
    ]
    return Section("\n".join(lines) + "\n", True)


# ---------------------------------------------------------------- 4. tokenization throughput


def part_tokenization(scale: Scale) -> Section:
    """The encoder alone (fp32 and bf16 autocast, batches on the device) and tokenize_dataset end to end in both
    precisions (vqgan-tokenize's default fp32 and its --precision bf16)."""
    from data import CACHE
    from tokenization import jpeg_sources, measure_tokenization

    from vqgan.autoencoder import VQModel, preset
    from vqgan.data import DataConfig
    from vqgan.tokenizer import VQTokenizer

    device = torch.device(scale.device)
    torch.manual_seed(0)
    tokenizer = VQTokenizer.from_model(VQModel(preset(scale.tokenizer_preset)).eval()).to(device)
    size, batch = scale.tokenize_size, scale.tokenize_batch
    images = torch.rand(batch, 3, size, size, device=device)  # (B, 3, S, S) in [0, 1]
    rows, ids = [], {}
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        context = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                     enabled=False)
        with context:
            ids[name] = tokenizer.encode(images)  # warm-up (cuDNN autotuning, allocator)
            sync(device)
            start = time.perf_counter()
            for _ in range(scale.encoder_batches):
                tokenizer.encode(images)
            sync(device)
        rate = scale.encoder_batches * batch / (time.perf_counter() - start)
        rows.append(f"| encoder only, {name} | {scale.encoder_batches * batch} | {rate:.1f} |")
        print(rows[-1], flush=True)
    agree = float((ids["fp32"] == ids["bf16 autocast"]).float().mean())
    count, width, height = scale.jpegs
    folder, pattern = jpeg_sources(count, width, height, scale.loader_workers)
    common = dict(image_size=size, resize=size, random_crop=False, hflip=False, num_workers=scale.loader_workers)
    cases = {"folder (map-style)": DataConfig(source=str(folder), cache_dir=str(CACHE / "hf"), **common),
             "shards (wds:)": DataConfig(source=pattern, **common)}
    for precision in ("fp32", "bf16"):
        for name, n, secs in measure_tokenization(scale.tokenizer_preset, cases, batch, device, precision):
            rows.append(f"| tokenize_dataset {precision}, {name} | {n} | {n / secs:.1f} |")
    lines = [
        f"Tokenizer {scale.tokenizer_preset} (random weights), {size}px. Encoder only: `VQTokenizer.encode` of "
        f"batches of {batch} already on the device, {scale.encoder_batches} timed batches after one warm-up. "
        f"End to end: vqgan.prior.tokenize.tokenize_dataset (decode, resize, encode in fp32 or bf16 autocast, write "
        f"token shards) of {count} {width}x{height} JPEGs, {scale.loader_workers} loader workers, start-up included.",
        "", "| what | images | images/s |", "| --- | ---: | ---: |", *rows, "",
        f"Ids of the bf16 encoder equal to the fp32 encoder's on {agree:.1%} of the tokens (random weights).",
    ]
    return Section("\n".join(lines) + "\n", True)


# ---------------------------------------------------------------- training runs (usage, resume)


def small_recipe(scale: Scale, run_dir: Path, quantizer: dict, loss: dict, train: dict) -> dict:
    """The small f16 tokenizer on the embedded photos that the usage and resume parts train."""
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "imagenet256_f16", "autoencoder": dict(scale.small_model),
                  "quantizer": {"dim": scale.small_model["z_channels"], **quantizer}},
        "discriminator": {"base_channels": 32, "num_layers": 2},
        "loss": {"reconstruction_kind": "l1", "perceptual_weight": 0.0, **loss},
        "data": {"source": "embedded", "image_size": scale.train_size, "resize": scale.train_size * 3 // 2,
                 "embedded_repeats": 64, "num_eval_images": 2, "num_workers": scale.train_workers},
        "optim": {"lr": 4.0e-4, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
        "disc_optim": {"lr": 4.0e-4},
        "train": {"mixed_precision": scale.dtype, "tracker": "none", "progress_bar": False, "image_every": 10**6,
                  **train},
    }


# A trainer that SIGKILLs itself inside window $GPU_ACCEPTANCE_KILL_WINDOW (after its forwards and
# backwards, before its update): mid-run, after the checkpoint before it.
KILLER = """
import os, signal, sys
import vqgan.train as trainer
from vqgan.training import tokenizer_step

kill_window, seen = int(os.environ.get("GPU_ACCEPTANCE_KILL_WINDOW", "0")), [0]
original = tokenizer_step.reduce_window_flags

def reduce_or_die(*args, **kwargs):
    seen[0] += 1
    if seen[0] == kill_window:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

tokenizer_step.reduce_window_flags = reduce_or_die
trainer.main(sys.argv[1:])
"""


def start_training(recipe: dict, work: Path, name: str, kill_window: int = 0) -> subprocess.Popen:
    """`python -m vqgan.train` (or the killer above) on `recipe` in its own process; output to work/name.log."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    killer = work / "killer.py"
    killer.write_text(KILLER)
    command = [sys.executable, str(killer), str(path)] if kill_window else [sys.executable, "-m", "vqgan.train", str(path)]
    env = {**os.environ, "GPU_ACCEPTANCE_KILL_WINDOW": str(kill_window), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # the same process group as this part: gpu_acceptance.py's time limit kills the runs with it
    with open(work / f"{name}.log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, work: Path, name: str) -> tuple[int, str]:
    """Wait for a training process; -> (exit status, the end of its log)."""
    status = process.wait()
    return status, (work / f"{name}.log").read_text()[-2500:]


# ---------------------------------------------------------------- 5. codebook usage at K = 16384


USAGE_KINDS = {  # the settings README and benchmarks/results/quantizer_fidelity.md recommend per kind
    "vq, l2 8-dim codes": {"kind": "vq", "code_dim": 8, "l2_normalize": True},
    "simvq": {"kind": "simvq"},
    "ibq (entropy 0.05, T 0.01, restarts)": {"kind": "ibq", "entropy_weight": 0.05, "entropy_temperature": 0.01},
    "lfq (entropy 0.3, T 0.01)": {"kind": "lfq", "entropy_weight": 0.3, "entropy_temperature": 0.01},
}
USAGE_GOAL = {"simvq": 0.9, "ibq (entropy 0.05, T 0.01, restarts)": 0.9}  # issue 23: >= 90 % of K=16384


def part_codebook_usage(scale: Scale) -> Section:
    """vqgan.train per kind, all at once on the one GPU: codes used over the last 65,536 training tokens."""
    work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-usage-"))
    tokens = (scale.train_size // 16) ** 2
    processes = {}
    for name, quantizer in USAGE_KINDS.items():
        recipe = small_recipe(
            scale, work / f"run{len(processes)}", {"num_codes": scale.usage_codes, **quantizer},
            {"disc_start": 10**9},
            {"steps": scale.usage_steps, "batch_size": scale.usage_batch, "log_every": 50, "eval_every": 10**6,
             "checkpoint_every": 10**6, "keep_checkpoints": 1, "ema_decay": 0.0})
        processes[name] = (start_training(recipe, work, f"run{len(processes)}"), recipe)
    print(f"started {', '.join(processes)} side by side in {work}", flush=True)
    rows, ok, goals = [], True, []
    for index, (name, (process, recipe)) in enumerate(processes.items()):
        status, log = finish(process, work, f"run{index}")
        summary_path = Path(recipe["run_dir"]) / "summary.json"
        if status != 0 or not summary_path.is_file():
            ok = False
            rows.append(f"| {name} | FAILED (exit status {status}) | | | |")
            print(f"{name} failed:\n{log}", flush=True)
            continue
        summary = json.loads(summary_path.read_text())
        usage, metrics = summary["train"]["usage"], summary["metrics"]
        rows.append(f"| {name} | {usage:.1%} | {summary['train']['perplexity']:.0f} | {metrics['usage']:.1%} | "
                    f"{metrics['psnr']:.2f} |")
        if name in USAGE_GOAL:
            goals.append(f"{name}: {usage:.1%} {'>=' if usage >= USAGE_GOAL[name] else '<'} "
                         f"{USAGE_GOAL[name]:.0%} ({'met' if usage >= USAGE_GOAL[name] else 'NOT met'})")
        print(rows[-1], flush=True)
    window = 65536
    lines = [
        f"`python -m vqgan.train` per kind, run side by side: small f16 model "
        f"({json.dumps(scale.small_model)}), K={scale.usage_codes} (lfq 2^{int(math.log2(scale.usage_codes))}), "
        f"embedded photos, {scale.train_size}px crops ({tokens} tokens/image), batch {scale.usage_batch}, "
        f"{scale.usage_steps} steps ({scale.usage_steps * scale.usage_batch * tokens:,} tokens), L1 + quantizer loss "
        f"(no GAN, no LPIPS), Adam 4e-4 cosine, {scale.dtype} mixed precision. Train usage: the quantizer's "
        f"codes used by real assignments over the last {window:,} training tokens (`usage` of the final step, "
        "summary.json); held out: codes used on the held-out photos' crops.", "",
        "| kind | codes used, last 65,536 train tokens | batch perplexity | codes used, held out | held-out PSNR dB |",
        "| --- | ---: | ---: | ---: | ---: |", *rows, "",
        f"Goal (issue 23: >= 90 % of K=16384 for simvq and ibq; here K={scale.usage_codes}): "
        + ("; ".join(goals) or "not measured") + ".",
    ]
    return Section("\n".join(lines) + "\n", ok)


# ---------------------------------------------------------------- 6. exact resume under deterministic kernels


def compare_runs(a: Path, b: Path, step: int) -> tuple[int, int, float, str]:
    """Final checkpoint + exported tokenizer of two run folders; -> (tensors, tensors differing, max |a - b|, first)."""
    name = f"checkpoints/checkpoint-{step:07d}"
    files = sorted((a / name).rglob("*.safetensors")) + [a / "tokenizer" / "model.safetensors"]
    compared, differing, largest, first = 0, 0, 0.0, ""
    for path in files:
        x, y = load_file(path), load_file(b / path.relative_to(a))
        for key in x:
            compared += 1
            if not torch.equal(x[key], y[key]):
                differing += 1
                first = first or f"{path.relative_to(a)}:{key}"
                if x[key].is_floating_point():
                    largest = max(largest, float((x[key].double() - y[key].double()).abs().max()))
    for path in sorted((a / name).glob("*.bin")):  # optimizer and scheduler states, as tests/test_kill_resume.py
        compared += 1
        if str(torch.load(path, weights_only=True)) != str(torch.load(b / path.relative_to(a), weights_only=True)):
            differing += 1
            first = first or str(path.relative_to(a))
    state_a = json.loads((a / name / "train_state.json").read_text())
    state_b = json.loads((b / name / "train_state.json").read_text())
    if state_a != state_b:
        differing += 1
        first = first or "train_state.json"
    return compared, differing, largest, first


def part_resume(scale: Scale) -> Section:
    """train.deterministic=true: killed inside a window and resumed, against uninterrupted; two non-deterministic runs."""
    work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-resume-"))
    steps, every = scale.resume_steps, scale.resume_every

    def recipe(run: str, deterministic: bool) -> dict:
        return small_recipe(
            scale, work / run, {"num_codes": 1024},
            {"disc_start": every, "lecam_weight": 0.1},
            {"steps": steps, "batch_size": max(2, scale.usage_batch // 2), "grad_accum_steps": 2, "log_every": every,
             "eval_every": 2 * every, "checkpoint_every": every, "keep_checkpoints": 2, "ema_decay": 0.999,
             "deterministic": deterministic})

    runs = {"deterministic": (recipe("deterministic", True), 0),
            "deterministic, killed": (recipe("killed", True), scale.resume_kill_window),
            "non-deterministic A": (recipe("nondet_a", False), 0),
            "non-deterministic B": (recipe("nondet_b", False), 0)}
    started = {name: start_training(r, work, f"leg1-{i}", kill) for i, (name, (r, kill)) in enumerate(runs.items())}
    print(f"started {', '.join(started)} side by side in {work}", flush=True)
    failures = []
    for i, (name, process) in enumerate(started.items()):
        status, log = finish(process, work, f"leg1-{i}")
        expected = -signal.SIGKILL if runs[name][1] else 0
        if status != expected:
            failures.append(f"{name}: exit status {status}, expected {expected}\n{log}")
    killed_recipe = runs["deterministic, killed"][0]
    resumed_from = sorted(p.name for p in (Path(killed_recipe["run_dir"]) / "checkpoints").glob("checkpoint-*"))
    print(f"first runs done; resuming the killed run from {resumed_from[-1:] or 'nothing'}", flush=True)
    status, log = finish(start_training(killed_recipe, work, "leg2"), work, "leg2")  # train.resume=auto
    if status != 0:
        failures.append(f"resume: exit status {status}\n{log}")
    if failures:
        print("\n\n".join(failures), flush=True)
        return Section("Runs FAILED:\n\n```\n" + "\n\n".join(f[-1500:] for f in failures) + "\n```\n", False)
    exact = compare_runs(work / "deterministic", work / "killed", steps)
    drift = compare_runs(work / "nondet_a", work / "nondet_b", steps)
    rows = [
        f"| deterministic: uninterrupted vs killed in window {scale.resume_kill_window} and resumed from "
        f"{resumed_from[-1] if resumed_from else 'nothing'} | {exact[0]} | {exact[1]} | {exact[2]:.3g} | {exact[3]} |",
        f"| non-deterministic: two uninterrupted runs | {drift[0]} | {drift[1]} | {drift[2]:.3g} | {drift[3]} |",
    ]
    lines = [
        f"`python -m vqgan.train`, small f16 model at {scale.train_size}px, K=1024 vq (k-means init, restarts), "
        f"BatchNorm PatchGAN and LeCAM from step {every}, EMA 0.999, 2 micro-batches a step, {scale.dtype} mixed "
        f"precision, {steps} steps, a checkpoint every {every}, an evaluation every {2 * every}. The killed run "
        "SIGKILLs itself inside a window and resumes with train.resume=auto. Compared: every tensor of the final "
        "checkpoint's safetensors and of the exported tokenizer, the optimizer/scheduler states and train_state.json.",
        "", "| runs | tensors compared | differing | max abs difference | first difference |",
        "| --- | ---: | ---: | ---: | --- |", *rows, "",
        f"Bitwise exact resume with train.deterministic=true: {'yes' if exact[1] == 0 else 'NO'}.",
    ]
    return Section("\n".join(lines) + "\n", exact[1] == 0)


PARTS: dict[str, Callable[[Scale], Section]] = {
    "cuda-tests": part_cuda_tests,
    "step-eager": part_step_eager,
    "step-compiled": part_step_compiled,
    "sampling": part_sampling,
    "tokenization": part_tokenization,
    "codebook-usage": part_codebook_usage,
    "resume": part_resume,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--out", type=Path, required=True, help="JSON file: {'text': markdown, 'ok': bool}")
    parser.add_argument("--dry-run-cpu", action="store_true")
    args = parser.parse_args(argv)
    section = PARTS[args.part](DRY if args.dry_run_cpu else GPU)
    atomic_write_text(args.out, json.dumps(dataclasses.asdict(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
