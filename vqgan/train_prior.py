"""Train a prior over token grids: `accelerate launch -m vqgan.train_prior RECIPE.yaml [key=value ...]`.

The same engine as the tokenizer's loop (vqgan.training: windows of micro-batches, the non-finite
policy, atomic checkpoints with exact resume, config drift, EMA with warm-up, trackers). When the token dataset does not exist yet and the recipe names a
tokenizer and image data, the images are tokenized first. The run ends with a grid of samples.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vqgan.config import ConfigError, load_config, to_dict
from vqgan.data import DataConfig
from vqgan.errors import DataError
from vqgan.optim import OptimConfig, apply_config_after_resume, build_optimizer, build_scheduler
from vqgan.prior.data import check_token_dataset, open_token_grids
from vqgan.prior.generate import generate_images, next_scale_inputs, save_samples
from vqgan.prior.io import build_prior, save_prior
from vqgan.prior.maskgit import MaskGITConfig, masked_token_loss, training_mask
from vqgan.prior.next_scale_input import NextScaleInput
from vqgan.prior.pixelcnn import PixelCNNConfig
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.tokenize import check_tokenizer_fits_prior, tokenize_dataset
from vqgan.prior.tokenizer_identity import (
    check_same_tokenizer,
    load_matching_tokenizer,
    resolve_tokenizer,
    tokenizer_record,
)
from vqgan.prior.transformer import TransformerConfig
from vqgan.prior.var import VARConfig, next_scale_loss
from vqgan.tokenizer import VQTokenizer
from vqgan.training.batches import resumable_batches, restore_position
from vqgan.training.checkpoint import resume, save_checkpoint, save_modules
from vqgan.training.ema import create_ema, ema_decay_at, update_ema
from vqgan.training.rng import seed_window
from vqgan.training.run import (
    build_accelerator,
    check_shared_filesystem,
    due,
    finished_summary,
    parse_recipe_args,
    start_run,
    use_deterministic_kernels,
)
from vqgan.training.state import TrainState
from vqgan.training.window import (
    Backward,
    Update,
    apply_updates,
    discard_window,
    gradient_sync,
    plain_backward,
    reduce_window_flags,
    settle_window,
)
from vqgan.utils import atomic_write_text, count_parameters, format_count


@dataclass(frozen=True)
class TokensConfig:
    path: str = ""  # token dataset folder (vqgan-tokenize writes one)
    tokenizer: str = ""  # tokenizer folder: tokenizes `data` when `path` is missing, and decodes the samples
    data: DataConfig = field(default_factory=DataConfig)  # images to tokenize when `path` does not exist yet
    split: str = "train"
    hflip_rows: bool = False  # also store the horizontally flipped image's tokens as extra rows
    batch_size: int = 32  # tokenization batch
    encode_precision: Literal["fp32", "bf16"] = "fp32"  # tokenization's encoder; recorded with the tokens
    # Train on (and decode the samples of) tokens another tokenizer made, with a warning instead of an error:
    # the tokens' tokenizer_hash names the tokenizer that made them (vqgan.prior.tokenizer_identity).
    allow_tokenizer_mismatch: bool = False


@dataclass(frozen=True)
class PriorLoopConfig:
    steps: int = 1000
    batch_size: int = 32  # per process
    grad_accum_steps: int = 1
    mixed_precision: Literal["launcher", "no", "bf16", "fp16"] = "launcher"
    ema_decay: float = 0.0  # EMA of the prior's weights; 0 = off
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str = "auto"
    max_nonfinite_in_row: int = 10
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    deterministic: bool = False  # GPU: deterministic kernels, for bitwise-exact resume there (slower)
    progress_bar: bool = True


@dataclass(frozen=True)
class PriorTrainConfig:
    run_dir: str = "runs/prior"
    seed: int = 0
    prior: Literal["transformer", "pixelcnn", "maskgit", "var"] = "transformer"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    maskgit: MaskGITConfig = field(default_factory=MaskGITConfig)
    var: VARConfig = field(default_factory=VARConfig)  # next-scale prior over a kind=msvq tokenizer's tokens
    tokens: TokensConfig = field(default_factory=TokensConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=(0.9, 0.95)))
    train: PriorLoopConfig = field(default_factory=PriorLoopConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the samples drawn at the end
    sample_labels: tuple[int, ...] = ()  # class ids of the final samples (cycled); () = every class in turn


def prior_config(config: PriorTrainConfig) -> TransformerConfig | PixelCNNConfig | MaskGITConfig | VARConfig:
    """The config section of the prior the recipe trains (`prior:` names it)."""
    return getattr(config, config.prior)


def prepare_tokens(config: PriorTrainConfig, accelerator: Accelerator) -> tuple[Dataset, torch.Tensor | None, dict]:
    """Open the token dataset (items (grid,) or (grid, label)), tokenizing the images first when it does not exist; check it fits the prior."""
    tokens_cfg = config.tokens
    if not tokens_cfg.path:
        raise ConfigError("tokens.path must name the token dataset folder (it is created when tokens.tokenizer is set)")
    if not Path(tokens_cfg.path).exists():
        if not tokens_cfg.tokenizer:
            raise FileNotFoundError(f"token dataset {tokens_cfg.path} does not exist; set tokens.tokenizer (and "
                                    "tokens.data) to create it, or run vqgan-tokenize")
        model_cfg = prior_config(config)
        # before anything is written: a mismatch found after tokenizing would leave a useless dataset behind
        check_tokenizer_fits_prior(tokens_cfg.tokenizer, tokens_cfg.data, model_cfg.num_codes, model_cfg.grid,
                                   model_cfg.num_classes, prior=config.prior, scales=prior_scales(config))
        accelerator.print(f"tokenizing {tokens_cfg.data.source} [{tokens_cfg.split}] with {tokens_cfg.tokenizer}")
        tokenize_dataset(accelerator, tokens_cfg.tokenizer, tokens_cfg.data, tokens_cfg.path, tokens_cfg.split,
                         tokens_cfg.batch_size, tokens_cfg.hflip_rows, config.seed,
                         precision=tokens_cfg.encode_precision)
    # memory-mapped when sharded (what tokenization writes): no int64 copy of the whole set per rank
    grids, labels, metadata = open_token_grids(tokens_cfg.path)
    model_cfg = prior_config(config)
    check_token_dataset(metadata, model_cfg.num_codes, model_cfg.grid, scales=prior_scales(config))
    if tokens_cfg.tokenizer:  # it decodes the samples: refuse before training, not after
        _, decoder = resolve_tokenizer(tokens_cfg.tokenizer)
        check_same_tokenizer(metadata, f"token dataset {tokens_cfg.path}", decoder,
                             allow_mismatch=tokens_cfg.allow_tokenizer_mismatch, override=MISMATCH_OVERRIDE)
    if model_cfg.num_classes > 0:
        if labels is None:
            raise DataError(f"{config.prior}.num_classes={model_cfg.num_classes} but {tokens_cfg.path} has no labels")
        if int(labels.max()) >= model_cfg.num_classes or int(labels.min()) < 0:
            raise DataError(f"labels of {tokens_cfg.path} span [{int(labels.min())}, {int(labels.max())}], "
                             f"outside [0, {model_cfg.num_classes})")
    return grids, labels, metadata


MISMATCH_OVERRIDE = "tokens.allow_tokenizer_mismatch=true"


def prior_scales(config: PriorTrainConfig) -> tuple[int, ...] | None:
    """The next-scale prior's scale pyramid; None for the one-grid priors."""
    return config.var.scales if config.prior == "var" else None


