"""Train a VQGAN tokenizer: `accelerate launch -m vqgan.train RECIPE.yaml [key=value ...]`.

One readable `main()`: config, models, optimizers, data, `prepare`, resume, loop. Each step runs the
generator (encoder + quantizer + decoder) update, then the discriminator update, inside
`accelerator.accumulate`, as Accelerate's own examples do.
"""

from __future__ import annotations

import dataclasses
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
from vqgan.checkpoint import resume, save_checkpoint, save_modules
from vqgan.config import ConfigError, apply_overrides, from_dict, read_recipe, to_dict
from vqgan.data import DataConfig, build_dataloader
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgan.ema import create_ema, update_ema
from vqgan.export import VQTokenizer, export_checkpoint
from vqgan.losses import LeCAM, LossConfig, discriminator_loss, expected_image, generator_loss
from vqgan.optim import OptimConfig, build_optimizer, build_scheduler
from vqgan.perceptual import LPIPS, MissingWeightsError
from vqgan.train_utils import (
    build_accelerator,
    count_anywhere,
    evaluate_reconstruction,
    log_image_grid,
    parse_recipe_args,
    start_run,
)
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
    compile: bool = False  # torch.compile the generator and discriminator (GPU)
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

    def __post_init__(self):
        categorical_output = self.model.autoencoder.output == "categorical"
        if categorical_output != (self.loss.reconstruction_kind == "categorical"):
            raise ValueError(
                f"model.autoencoder.output={self.model.autoencoder.output!r} needs "
                f"loss.reconstruction_kind={'categorical' if categorical_output else 'l1 or l2'!r}, "
                f"got {self.loss.reconstruction_kind!r}"
            )


def load_train_config(recipe: str | None, overrides: list[str]) -> TrainConfig:
    """Recipe YAML + overrides -> TrainConfig. `model.preset: NAME` starts the model from a preset."""
    data = apply_overrides(read_recipe(recipe), overrides)
    model = data.get("model", {})
    if isinstance(model, dict) and "preset" in model:
        rest = {k: v for k, v in model.items() if k != "preset"}
        base = to_dict(preset(model["preset"]))
        for section, values in rest.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        data["model"] = base
    return from_dict(TrainConfig, data)


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


