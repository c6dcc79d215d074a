"""Train a VQGAN tokenizer: `accelerate launch -m vqgan.train RECIPE.yaml [key=value ...]`.

One readable `main()`: config, models, optimizers, data, `prepare`, resume, loop. Each optimizer
step is a window of `train.grad_accum_steps` micro-batches; each micro-batch runs the generator step
(encoder + quantizer + decoder) and then the discriminator step (vqgan.training.gan_step), and the
window ends with one decision (keep or discard) and one update of both optimizers
(vqgan.training.window).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from vqgan.autoencoder import VQModel, VQModelConfig, preset
from vqgan.config import apply_overrides, from_dict, plain_value, read_recipe, to_dict
from vqgan.data import DataConfig, build_dataloader
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgan.export import export_checkpoint
from vqgan.losses import LeCAM, LossConfig
from vqgan.optim import OptimConfig, apply_config_after_resume, build_optimizer, build_scheduler
from vqgan.perceptual import LPIPS, MissingWeightsError
from vqgan.tokenizer import VQTokenizer
from vqgan.train_utils import evaluate_reconstruction, log_image_grid
from vqgan.training.batches import record_stream_position, resumable_batches, restore_position
from vqgan.training.checkpoint import resume, save_checkpoint, save_modules
from vqgan.training.ema import create_ema
from vqgan.training.init_from import check_architecture, load_initial_weights, merge_model_section
from vqgan.training.run import (
    build_accelerator,
    check_shared_filesystem,
    compile_in_place,
    due,
    finished_summary,
    parse_recipe_args,
    start_run,
    use_deterministic_kernels,
)
from vqgan.training.state import TrainState
from vqgan.training.tokenizer_step import TokenizerStep
from vqgan.utils import atomic_write_text, count_parameters, format_count


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process; effective batch = batch_size x processes x grad_accum_steps
    grad_accum_steps: int = 1
    mixed_precision: Literal["launcher", "no", "bf16", "fp16"] = "launcher"  # "launcher": accelerate's flag
    ema_decay: float = 0.999  # EMA of the generator weights; 0 = off
    log_every: int = 10
    image_every: int = 200  # PNG grid of inputs beside reconstructions
    eval_every: int = 500  # held-out PSNR and codebook usage
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    export_with_checkpoint: bool = True  # write an exported tokenizer folder inside each checkpoint
    resume: str = "auto"  # "auto": newest complete checkpoint of run_dir; "": fresh; or a checkpoint path
    max_nonfinite_in_row: int = 10  # stop after this many skipped steps in a row
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    progress_bar: bool = True
    channels_last: bool = False
    deterministic: bool = False  # GPU: deterministic kernels, for bitwise-exact resume there (slower)
    compile: bool = False  # torch.compile the generator and discriminator in place (nn.Module.compile)
    lpips_weights: str = ""  # path to torchvision's vgg16-397923af.pth; "" = look in the torch hub cache
    require_lpips: bool = False  # True: missing LPIPS weights is an error; False: train without the term


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/vqgan"
    seed: int = 0
    model: VQModelConfig = field(default_factory=VQModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    notes: tuple[str, ...] = ()  # what the run changed on its own (e.g. LPIPS off for want of weights)
    # `model.init_from: PATH_OR_REPO` in a recipe: the tokenizer folder (or Hub id) whose config is the base of
    # `model` and whose weights start the generator (vqgan/training/init_from.py)
    init_from: str = ""

    def __post_init__(self):
        if self.train.compile and self.loss.r1_weight > 0:
            # R1 differentiates D's input gradient (create_graph=True); AOTAutograd has no double backward
            raise ValueError("train.compile=true cannot be used with loss.r1_weight > 0 (torch.compile does not "
                             "support the double backward R1 needs): set one of them off")
        categorical_output = self.model.autoencoder.output == "categorical"
        if categorical_output != (self.loss.reconstruction_kind == "categorical"):
            raise ValueError(
                f"model.autoencoder.output={self.model.autoencoder.output!r} needs "
                f"loss.reconstruction_kind={'categorical' if categorical_output else 'l1 or l2'!r}, "
                f"got {self.loss.reconstruction_kind!r}"
            )


def load_train_config(recipe: str | None, overrides: list[str]) -> TrainConfig:
    """Recipe YAML + overrides -> TrainConfig. `model.preset: NAME` starts the model from a preset,
    `model.init_from: PATH_OR_REPO` from a tokenizer folder's config and weights."""
    data = apply_overrides(read_recipe(recipe), overrides)
    model = data.get("model", {})
    init_from = plain_value(model.pop("init_from", "")) if isinstance(model, dict) else ""
    if isinstance(model, dict) and "preset" in model:
        rest = {k: v for k, v in model.items() if k != "preset"}
        base = to_dict(preset(plain_value(model["preset"])))
        for section, values in rest.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        data["model"] = base
    if init_from:
        data["model"] = merge_model_section(data.get("model", {}), init_from)
        data["init_from"] = init_from
    config = from_dict(TrainConfig, data)
    if config.init_from:
        check_architecture(config.model, config.init_from)
    return config


