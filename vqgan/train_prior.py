"""Train a prior over token grids: `accelerate launch -m vqgan.train_prior RECIPE.yaml [key=value ...]`.

The same machinery as the tokenizer's loop (recipes, mixed precision, atomic checkpoints with exact
resume, EMA, trackers, progress bar). When the token dataset does not exist yet and the recipe names a
tokenizer and image data, the images are tokenized first. The run ends with a grid of samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from vqgan.checkpoint import resume, save_checkpoint, save_modules
from vqgan.config import ConfigError, load_config
from vqgan.data import DataConfig
from vqgan.ema import create_ema, update_ema
from vqgan.export import VQTokenizer
from vqgan.optim import OptimConfig, build_optimizer, build_scheduler
from vqgan.prior.data import check_token_dataset, load_token_dataset, token_dataset_tensors
from vqgan.prior.generate import generate_images, save_samples
from vqgan.prior.io import build_prior, save_prior
from vqgan.prior.pixelcnn import PixelCNNConfig
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.tokenize import tokenize_dataset
from vqgan.prior.transformer import TransformerConfig
from vqgan.train_utils import build_accelerator, count_anywhere, parse_recipe_args, start_run
from vqgan.utils import count_parameters, format_count


@dataclass(frozen=True)
class TokensConfig:
    path: str = ""  # token dataset folder (tools/tokenize_dataset.py writes one)
    tokenizer: str = ""  # tokenizer folder: tokenizes `data` when `path` is missing, and decodes the samples
    data: DataConfig = field(default_factory=DataConfig)  # images to tokenize when `path` does not exist yet
    split: str = "train"
    hflip_rows: bool = False  # also store the horizontally flipped image's tokens as extra rows
    batch_size: int = 32  # tokenization batch


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
    progress_bar: bool = True


@dataclass(frozen=True)
class PriorTrainConfig:
    run_dir: str = "runs/prior"
    seed: int = 0
    prior: Literal["transformer", "pixelcnn"] = "transformer"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=(0.9, 0.95)))
    train: PriorLoopConfig = field(default_factory=PriorLoopConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the samples drawn at the end
    sample_labels: tuple[int, ...] = ()  # class ids of the final samples (cycled); () = unconditional/random


def prior_config(config: PriorTrainConfig):
    return config.transformer if config.prior == "transformer" else config.pixelcnn


def prepare_tokens(config: PriorTrainConfig, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Load the token dataset, tokenizing the images first when it does not exist; check it fits the prior."""
    tokens_cfg = config.tokens
    if not tokens_cfg.path:
        raise ConfigError("tokens.path must name the token dataset folder (it is created when tokens.tokenizer is set)")
    if not Path(tokens_cfg.path).exists():
        if not tokens_cfg.tokenizer:
            raise FileNotFoundError(f"token dataset {tokens_cfg.path} does not exist; set tokens.tokenizer (and "
                                    "tokens.data) to create it, or run tools/tokenize_dataset.py")
        accelerator.print(f"tokenizing {tokens_cfg.data.source} [{tokens_cfg.split}] with {tokens_cfg.tokenizer}")
        tokenize_dataset(accelerator, tokens_cfg.tokenizer, tokens_cfg.data, tokens_cfg.path, tokens_cfg.split,
                         tokens_cfg.batch_size, tokens_cfg.hflip_rows, config.seed)
    dataset, metadata = load_token_dataset(tokens_cfg.path)
    model_cfg = prior_config(config)
    check_token_dataset(metadata, model_cfg.num_codes, model_cfg.grid)
    tokens, labels = token_dataset_tensors(dataset)
    if model_cfg.num_classes > 0:
        if labels is None:
            raise ValueError(f"{config.prior}.num_classes={model_cfg.num_classes} but {tokens_cfg.path} has no labels")
        if int(labels.max()) >= model_cfg.num_classes or int(labels.min()) < 0:
            raise ValueError(f"labels of {tokens_cfg.path} span [{int(labels.min())}, {int(labels.max())}], "
                             f"outside [0, {model_cfg.num_classes})")
    return tokens, labels, metadata


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_recipe_args(__doc__, argv)
    config = load_config(PriorTrainConfig, args.recipe, args.overrides)
    run_dir = Path(config.run_dir)
    loop = config.train
    accelerator = build_accelerator(run_dir, loop.mixed_precision, loop.grad_accum_steps, loop.tracker)
    set_seed(config.seed)

    tokens, labels, metadata = prepare_tokens(config, accelerator)
    model_cfg = prior_config(config)
    model = build_prior(config.prior, model_cfg)
    ema = create_ema(model) if loop.ema_decay > 0 else None
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, loop.steps)
    columns = (tokens,) if labels is None else (tokens, labels)
    loader = DataLoader(TensorDataset(*columns), batch_size=loop.batch_size, shuffle=True, drop_last=len(tokens) >= loop.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw_model = accelerator.unwrap_model(model)
    if ema is not None:
        ema = ema.to(accelerator.device)

    state = {"step": 0, "batches_seen": 0, "nonfinite_steps": 0}
    checkpoint_root = run_dir / "checkpoints"
    resume(accelerator, loop.resume, checkpoint_root, state, {"prior_ema.safetensors": ema})
    start_run(accelerator, config, run_dir, "prior")
    uniform_bits = math.log2(model_cfg.num_codes)
    accelerator.print(
        f"{config.prior} prior {format_count(count_parameters(raw_model))} params; {len(tokens)} grids of "
        f"{tuple(model_cfg.grid)} = {model_cfg.seq_len} tokens, K={model_cfg.num_codes} (uniform prior: "
        f"{uniform_bits:.2f} bits/token); effective batch {loop.batch_size * accelerator.num_processes * loop.grad_accum_steps}; "
        f"mixed precision {accelerator.mixed_precision}; run dir {run_dir}"
    )

    def write_checkpoint_files(folder: Path) -> None:
        save_prior(raw_model, folder / "prior", extra={"tokenizer_hash": metadata["tokenizer_hash"]})
        save_modules(folder, {"prior_ema.safetensors": ema})

    progress = tqdm(total=loop.steps, initial=state["step"], desc="prior",
                    disable=not (accelerator.is_main_process and loop.progress_bar))
    nonfinite_in_row, window_start, window_tokens = 0, time.perf_counter(), 0
    bits = math.nan
    while state["step"] < loop.steps:
        epoch, offset = divmod(state["batches_seen"], len(loader))
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, offset) if offset else loader:
            grids = batch[0]  # (B, h, w)
            batch_labels = batch[1] if labels is not None else None
            state["batches_seen"] += 1
            with accelerator.accumulate(model), accelerator.autocast():
                logits = model(grids, batch_labels)  # (B, K, h, w)
                loss = F.cross_entropy(logits.float(), grids)
                if count_anywhere(not torch.isfinite(loss.detach()).item(), accelerator):
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_row += 1
                    state["nonfinite_steps"] += 1
                    if nonfinite_in_row >= loop.max_nonfinite_in_row:
                        raise RuntimeError(f"{nonfinite_in_row} non-finite losses in a row at step {state['step']}: "
                                           "stopping. Lower the learning rate or use bf16 instead of fp16.")
                    continue
                nonfinite_in_row = 0
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_tokens += grids.numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                update_ema(ema, raw_model, loop.ema_decay)
            state["step"] += 1
            step = state["step"]
            progress.update(1)
            if step % loop.log_every == 0 or step == loop.steps:
                bits = float(accelerator.reduce(loss.detach(), reduction="mean")) / math.log(2)
                logs = {"bits_per_token": bits, "bits_per_image": bits * model_cfg.seq_len, "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / max(time.perf_counter() - window_start, 1e-9)}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
                progress.set_postfix(bits=f"{bits:.3f}")
                window_start, window_tokens = time.perf_counter(), 0
            if step % loop.checkpoint_every == 0 or step == loop.steps:
                save_checkpoint(accelerator, checkpoint_root, dict(state), write_checkpoint_files, loop.keep_checkpoints)
            if step >= loop.steps:
                break

    progress.close()
    final = ema if ema is not None else raw_model
    summary = {"step": state["step"], "bits_per_token": bits, "bits_per_image": bits * model_cfg.seq_len,
               "uniform_bits_per_token": uniform_bits, "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        prior_dir = save_prior(final, run_dir / "prior", extra={"tokenizer_hash": metadata["tokenizer_hash"],
                                                               "tokenizer": metadata.get("tokenizer", "")})
        summary["prior"] = str(prior_dir)
        tokenizer_path = config.tokens.tokenizer or metadata.get("tokenizer", "")
        if tokenizer_path and Path(tokenizer_path).exists():
            tokenizer = VQTokenizer.from_pretrained(tokenizer_path, device=accelerator.device)
            sample_labels = list(config.sample_labels) if config.sample_labels else None
            if sample_labels:
                sample_labels = [sample_labels[i % len(sample_labels)] for i in range(config.sampling.num_samples)]
            grids, images = generate_images(final, tokenizer, config.sampling, sample_labels)
            summary["samples"] = str(save_samples(images, grids, run_dir / "samples"))
        accelerator.print(
            "\n== done ==\n"
            f"steps {state['step']}, train NLL {bits:.3f} bits/token = {bits * model_cfg.seq_len:.0f} bits/image "
            f"(uniform prior: {uniform_bits:.2f} bits/token)\nprior: {summary['prior']}\n"
            f"samples: {summary.get('samples', 'none (no tokenizer to decode them)')}\n"
            f"tensorboard: tensorboard --logdir {run_dir}"
        )
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