def sample_tokenizer(config: PriorTrainConfig, metadata: dict[str, Any],
                     device: torch.device) -> tuple[VQTokenizer | None, str]:
    """The tokenizer that decodes the final samples (tokens.tokenizer, else the one the tokens record) -> (it, "")
    or (None, why there are no samples): none named or reachable, or not the tokenizer that made the tokens
    (checked again here: the folder may have been rewritten while the prior trained)."""
    name = config.tokens.tokenizer or None
    if name is None and not metadata.get("tokenizer"):
        return None, "no tokenizer to decode them"
    try:
        return load_matching_tokenizer(name, metadata, f"token dataset {config.tokens.path}", device=device,
                                       allow_mismatch=config.tokens.allow_tokenizer_mismatch,
                                       override=MISMATCH_OVERRIDE), ""
    except ValueError as err:  # TokenizerMismatchError, or a recorded tokenizer that is gone (ExportError)
        return None, str(err)


# Keys that change what a checkpoint's weights mean: a resume that changes one is refused.
FROZEN_KEYS = ("prior", "transformer.", "pixelcnn.", "maskgit.", "var.")


def loss_figures(prior: str, bits: float, seq_len: int) -> dict[str, float]:
    """The training loss in bits, named for what it is: MaskGIT's is the cross-entropy of masked tokens
    given the rest, not a likelihood of the grid, so it gets no per-image figure."""
    if prior == "maskgit":
        return {"masked_ce_bits_per_token": bits}
    return {"bits_per_token": bits, "bits_per_image": bits * seq_len}