def differentiable_images(model: VQModel, decoded: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] that gradients flow through: the pixels, or the expected value of categorical logits."""
    return decoded if model.config.autoencoder.output == "pixels" else expected_image(decoded)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_recipe_args(__doc__, argv)
    config = load_train_config(args.recipe, args.overrides)
    run_dir = Path(config.run_dir)
    loop = config.train
    accelerator = build_accelerator(run_dir, loop.mixed_precision, loop.grad_accum_steps, loop.tracker)
    if accelerator.mixed_precision == "fp16" and loop.grad_accum_steps > 1:
        # Accelerate shares one GradScaler between both optimizers and updates it after each step: the
        # discriminator's gradients accumulated before the generator's step would be unscaled with a
        # scale they were not scaled by. bf16 needs no scaler.
        raise ConfigError("fp16 with train.grad_accum_steps > 1 is not supported (one loss scaler, two "
                          "optimizers); use bf16, or grad_accum_steps=1")
    set_seed(config.seed)

    # --- models ---
    perceptual, config = build_perceptual(config, accelerator)
    model = VQModel(config.model)
    discriminator = PatchDiscriminator(config.discriminator)
    ema = create_ema(model) if loop.ema_decay > 0 else None
    lecam = LeCAM(config.loss.lecam_decay) if config.loss.lecam_weight > 0 else None
    if loop.channels_last:
        model, discriminator = model.to(memory_format=torch.channels_last), discriminator.to(memory_format=torch.channels_last)

    # --- optimizers, data ---
    opt_g = build_optimizer(model.parameters(), config.optim)
    opt_d = build_optimizer(discriminator.parameters(), config.disc_optim)
    sched_g = build_scheduler(opt_g, config.optim, loop.steps)
    # D's schedule counts its own steps, which start at loss.disc_start
    sched_d = build_scheduler(opt_d, config.disc_optim, max(1, loop.steps - config.loss.disc_start))
    train_loader = build_dataloader(config.data, "train", batch_size=loop.batch_size, shuffle=True, seed=config.seed)
    eval_loader = build_dataloader(config.data, "eval", batch_size=loop.batch_size, shuffle=False, seed=config.seed)

    model, discriminator, opt_g, opt_d, train_loader, sched_g, sched_d = accelerator.prepare(
        model, discriminator, opt_g, opt_d, train_loader, sched_g, sched_d
    )
    if loop.compile:
        model, discriminator = torch.compile(model), torch.compile(discriminator)
    raw_model = accelerator.unwrap_model(model)
    raw_disc = accelerator.unwrap_model(discriminator)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    if ema is not None:
        ema = ema.to(accelerator.device)
    if lecam is not None:
        lecam = lecam.to(accelerator.device)

    # --- resume ---
    state = {"step": 0, "batches_seen": 0, "images_seen": 0, "skipped_files": [], "nonfinite_steps": 0}
    checkpoint_root = run_dir / "checkpoints"
    extra_state = {"generator_ema.safetensors": ema, "lecam.safetensors": lecam}  # outside Accelerate's state
    resume(accelerator, loop.resume, checkpoint_root, state, extra_state)
    start_run(accelerator, config, run_dir, "vqgan")
    f = config.model.downsample_factor
    size = config.data.image_size
    effective_batch = loop.batch_size * accelerator.num_processes * loop.grad_accum_steps
    accelerator.print(
        f"generator {format_count(count_parameters(raw_model))} params, discriminator "
        f"{format_count(count_parameters(raw_disc))}; {size}px images -> {size // f}x{size // f} = "
        f"{(size // f) ** 2} tokens of K={config.model.quantizer.num_codes}; effective batch {effective_batch} "
        f"({accelerator.num_processes} processes x {loop.batch_size} x {loop.grad_accum_steps} accumulation); "
        f"mixed precision {accelerator.mixed_precision}; run dir {run_dir}"
    )

    def write_checkpoint_files(folder: Path) -> None:
        save_modules(folder, {"generator.safetensors": raw_model, **extra_state})
        (folder / "vqmodel_config.json").write_text(json.dumps(to_dict(config.model), indent=2))
        summary = {"step": state["step"], "data": config.data.source, "images_seen": state["images_seen"],
                   "metrics": state.get("eval", {})}
        (folder / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if loop.export_with_checkpoint:
            export_checkpoint(folder, folder / "tokenizer", use_ema=ema is not None)

    def merge_skipped_files() -> None:
        """Fold this window's unreadable files of every process into the run's list (all processes call it)."""
        state["skipped_files"] = sorted(set(state["skipped_files"]).union(gather_object(sorted(local_skipped))))
        local_skipped.clear()

    def checkpoint() -> Path:
        merge_skipped_files()
        return save_checkpoint(accelerator, checkpoint_root, dict(state), write_checkpoint_files, loop.keep_checkpoints)

    # --- loop ---
    progress = tqdm(total=loop.steps, initial=state["step"], disable=not (accelerator.is_main_process and loop.progress_bar),
                    desc="train")
    nonfinite_in_row = 0
    local_skipped: set[str] = set()  # unreadable files this process met since the last merge
    window_start, window_images = time.perf_counter(), 0
    logs: dict[str, float] = {}
    while state["step"] < loop.steps:
        epoch, offset = divmod(state["batches_seen"], len(train_loader))
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, offset) if offset else train_loader
        for batch in batches:
            images = batch["images"]
            if loop.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            state["batches_seen"] += 1
            local_skipped.update(batch["skipped"])
            if count_anywhere(images.shape[0] == 0, accelerator):
                continue  # every file of some process's batch was unreadable: all processes skip it together
            with accelerator.accumulate(model, discriminator), accelerator.autocast():
                # generator: reconstruction, codebook, perceptual and adversarial terms
                decoded, quant = model(images)
                recon = differentiable_images(raw_model, decoded)
                disc_on = state["step"] >= config.loss.disc_start
                raw_disc.requires_grad_(False)  # the generator's update must not touch D's gradients
                logits_fake = raw_disc(recon) if disc_on else None
                raw_disc.requires_grad_(True)
                g_total, g_logs = generator_loss(
                    config.loss, images, decoded, recon, quant.loss, logits_fake, raw_model.last_layer_weight,
                    state["step"], perceptual, loss_scale=accelerator.scaler.get_scale() if accelerator.scaler else 1.0,
                )
                if count_anywhere(not torch.isfinite(g_total.detach()).item(), accelerator):
                    # every rank skips together, or DDP would wait forever for the missing gradients
                    opt_g.zero_grad(set_to_none=True)
                    opt_d.zero_grad(set_to_none=True)  # its micro-batches so far must not meet the next window's
                    nonfinite_in_row += 1
                    state["nonfinite_steps"] += 1
                    accelerator.print(f"step {state['step']}: non-finite generator loss, step skipped "
                                      f"({nonfinite_in_row} in a row)")
                    if nonfinite_in_row >= loop.max_nonfinite_in_row:
                        raise RuntimeError(
                            f"{nonfinite_in_row} non-finite losses in a row at step {state['step']}: stopping. "
                            "Lower the learning rate, use bf16 instead of fp16, or check the data."
                        )
                    continue
                nonfinite_in_row = 0
                accelerator.backward(g_total)
                if accelerator.sync_gradients and config.optim.grad_clip > 0:
                    # unscale this optimizer's gradients only: accelerator.clip_grad_norm_ unscales every
                    # optimizer, and the fp16 scaler then forgets that D's were already unscaled
                    accelerator.unscale_gradients(optimizer=opt_g)
                    g_logs["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)

                # discriminator: real images against detached reconstructions
                if disc_on:
                    d_total, d_logs = discriminator_loss(config.loss, discriminator, images, recon.detach(), state["step"],
                                                          lecam=lecam)
                    accelerator.backward(d_total)
                    if accelerator.sync_gradients and config.disc_optim.grad_clip > 0:
                        accelerator.unscale_gradients(optimizer=opt_d)
                        d_logs["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(discriminator.parameters(),
                                                                               config.disc_optim.grad_clip)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    g_logs.update(d_logs)

            window_images += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # --- one optimizer step done ---
            sched_g.step()
            if disc_on:
                sched_d.step()
            if ema is not None:
                update_ema(ema, raw_model, loop.ema_decay)
            state["step"] += 1
            state["images_seen"] += effective_batch
            step = state["step"]
            progress.update(1)

            if step % loop.log_every == 0 or step == loop.steps:
                elapsed = time.perf_counter() - window_start
                merge_skipped_files()  # distinct files, however many epochs drew them
                logs = {k: float(v) for k, v in g_logs.items()}
                logs.update(perplexity=float(quant.perplexity), usage=float(quant.usage), lr=sched_g.get_last_lr()[0],
                            images_per_s=window_images / max(elapsed, 1e-9), skipped_files=len(state["skipped_files"]),
                            nonfinite_steps=state["nonfinite_steps"])
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
                progress.set_postfix(rec=f"{logs.get('rec', math.nan):.4f}", usage=f"{logs['usage']:.2f}",
                                     ppl=f"{logs['perplexity']:.0f}")
                window_start, window_images = time.perf_counter(), 0
            if accelerator.is_main_process and (step % loop.image_every == 0 or step == loop.steps):
                log_image_grid(accelerator, images, raw_model.to_images(decoded.detach()), run_dir / "images", step)
            if step % loop.eval_every == 0 or step == loop.steps:
                state["eval"] = evaluate_reconstruction(ema if ema is not None else raw_model, eval_loader, accelerator)
                accelerator.log({f"eval/{k}": v for k, v in state["eval"].items()}, step=step)
            if step % loop.checkpoint_every == 0 or step == loop.steps:
                checkpoint()
            if step >= loop.steps:
                break

    progress.close()
    final_model = ema if ema is not None else raw_model
    summary = {"step": state["step"], "data": config.data.source, "images_seen": state["images_seen"],
               "metrics": state.get("eval", {}), "train": logs, "skipped_files": len(state["skipped_files"]),
               "skipped_file_names": state["skipped_files"][:100],
               "nonfinite_steps": state["nonfinite_steps"], "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        VQTokenizer.from_model(final_model, train_summary=summary).save_pretrained(run_dir / "tokenizer")
        summary["tokenizer"] = str(run_dir / "tokenizer")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        held_out = summary["metrics"]
        held_out_tokens = held_out.get("num_images", 0) * (size // f) ** 2
        accelerator.print(
            "\n== done ==\n"
            f"steps {state['step']}; held-out PSNR {held_out.get('psnr', math.nan):.2f} dB on "
            f"{held_out.get('num_images', 0)} images\n"
            f"codebook K={config.model.quantizer.num_codes}: {logs.get('usage', math.nan):.1%} used over the last "
            f"{config.model.quantizer.usage_window} training tokens (batch perplexity {logs.get('perplexity', math.nan):.0f}), "
            f"{held_out.get('usage', math.nan):.1%} by the {held_out_tokens} held-out tokens\n"
            f"unreadable files skipped: {len(state['skipped_files'])} {state['skipped_files'][:5]}; "
            f"non-finite steps skipped: {state['nonfinite_steps']}\n"
            f"checkpoints: {checkpoint_root}\nreconstruction grids: {run_dir / 'images'}\n"
            f"tensorboard: tensorboard --logdir {run_dir}\nexported tokenizer: {run_dir / 'tokenizer'}"
        )
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
