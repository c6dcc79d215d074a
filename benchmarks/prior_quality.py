"""Quality of the three prior families side by side on the same quickstart-sized tokens.

    .venv/bin/python benchmarks/prior_quality.py                       # runs/quickstart/tokens (recipes/quickstart.yaml)
    .venv/bin/python benchmarks/prior_quality.py --make-tokens         # no quickstart run: see below
    .venv/bin/python benchmarks/prior_quality.py --quick               # tiny settings: checks the script, writes nothing

Each family trains through the real trainer (vqgan.train_prior) with its quickstart recipe
(prior_quickstart.yaml, prior_quickstart_maskgit.yaml; the PixelCNN at a similar parameter count), then
samples --num-samples grids with the recipe's sampling defaults but no top-k (the distribution itself).
Reported per family: the token-statistics distance (vqgan.prior.evaluate: total variation of code
frequencies and of right / down neighbour-pair frequencies) between the samples and the training tokens,
beside its noise floor (the same distance for a random subset of the training tokens of the same size);
the NLL where the family defines one (not MaskGIT); and gFID only when the Inception weights are present.
--make-tokens, when the token folder is missing, tokenizes the quickstart images with the tokenizer at
--tokenizer or, when that is missing too, with a seeded untrained tiny tokenizer (stated in the report):
its codes still carry the photos' spatial structure, which is what the priors must learn.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from common import describe_machine
from vqgan.prior.data import load_token_dataset, token_dataset_tensors
from vqgan.prior.evaluate import nll_bits_per_token, token_statistics_distance
from vqgan.prior.io import load_prior
from vqgan.prior.sampling import SamplingConfig, sample_prior
from vqgan.utils import atomic_write_text, count_parameters, format_count

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "transformer": ("recipes/prior_quickstart.yaml", []),
    "maskgit": ("recipes/prior_quickstart_maskgit.yaml", []),
    # hidden 64 x 5 layers: 0.88M parameters, like the two transformers' 0.86M
    "pixelcnn": ("recipes/prior_quickstart.yaml", ["prior=pixelcnn", "pixelcnn.num_codes=256", "pixelcnn.grid=[8,8]",
                                                    "pixelcnn.hidden=64", "pixelcnn.num_layers=5"]),
}
RANDOM_ORDER = {"choice_temperature": 1e4}
NOTE = (
    "MaskGIT's default decoding keeps its most confident draws (choice temperature 4.5, annealed to 0), which"
    ' is mode-seeking: its samples over-use the likely codes, so its frequency distances sit above the '
    "autoregressive priors' and its code distribution is more peaked; decoding in random order (a huge choice"
    ' temperature) shows what the network itself learned. Image fidelity (gFID) is what the confident '
    'ordering is tuned for (Chang et al. 2022), and needs the Inception weights. Seconds are wall time on a '
    'shared machine: indicative only; benchmarks/sampling.py measures speed.'
)
QUICK_MODEL = {
    "transformer": ["transformer.dim=32", "transformer.depth=1", "transformer.heads=2"],
    "maskgit": ["maskgit.dim=32", "maskgit.depth=1", "maskgit.heads=2"],
    "pixelcnn": ["pixelcnn.hidden=16", "pixelcnn.num_layers=2"],
}


def make_tokens(path: Path, tokenizer: Path, work: Path, repeats: int) -> str:
    """Tokenize the quickstart images into `path`; -> a description of the tokenizer used."""
    from accelerate import Accelerator

    from vqgan.autoencoder import VQModel, preset
    from vqgan.data import DataConfig
    from vqgan.tokenizer import VQTokenizer
    from vqgan.prior.tokenize import tokenize_dataset

    described = f"the quickstart tokenizer {tokenizer}"
    if not tokenizer.exists():
        torch.manual_seed(0)
        tokenizer = work / "untrained_tokenizer"
        VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(tokenizer)
        described = "a seeded (seed 0) UNTRAINED tiny tokenizer (no quickstart run was available), K=256"
    data = DataConfig(source="embedded", image_size=32, resize=96, random_crop=True, hflip=True, embedded_repeats=repeats)
    tokenize_dataset(Accelerator(cpu=True), str(tokenizer), data, str(path), "train", 32, True, 0)
    return described


def train_family(family: str, tokens_path: Path, run_dir: Path, steps: int, quick: bool) -> tuple[Path, float]:
    from vqgan.train_prior import main

    recipe, overrides = RECIPES[family]
    overrides = [*overrides, *(QUICK_MODEL[family] if quick else []), f"run_dir={run_dir}", f"tokens.path={tokens_path}",
                 "tokens.tokenizer=", f"train.steps={steps}", "train.tracker=none", "train.progress_bar=false",
                 f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 4)}"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    start = time.perf_counter()
    summary = main([str(ROOT / recipe), *overrides])
    return Path(summary["prior"]), time.perf_counter() - start


def inception_weights_present() -> bool:
    try:
        from vqgan.metrics.inception import resolve_weights_path

        resolve_weights_path(download=False)
        return True
    except (FileNotFoundError, ImportError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=Path, default=ROOT / "runs/quickstart/tokens")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "runs/quickstart/tokenizer")
    parser.add_argument("--make-tokens", action="store_true", help="tokenize the quickstart images if --tokens is missing")
    parser.add_argument("--families", nargs="+", default=["transformer", "pixelcnn", "maskgit"], choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=400, help="training steps per family (the quickstart recipes')")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 steps, 32 samples; writes nothing")
    parser.add_argument("--output", type=Path, default=None, help="default benchmarks/results/prior_quality.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.num_samples = 20, 32
    output = args.output or (None if args.quick else Path(__file__).parent / "results" / "prior_quality.md")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens_path, tokenizer_note = args.tokens, f"the quickstart tokenizer's tokens {args.tokens}"
        if not tokens_path.exists():
            if not args.make_tokens:
                raise SystemExit(f"{tokens_path} not found: run recipes/quickstart.yaml and prior_quickstart.yaml "
                                 "first, or pass --make-tokens")
            tokens_path = work / "tokens"
            tokenizer_note = make_tokens(tokens_path, args.tokenizer, work, repeats=8 if args.quick else 256)
        reference, _ = token_dataset_tensors(load_token_dataset(tokens_path)[0])            # (N, 8, 8)
        num_codes = int(load_token_dataset(tokens_path)[1]["num_codes"])
        n = min(args.num_samples, len(reference))
        subset = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[:n]]
        floor = token_statistics_distance(subset, reference, num_codes)
        rows = []
        for family in args.families:
            prior_dir, train_secs = train_family(family, tokens_path, work / family, args.steps, args.quick)
            model, _ = load_prior(prior_dir)
            nll = nll_bits_per_token(model, reference)
            variants = {family: {}}
            if family == "maskgit":  # its defaults keep confident draws (mode-seeking); random order does not
                variants["maskgit, random order (choice_temperature 1e4)"] = RANDOM_ORDER
            for name, overrides in variants.items():
                start = time.perf_counter()
                config = SamplingConfig(num_samples=n, batch_size=min(n, 128), seed=0, **overrides)
                samples = sample_prior(model, config)
                sample_secs = time.perf_counter() - start
                distance = token_statistics_distance(samples, reference, num_codes)
                rows.append((name, count_parameters(model), distance, nll, train_secs, sample_secs))
                print(f"{name}: {distance} nll {nll} ({train_secs:.0f} s training, {sample_secs:.1f} s sampling)",
                      flush=True)

    gfid = ("Inception weights present: run `vqgan-fid prior:RUN/prior DATASET --num-samples 10000` per family "
            "for gFID." if inception_weights_present() else
            "gFID: not computed, the Inception weights are absent on this machine (vqgan.metrics.inception); the "
            "token-statistics distance stands in.")
    table = ["| prior | parameters | unigram TV | right-pair TV | down-pair TV | NLL bits/token (train tokens) | "
             "train s | sample s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, params, d, nll, train_secs, sample_secs in rows:
        nll_text = f"{nll:.3f}" if nll is not None else "n/a (no likelihood)"
        table.append(f"| {family} | {format_count(params)} | {d['unigram']:.4f} | {d['pair_right']:.4f} | "
                     f"{d['pair_down']:.4f} | {nll_text} | {train_secs:.0f} | {sample_secs:.1f} |")
    table.append(f"| noise floor ({n} training grids) | | {floor['unigram']:.4f} | {floor['pair_right']:.4f} | "
                 f"{floor['pair_down']:.4f} | | | |")
    report = "\n".join([
        "# Prior families side by side: token statistics on quickstart-sized tokens", "",
        "Command: `.venv/bin/python benchmarks/prior_quality.py" + (" --make-tokens" if args.make_tokens else "")
        + (f" --threads {args.threads}" if args.threads else "") + "`", "",
        f"Machine: {describe_machine(torch.device('cpu'))}", "",
        f"Tokens: {tokenizer_note}; {len(reference)} grids of {tuple(reference.shape[1:])}, K = {num_codes}. "
        f"Each prior: its quickstart recipe, {args.steps} steps; {n} samples at temperature 1, no top-k, the "
        "sampling defaults otherwise (MaskGIT: 12 steps, cosine, choice temperature 4.5).", "",
        *table, "",
        "TV = total-variation distance to the training tokens' frequencies (0 = identical, 1 = disjoint); the noise "
        "floor is what a perfect sampler would score with this many grids. " + gfid, "",
        NOTE, "",
    ])
    print("\n".join(table))
    print(gfid)
    if output is not None:
        atomic_write_text(output, report)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