def build_perceptual(config: TrainConfig, accelerator: Accelerator) -> tuple[LPIPS | None, TrainConfig]:
    """LPIPS when its weights are present; otherwise say so once and drop the term (or fail if required)."""
    if config.loss.perceptual_weight == 0:
        return None, config
    try:
        return LPIPS(weights_path=config.train.lpips_weights or None), config
    except MissingWeightsError as err:
        if config.train.require_lpips:
            raise
        accelerator.print(f"NOTE: LPIPS weights are not available, training without the perceptual term.\n{err}")
        note = "perceptual term off: LPIPS VGG weights not found (set train.lpips_weights to enable)"
        loss = dataclasses.replace(config.loss, perceptual_weight=0.0)
        return None, dataclasses.replace(config, loss=loss, notes=config.notes + (note,))


# Keys that change what a checkpoint's weights mean: a resume that changes one is refused.
FROZEN_KEYS = ("model.", "discriminator.", "data.image_size")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_recipe_args("vqgan-train", __doc__, argv)
    config = load_train_config(args.recipe, args.overrides)
    run_dir = Path(config.run_dir)
    loop = config.train
    accelerator = build_accelerator(run_dir, loop.mixed_precision, loop.tracker)
    check_shared_filesystem(accelerator, run_dir)
    use_deterministic_kernels(loop.deterministic)
    set_seed(config.seed)  # the initial weights; each window then seeds itself (vqgan.training.rng)
    device = accelerator.device

    # --- models ---
    perceptual, config = build_perceptual(config, accelerator)
    model = VQModel(config.model)
    model.check_finite = False  # a NaN input shows up as a non-finite loss, which the window policy handles
    discriminator = PatchDiscriminator(config.discriminator)
    if config.init_from:  # before prepare: the EMA copy and every rank start from these weights
        accelerator.print(load_initial_weights(model, discriminator, config.model, config.discriminator,
                                               config.init_from))
    lecam = LeCAM(config.loss.lecam_decay) if config.loss.lecam_weight > 0 else None
    if loop.channels_last:
        model, discriminator = model.to(memory_format=torch.channels_last), discriminator.to(memory_format=torch.channels_last)

    # --- optimizers, data ---
    opt_g = build_optimizer(model, config.optim)
    opt_d = build_optimizer(discriminator, config.disc_optim)
    sched_g = build_scheduler(opt_g, config.optim, loop.steps)
    # D's schedule counts its own steps, which start at loss.disc_start
    sched_d = build_scheduler(opt_d, config.disc_optim, max(1, loop.steps - config.loss.disc_start))
    train_loader = build_dataloader(config.data, "train", batch_size=loop.batch_size, shuffle=True, seed=config.seed)
    eval_loader = build_dataloader(config.data, "eval", batch_size=loop.batch_size, shuffle=False, seed=config.seed)

    model, discriminator, opt_g, opt_d, train_loader, sched_g, sched_d = accelerator.prepare(
        model, discriminator, opt_g, opt_d, train_loader, sched_g, sched_d
    )
    raw_model, raw_disc = accelerator.unwrap_model(model), accelerator.unwrap_model(discriminator)
    ema = create_ema(raw_model) if loop.ema_decay > 0 else None
    if loop.compile:
        compile_in_place(raw_model, raw_disc)
    perceptual = perceptual.to(device) if perceptual is not None else None
    lecam = lecam.to(device) if lecam is not None else None

    # --- resume ---
    state = TrainState()
    checkpoint_root = run_dir / "checkpoints"
    extra_state = {"generator_ema.safetensors": ema, "lecam.safetensors": lecam}  # outside Accelerate's state
    if resume(accelerator, loop.resume, checkpoint_root, state, extra_state, to_dict(config), FROZEN_KEYS, run_dir,
              check_state=functools.partial(restore_position, accelerator, train_loader)):
        apply_config_after_resume(opt_g, sched_g, config.optim)  # a changed lr or decay is used, not ignored
        apply_config_after_resume(opt_d, sched_d, config.disc_optim)
    if (done := finished_summary(accelerator, state.step, loop.steps, run_dir)) is not None:
        accelerator.end_training()
        return done
    start_run(accelerator, config, run_dir, "vqgan")
    f = config.model.downsample_factor
    size = config.data.image_size
    effective_batch = loop.batch_size * accelerator.num_processes * loop.grad_accum_steps
    accelerator.print(
        f"generator {format_count(count_parameters(raw_model))} params, discriminator "
        f"{format_count(count_parameters(raw_disc))}; {size}px images -> "
        f"{config.model.quantizer.token_layout(size // f)} of K={config.model.quantizer.num_codes}; "
        f"effective batch {effective_batch} "
        f"({accelerator.num_processes} processes x {loop.batch_size} x {loop.grad_accum_steps} accumulation); "
        f"mixed precision {accelerator.mixed_precision}; run dir {run_dir}"
    )


    local_skipped: set[str] = set()  # unreadable files this process met since the last merge
    train_step = TokenizerStep(accelerator, model, discriminator, perceptual, lecam, opt_g, opt_d, sched_g, sched_d,
                               ema, config.loss, config.optim.grad_clip, config.disc_optim.grad_clip, loop.ema_decay,
                               loop.grad_accum_steps, config.seed, loop.max_nonfinite_in_row,
                               adaptive_fallback=state.adaptive_weight)

    def merge_skipped_files() -> None:
        """Fold this window's unreadable files of every process into the run's list (all processes call it)."""
        state.skipped_files = sorted(set(state.skipped_files).union(gather_object(sorted(local_skipped))))
        local_skipped.clear()

    def write_checkpoint_files(folder: Path) -> None:
        save_modules(folder, {"generator.safetensors": raw_model, **extra_state})
        (folder / "vqmodel_config.json").write_text(json.dumps(to_dict(config.model), indent=2))
        summary = {"step": state.step, "data": config.data.source, "images_seen": state.images_seen,
                   "metrics": state.eval}
        (folder / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if loop.export_with_checkpoint:
            export_checkpoint(folder, folder / "tokenizer", use_ema=ema is not None)

    def checkpoint() -> Path:
        merge_skipped_files()
        record_stream_position(accelerator, train_loader, state)  # a streamed source restarts there on resume
        state.adaptive_weight = float(train_step.adaptive_fallback)
        return save_checkpoint(accelerator, checkpoint_root, state, to_dict(config), write_checkpoint_files,
                               loop.keep_checkpoints)

    # --- loop: one optimizer step per window of grad_accum_steps micro-batches ---
    progress = tqdm(total=loop.steps, initial=state.step, disable=not (accelerator.is_main_process and loop.progress_bar),
                    desc="train")
    batches = resumable_batches(accelerator, train_loader, state)
    window_start, window_images = time.perf_counter(), 0
    logs: dict[str, float] = {}

    def draw() -> tuple[torch.Tensor, bool]:
        """The next micro-batch: (images (B, 3, S, S) in [-1, 1], whether they stand in for an empty batch)."""
        nonlocal window_images
        batch = next(batches)
        local_skipped.update(batch["skipped"])
        images, empty = batch["images"], False
        if images.shape[0] == 0:
            # every file of this batch was unreadable: a stand-in keeps the processes in step, and
            # the window is discarded everywhere (the window's flags)
            images, empty = torch.zeros(1, 3, size, size, device=device), True
        if loop.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        window_images += images.shape[0] * accelerator.num_processes
        return images, empty

    while state.step < loop.steps:
        result = train_step(state, draw)  # a window of micro-batches and one optimizer step (or a discarded window)
        if result is None:
            continue
        state.step += 1
        state.images_seen += effective_batch
        step = state.step
        progress.update(1)

        if due(step, loop.log_every, loop.steps):
            elapsed = time.perf_counter() - window_start
            merge_skipped_files()  # distinct files, however many epochs drew them
            logs = {k: float(v) for k, v in result.logs.items()}
            for name, norm in zip(("grad_norm_g", "grad_norm_d"), result.grad_norms):
                if norm is not None:
                    logs[name] = float(norm)
            quant = result.gen.quant
            logs.update(perplexity=float(quant.perplexity), usage=float(quant.usage), lr=sched_g.get_last_lr()[0],
                        images_per_s=window_images / max(elapsed, 1e-9), skipped_files=len(state.skipped_files),
                        nonfinite_steps=state.nonfinite_steps, empty_batches=state.empty_batches,
                        overflow_steps=state.overflow_steps)
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            progress.set_postfix(rec=f"{logs.get('rec', math.nan):.4f}", usage=f"{logs['usage']:.2f}",
                                 ppl=f"{logs['perplexity']:.0f}")
            window_start, window_images = time.perf_counter(), 0
        if accelerator.is_main_process and due(step, loop.image_every, loop.steps):
            reconstructions = raw_model.to_images(result.gen.decoded)
            log_image_grid(accelerator, result.images, reconstructions, run_dir / "images", step)
        if due(step, loop.eval_every, loop.steps):
            state.eval = evaluate_reconstruction(ema if ema is not None else raw_model, eval_loader, accelerator)
            accelerator.log({f"eval/{k}": v for k, v in state.eval.items()}, step=step)
        if due(step, loop.checkpoint_every, loop.steps):
            checkpoint()

    progress.close()
    final_model = ema if ema is not None else raw_model
    summary = {"step": state.step, "data": config.data.source, "images_seen": state.images_seen,
               "metrics": state.eval, "train": logs, "skipped_files": len(state.skipped_files),
               "skipped_file_names": state.skipped_files[:100], "nonfinite_steps": state.nonfinite_steps,
               "empty_batches": state.empty_batches, "overflow_steps": state.overflow_steps, "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        VQTokenizer.from_model(final_model, train_summary=summary).save_pretrained(run_dir / "tokenizer")
        summary["tokenizer"] = str(run_dir / "tokenizer")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        held_out = summary["metrics"]
        held_out_tokens = held_out.get("num_images", 0) * config.model.quantizer.tokens_per_image(size // f)
        accelerator.print(
            "\n== done ==\n"
            f"steps {state.step}; held-out PSNR {held_out.get('psnr', math.nan):.2f} dB on "
            f"{held_out.get('num_images', 0)} images\n"
            f"codebook K={config.model.quantizer.num_codes}: {logs.get('usage', math.nan):.1%} used over the last "
            f"{config.model.quantizer.usage_window} training tokens (batch perplexity {logs.get('perplexity', math.nan):.0f}), "
            f"{held_out.get('usage', math.nan):.1%} by the {held_out_tokens} held-out tokens\n"
            f"unreadable files skipped: {len(state.skipped_files)} {state.skipped_files[:5]}; "
            f"non-finite steps skipped: {state.nonfinite_steps}; windows without data: {state.empty_batches}\n"
            f"checkpoints: {checkpoint_root}\nreconstruction grids: {run_dir / 'images'}\n"
            f"tensorboard: tensorboard --logdir {run_dir}\nexported tokenizer: {run_dir / 'tokenizer'}"
        )
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    # the same command as vqgan-train (one-line user errors, --debug for the traceback), without importing vqgan.cli
    from vqgan.errors import run_training

    raise SystemExit(run_training(main))