def loss_text(prior: str, bits: float, seq_len: int) -> str:
    if prior == "maskgit":
        return f"masked-token cross-entropy {bits:.3f} bits/token"
    return f"train NLL {bits:.3f} bits/token = {bits * seq_len:.0f} bits/image"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_recipe_args("vqgan-train-prior", __doc__, argv)
    config = load_config(PriorTrainConfig, args.recipe, args.overrides)
    run_dir = Path(config.run_dir)
    loop = config.train
    accelerator = build_accelerator(run_dir, loop.mixed_precision, loop.tracker)
    check_shared_filesystem(accelerator, run_dir)
    use_deterministic_kernels(loop.deterministic)
    set_seed(config.seed)  # the initial weights; each window then seeds itself (vqgan.training.rng)
    device = accelerator.device

    token_set, labels, metadata = prepare_tokens(config, accelerator)
    model_cfg = prior_config(config)
    model = build_prior(config.prior, model_cfg)
    scale_inputs = None  # the next-scale prior reads its input at each scale from the tokenizer's msvq quantizer
    if config.prior == "var":
        with torch.random.fork_rng(devices=[]):  # building the tokenizer draws init weights: leave the run's RNG be
            tokenizer, why = sample_tokenizer(config, metadata, device)
        if tokenizer is None:
            raise DataError(f"prior: var needs the tokenizer that made the tokens (its multi-scale quantizer gives "
                            f"the prior's inputs): {why}; set tokens.tokenizer")
        scale_inputs = next_scale_inputs(tokenizer, model_cfg.input_dim)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, loop.steps)
    loader = DataLoader(token_set, batch_size=loop.batch_size, shuffle=True, drop_last=len(token_set) >= loop.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw_model = accelerator.unwrap_model(model)
    ema = create_ema(raw_model) if loop.ema_decay > 0 else None
    raw_model.check_ids = False  # the token set and labels were range-checked when opened: no host sync per step

    state = TrainState()
    checkpoint_root = run_dir / "checkpoints"
    extra_state = {"prior_ema.safetensors": ema}
    if resume(accelerator, loop.resume, checkpoint_root, state, extra_state, to_dict(config), FROZEN_KEYS, run_dir,
              check_state=functools.partial(restore_position, accelerator, loader)):
        apply_config_after_resume(optimizer, scheduler, config.optim)  # a changed lr or decay is used, not ignored
    if (done := finished_summary(accelerator, state.step, loop.steps, run_dir)) is not None:
        accelerator.end_training()
        return done
    start_run(accelerator, config, run_dir, "prior")
    uniform_bits = math.log2(model_cfg.num_codes)
    layout = f"scales {list(model_cfg.scales)}" if config.prior == "var" else f"{tuple(model_cfg.grid)}"
    accelerator.print(
        f"{config.prior} prior {format_count(count_parameters(raw_model))} params; {len(token_set)} grids of "
        f"{layout} = {model_cfg.seq_len} tokens, K={model_cfg.num_codes} (uniform prior: "
        f"{uniform_bits:.2f} bits/token); effective batch {loop.batch_size * accelerator.num_processes * loop.grad_accum_steps}; "
        f"mixed precision {accelerator.mixed_precision}; run dir {run_dir}"
    )


    def write_checkpoint_files(folder: Path) -> None:
        save_prior(raw_model, folder / "prior", extra=tokenizer_record(metadata))
        save_modules(folder, extra_state)

    progress = tqdm(total=loop.steps, initial=state.step, desc="prior",
                    disable=not (accelerator.is_main_process and loop.progress_bar))
    batches = resumable_batches(accelerator, loader, state)
    scaler = accelerator.scaler
    window_start, window_tokens = time.perf_counter(), 0
    bits = math.nan
    while state.step < loop.steps:
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        for micro in range(loop.grad_accum_steps):
            batch = next(batches)
            seed_window(config.seed, state.batches_seen, accelerator.process_index)
            grids = batch[0]  # (B, h, w); (B, L) multi-scale sequences for var
            batch_labels = batch[1] if labels is not None else None
            window_tokens += grids.numel() * accelerator.num_processes
            with gradient_sync(accelerator, micro == loop.grad_accum_steps - 1, model), accelerator.autocast():
                loss = prior_step(model, grids, batch_labels, accelerator.backward, loop.grad_accum_steps,
                                  masking=model_cfg if config.prior == "maskgit" else None,
                                  scale_inputs=scale_inputs)
            nonfinite |= ~torch.isfinite(loss)
        flags = reduce_window_flags(accelerator, nonfinite)  # the window's one host sync
        if not settle_window(state, flags, loop.max_nonfinite_in_row, accelerator.print):
            discard_window([optimizer], scaler)  # the prior keeps no buffers a forward changes
            continue
        grad_norm, = apply_updates([Update(optimizer, list(raw_model.parameters()), config.optim.grad_clip)], scaler)
        scheduler.step()
        if ema is not None:
            update_ema(ema, raw_model, ema_decay_at(state.step, loop.ema_decay))
        state.step += 1
        step = state.step
        progress.update(1)
        if due(step, loop.log_every, loop.steps):
            bits = float(accelerator.reduce(loss, reduction="mean")) / math.log(2)
            logs = {**loss_figures(config.prior, bits, model_cfg.seq_len), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / max(time.perf_counter() - window_start, 1e-9)}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            progress.set_postfix(bits=f"{bits:.3f}")
            window_start, window_tokens = time.perf_counter(), 0
        if due(step, loop.checkpoint_every, loop.steps):
            save_checkpoint(accelerator, checkpoint_root, state, to_dict(config), write_checkpoint_files,
                            loop.keep_checkpoints)

    progress.close()
    final = ema if ema is not None else raw_model
    summary = {"step": state.step, **loss_figures(config.prior, bits, model_cfg.seq_len), "uniform_bits_per_token": uniform_bits, "nonfinite_steps": state.nonfinite_steps,
               "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        prior_dir = save_prior(final, run_dir / "prior", extra=tokenizer_record(metadata))
        summary["prior"] = str(prior_dir)
        tokenizer, no_samples = sample_tokenizer(config, metadata, accelerator.device)
        if tokenizer is None:
            summary["samples_skipped"] = no_samples
            accelerator.print(f"no samples: {no_samples}")
        else:
            sample_labels = list(config.sample_labels) or list(range(model_cfg.num_classes)) or None  # every class
            if sample_labels:
                sample_labels = [sample_labels[i % len(sample_labels)] for i in range(config.sampling.num_samples)]
            grids, images = generate_images(final, tokenizer, config.sampling, sample_labels)
            summary["samples"] = str(save_samples(images, grids, run_dir / "samples"))
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        accelerator.print(
            "\n== done ==\n"
            f"steps {state.step}, {loss_text(config.prior, bits, model_cfg.seq_len)} (uniform prior: {uniform_bits:.2f} bits/token)\n"
            f"prior: {summary['prior']}\n"
            f"samples: {summary.get('samples', 'none (' + summary.get('samples_skipped', '') + ')')}\n"
            f"tensorboard: tensorboard --logdir {run_dir}"
        )
    accelerator.end_training()
    return summary


def prior_step(model: nn.Module, grids: torch.Tensor, labels: torch.Tensor | None,
               backward: Backward = plain_backward, accum_steps: int = 1,
               masking: MaskGITConfig | None = None, scale_inputs: NextScaleInput | None = None) -> torch.Tensor:
    """The training loss of (B, h, w) grids (nats/token); backward. -> the detached loss.

    Autoregressive priors: next-token cross-entropy. With `masking` (the MaskGIT prior's config): mask
    positions by its schedule and take the cross-entropy on the masked ones (not an NLL of the grid).
    With `scale_inputs` (the next-scale prior's, from its tokenizer): grids are (B, L) multi-scale
    sequences and the loss is VAR's cross-entropy over all L positions, each scale given the earlier ones.
    """
    if scale_inputs is not None:
        loss = next_scale_loss(model, scale_inputs, grids, labels)
    elif masking is None:
        logits = model(grids, labels)  # (B, K, h, w)
        loss = F.cross_entropy(logits.float(), grids)
    else:
        mask = training_mask(tuple(grids.shape), masking.mask_schedule, grids.device)  # (B, h, w)
        logits = model(grids, labels, mask)
        loss = masked_token_loss(logits, grids, mask, masking.label_smoothing)
    backward(loss / accum_steps)
    return loss.detach()


if __name__ == "__main__":
    # the same command as vqgan-train-prior (one-line user errors, --debug for the traceback), without importing vqgan.cli
    from vqgan.errors import run_training

    raise SystemExit(run_training(main))
