"""The AR probe: a generation-side number for comparing tokenizers, from a fixed small GPT and a fixed budget.

GigaTok (Xiong et al. 2025, arXiv:2504.08736, sec. 3.1) trains one small AR model on each tokenizer's tokens
for a fixed budget and shows its gFID tracks the gFID of large priors; reconstruction numbers alone do not
(a tokenizer can reconstruct better and generate worse). The probe here composes the library: tokenize the
train split and train the standard probe transformer on it (vqgan.train_prior, which tokenizes its data),
tokenize the eval split (vqgan.prior.tokenize), measure held-out NLL in bits/token, sample, and score the
samples against the eval images with FID (vqgan-fid's sources, per-sample-batch seeds).

The probe's size and budget are fixed by PROBE_DEFAULTS so that figures from different tokenizers compare;
change them only to compare tokenizers with each other under a new fixed setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqgan.config import save_config, to_dict
from vqgan.data import DataConfig
from vqgan.prior.evaluate import nll_bits_per_token


@dataclass(frozen=True)
class ProbeConfig:
    """The standard probe: an unconditional GPT with 2-D RoPE, AdamW, cosine schedule, a fixed number of steps."""

    dim: int = 256
    depth: int = 6
    heads: int = 8
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 250
    num_samples: int = 1000  # for gFID (FID is biased upward at small counts: compare at one count only)
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "steps", "batch_size", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name} must be >= 1, got {getattr(self, name)}")


PROBE_DEFAULTS = ProbeConfig()


def probe_recipe(tokenizer_path: str, data: DataConfig, out_dir: Path, probe: ProbeConfig, num_codes: int,
                 grid: tuple[int, int]) -> dict[str, Any]:
    """The vqgan.train_prior recipe of the probe (written to OUT/probe_recipe.yaml, so a run can be repeated)."""
    return {
        "run_dir": str(out_dir / "prior_run"),
        "seed": probe.seed,
        "prior": "transformer",
        "transformer": {"num_codes": num_codes, "grid": list(grid), "dim": probe.dim, "depth": probe.depth,
                        "heads": probe.heads, "positions": "rope2d"},
        "tokens": {"path": str(out_dir / "tokens_train"), "tokenizer": tokenizer_path, "data": to_dict(data),
                   "split": "train"},
        "optim": {"lr": probe.lr, "betas": [0.9, 0.95], "weight_decay": 0.01, "warmup_steps": probe.warmup_steps,
                  "schedule": "cosine"},
        "train": {"steps": probe.steps, "batch_size": probe.batch_size, "log_every": max(1, probe.steps // 20),
                  "checkpoint_every": probe.steps, "keep_checkpoints": 1, "tracker": "none", "resume": ""},
        "sampling": {"num_samples": min(16, probe.num_samples), "batch_size": 16, "temperature": probe.temperature,
                     "top_k": probe.top_k, "seed": probe.seed},
    }


def write_reference_images(data: DataConfig, folder: Path, batch_size: int = 64) -> int:
    """The eval split's centre crops as PNGs (what the samples are compared with); returns how many."""
    from PIL import Image

    from vqgan.data import build_dataloader
    from vqgan.image_io import float_to_uint8
    from vqgan.utils import images_from_model_range

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for batch in build_dataloader(data, "eval", batch_size=batch_size, shuffle=False):
        pixels = float_to_uint8(images_from_model_range(batch["images"])).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        for image in pixels:
            Image.fromarray(image).save(folder / f"{count:06d}.png")
            count += 1
    if count == 0:
        raise ValueError("the eval split has no images: set data.num_eval_images or data.eval_split")
    return count


def run_probe(tokenizer_path: str, data: DataConfig, out_dir: str | Path, probe: ProbeConfig = PROBE_DEFAULTS,
              fid_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Tokenize, train the probe prior, score it: -> {"bits_per_token", "gfid", ...} (also OUT/probe.json)."""
    from accelerate import Accelerator, PartialState

    from vqgan import train_prior
    from vqgan.metrics import fid_run
    from vqgan.prior.data import TokenGrids
    from vqgan.prior.io import load_prior
    from vqgan.prior.tokenize import tokenize_dataset
    from vqgan.tokenizer import VQTokenizer
    from vqgan.utils import atomic_write_text

    out_dir = Path(out_dir)
    tokenizer = VQTokenizer.from_pretrained(tokenizer_path)  # fails before any work on a bad path
    grid = tokenizer.grid_shape(data.image_size, data.image_size)
    data = dataclasses.replace(data, random_crop=False, hflip=False)  # tokens of whole images
    recipe = probe_recipe(str(tokenizer_path), data, out_dir, probe, tokenizer.num_codes, grid)
    state = PartialState()
    recipe_path = out_dir / "probe_recipe.yaml"
    if state.is_main_process:
        from vqgan.config import from_dict
        from vqgan.train_prior import PriorTrainConfig

        for stale in ("tokens_train", "tokens_eval", "reference_eval"):  # a probe's own outputs, maybe of another tokenizer
            shutil.rmtree(out_dir / stale, ignore_errors=True)
        save_config(from_dict(PriorTrainConfig, recipe), recipe_path)
    state.wait_for_everyone()

    train_prior.main([str(recipe_path)])  # tokenizes the train split, trains for exactly probe.steps
    prior_dir = Path(recipe["run_dir"]) / "prior"

    eval_tokens = out_dir / "tokens_eval"
    tokenize_dataset(Accelerator(), tokenizer_path, data, eval_tokens, "eval", batch_size=64, seed=probe.seed)
    prior, _ = load_prior(prior_dir, device=str(state.device))
    tokens = torch.from_numpy(TokenGrids(eval_tokens).tokens_in_order())  # memory-mapped, no Python lists
    bits = nll_bits_per_token(prior, tokens)

    reference = out_dir / "reference_eval"
    if state.is_main_process:
        write_reference_images(data, reference)
    state.wait_for_everyone()
    result = {"tokenizer": str(tokenizer_path), "num_codes": tokenizer.num_codes, "grid": list(grid),
              "bits_per_token": bits, "bits_per_image": bits * grid[0] * grid[1],
              "uniform_bits_per_token": math.log2(tokenizer.num_codes), "eval_grids": len(tokens),
              "probe": dataclasses.asdict(probe), "gfid": None, "notes": []}
    try:
        scores = fid_run.run([str(reference), f"prior:{prior_dir}", "--num-samples", str(probe.num_samples),
                          "--seed", str(probe.seed), "--temperature", str(probe.temperature),
                          *(["--top-k", str(probe.top_k)] if probe.top_k else []), *fid_args])
        result["gfid"] = scores.get("fid")
        result["gfid_counts"] = [scores.get("count1"), scores.get("count2")]
    except FileNotFoundError as err:  # the InceptionV3 weights: NLL still stands on its own
        result["notes"].append("gFID skipped: " + " ".join(str(err).split()))
    if state.is_main_process:
        atomic_write_text(out_dir / "probe.json", json.dumps(result, indent=2))
        atomic_write_text(out_dir / "probe.md", probe_table(result))
    return result


def probe_table(result: dict[str, Any]) -> str:
    gfid = "n/a" if result["gfid"] is None else f"{result['gfid']:.3f}"
    lines = ["| tokenizer | K | grid | NLL (bits/token) | uniform (bits/token) | gFID |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {result['tokenizer']} | {result['num_codes']} | {result['grid'][0]}x{result['grid'][1]} | "
             f"{result['bits_per_token']:.4f} | {result['uniform_bits_per_token']:.2f} | {gfid} |"]
    probe = result["probe"]
    lines += ["", f"Probe: GPT dim {probe['dim']}, depth {probe['depth']}, {probe['steps']} steps of batch "
                  f"{probe['batch_size']}; gFID from {probe['num_samples']} samples against the eval split."]
    return "\n".join(lines + [f"- {n}" for n in result["notes"]]) + "\n"
