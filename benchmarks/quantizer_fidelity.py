"""Quantizer fidelity: held-out PSNR and codebook use of every quantizer kind, beside full k-means.

1. Patch test (the classical VQ test): 4x4 RGB patches (D = 48) of the embedded scikit-image photos,
   K = 1024, 2000 Adam steps on batches of 4096 patches drawn from a pool of training patches; PSNR
   on every non-overlapping patch of the held-out photos (vqgan.data.EMBEDDED_EVAL). Reference: full
   Lloyd k-means (k-means++ seeding, iterations until the assignment stops changing) on the same pool,
   computed in the same run. Kinds whose lookup width is fixed (fsq, lfq) get learned linear maps
   48 -> c -> 48 around them, trained by the same optimizer; ibq gets affine maps 48 -> 48 -> 48 (its
   inner-product argmax cannot see a patch's scale; see `Wrapped`).
2. Large codebooks: K = 16384 (vq l2 low-dim, simvq, ibq) and 2^14 / 2^18 (lfq, fsq) on patches from
   a pool of up to 2^21 (1.7M: every position of the smaller photos; more distinct patches than 2^18
   codes, which the patch test's pool of 2^18 could not give), PCA-whitened
   (the spread-out latents an encoder gives; see `whiten`); codes used by real assignments over the last
   65,536 training tokens, beside what uniform draws would use over that window (98.2 % at 2^14; 22.1 %
   at 2^18, where a window holds at most 25 % of the codes), and over the last 4K tokens, where uniform
   draws use 98.2 % at any K. Two untrained rows show what the data allows a codebook that is not fitted
   to it: frozen Gaussian codes (simvq's starting point) and the signs of a random rotation (lfq's).
3. Tokenizer: the `tiny` f4 preset (K = 256) per kind on 32 px crops of the embedded photos (shorter
   side 96 px, as the quickstart), L1 + quantizer loss; held-out PSNR and codes used on crops of the
   eval photos.

    .venv/bin/python benchmarks/quantizer_fidelity.py            # ~1 hour on 2 cores
    .venv/bin/python benchmarks/quantizer_fidelity.py --quick    # ~1 min smoke run (numbers not comparable)

Prints a markdown table and writes it to benchmarks/results/quantizer_fidelity.md (--quick: _quick.md).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import describe_machine  # noqa: E402
from vqgan.data import EMBEDDED_EVAL, EMBEDDED_PHOTOS  # noqa: E402
from vqgan.optim import OptimConfig, build_optimizer, build_scheduler  # noqa: E402
from vqgan.quantizers import QuantizerConfig, build_quantizer  # noqa: E402
from vqgan.quantizers.entropy import histogram, perplexity  # noqa: E402
from vqgan.quantizers.kmeans import kmeans_plus_plus  # noqa: E402
from vqgan.quantizers.search import nearest_code  # noqa: E402
from vqgan.utils import atomic_write_text  # noqa: E402

PATCH = 4
WINDOW = 65536


def photo(name: str) -> np.ndarray:
    import skimage.data

    pixels = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return pixels[..., :3]


def patches_of(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (n, 48) float in [0, 1], every non-overlapping 4x4 patch."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div(255.0).permute(2, 0, 1)  # (3, H, W)
    return F.unfold(x[None], PATCH, stride=PATCH)[0].t().contiguous()  # (n, 48)


def training_pool(size: int, generator: torch.Generator) -> torch.Tensor:
    """(size, 48) patches at random offsets of the training photos (overlapping positions)."""
    parts = []
    names = [n for n in EMBEDDED_PHOTOS if n not in EMBEDDED_EVAL]
    for name in names:
        x = torch.from_numpy(np.ascontiguousarray(photo(name))).float().div(255.0).permute(2, 0, 1)
        all_patches = F.unfold(x[None], PATCH, stride=1)[0].t()  # (positions, 48)
        take = torch.randperm(all_patches.shape[0], generator=generator)[: size // len(names) + 1]
        parts.append(all_patches[take])
    pool = torch.cat(parts)
    return pool[torch.randperm(pool.shape[0], generator=generator)[:size]].contiguous()


def selected(name: str, args) -> bool:
    """Whether a table row runs: every row, or with --rows those whose name holds one of its words."""
    return args.rows is None or any(word in name for word in args.rows)


def reference_rows(args) -> bool:
    """Whether the k-means and untrained reference rows run: not with --rows (their names hold results)."""
    return args.rows is None


def fraction_used(counts: Tensor) -> float:
    """(K,) code histogram -> the fraction of the K codes it uses."""
    return float((counts > 0).float().mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10.0 * math.log10(1.0 / F.mse_loss(x, y).item())


def lloyd(x: torch.Tensor, k: int, max_iters: int, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Full Lloyd k-means: k-means++ seeds, iterate until no assignment changes (or max_iters)."""
    centres = x[kmeans_plus_plus(x, k, chunk)].clone()
    previous = None
    for it in range(max_iters):
        assign = nearest_code(x, centres, chunk)
        if previous is not None and torch.equal(assign, previous):
            return centres, it
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centres)
        previous = assign
    return centres, max_iters


class Wrapped(nn.Module):
    """A quantizer on 48-dim rows: quantized output plus its loss terms.

    ibq gets learned affine maps 48 -> 48 around it: its argmax of z.e is blind to the scale of z (a patch
    and its scaled copies share an index), so without an encoder in front it cannot quantize magnitudes.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.quantizer = build_quantizer(config)
        maps = config.kind == "ibq"
        self.map_in = nn.Linear(config.dim, config.dim) if maps else nn.Identity()
        self.map_out = nn.Linear(config.dim, config.dim) if maps else nn.Identity()

    def forward(self, x):
        out = self.quantizer(self.map_in(x))
        return replace(out, quantized=self.map_out(out.quantized))


def train_quantizer(config: QuantizerConfig, pool: torch.Tensor, steps: int, batch: int, lr: float, seed: int):
    """Adam (the project's build_optimizer, cosine to 0) on mse(quantized, x) + quantizer loss."""
    torch.manual_seed(seed)
    model = Wrapped(config)
    opt = build_optimizer(model, OptimConfig(lr=lr, betas=(0.9, 0.99), schedule="cosine", grad_clip=0.0))
    sched = build_scheduler(opt, OptimConfig(lr=lr, schedule="cosine"), steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        x = pool[torch.randint(pool.shape[0], (batch,), generator=generator)]
        out = model(x)
        loss = F.mse_loss(out.quantized, x) + out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model, out, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: Wrapped, held_out: torch.Tensor) -> tuple[float, float, float]:
    """(held-out PSNR, fraction of codes used on the held-out patches, perplexity there)."""
    model.eval()
    out = model(held_out)
    model.train()
    counts = histogram(out.indices, model.quantizer.config.num_codes)
    return psnr(out.quantized, held_out), fraction_used(counts), float(perplexity(counts))


VQ_SETTINGS = {
    "vq plain (no k-means, no restarts: the old default)": dict(kmeans_init=False, dead_code_threshold=0),
    "vq k-means init only": dict(dead_code_threshold=0),
    "vq k-means + restarts every step (threshold 1, random rows)": dict(dead_code_threshold=1, restart_from="random"),
    "vq k-means + restarts every step (threshold 1, error rows)": dict(dead_code_threshold=1),
    "vq k-means + restarts (threshold 10, random rows)": dict(dead_code_threshold=10, restart_from="random"),
    "vq k-means + restarts (threshold 10, error rows) [defaults]": dict(),
    "vq defaults + affine (affine_lr 10) + sync_nu 0.2 (vqtorch's recipe)": dict(affine_reparam=True, sync_nu=0.2),
    "vq k-means + restarts (threshold 50, error rows)": dict(dead_code_threshold=50),
}


def kind_settings(k: int) -> dict[str, dict]:
    bits = k.bit_length() - 1
    levels = QuantizerConfig(kind="fsq", num_codes=k, dim=48).levels
    return {
        "simvq": dict(kind="simvq"),
        "ibq (affine maps, no entropy, no restarts)": dict(kind="ibq", dead_code_threshold=0),
        "ibq (affine maps, entropy 0.05, T 0.01, no restarts: SEED-Voken's)": dict(
            kind="ibq", dead_code_threshold=0, entropy_weight=0.05, entropy_temperature=0.01),
        "ibq (affine maps, entropy 0.05, T 0.01, with restarts: its recipe)": dict(
            kind="ibq", entropy_weight=0.05, entropy_temperature=0.01),
        f"fsq (levels {levels})": dict(kind="fsq"),
        f"fsq (levels {levels}, entropy 0.1, T 0.1)": dict(kind="fsq", entropy_weight=0.1, entropy_temperature=0.1),
        f"lfq ({bits} bits, entropy 0.1, T 0.01)": dict(kind="lfq", entropy_weight=0.1, entropy_temperature=0.01),
    }


def patch_test(args, pool, held_out, rows: list[str]) -> None:
    k = 1024
    if reference_rows(args):
        torch.manual_seed(args.seed)  # k-means++ draws from the global generator
        start = time.perf_counter()
        centres, iters = lloyd(pool, k, args.lloyd_iters)
        km_time = time.perf_counter() - start
        assign = nearest_code(held_out, centres, 4096)
        counts = histogram(assign, k)
        rows.append(f"| full Lloyd k-means ({iters} iterations on the {pool.shape[0]:,}-patch pool) | "
                    f"{psnr(centres[assign], held_out):.2f} | {fraction_used(counts):.1%} | "
                    f"{perplexity(counts):.0f} | {km_time:.0f} |")
        print(rows[-1], flush=True)
    settings = {name: dict(kind="vq", **kw) for name, kw in VQ_SETTINGS.items()}
    settings.update(kind_settings(k))
    for name, kw in settings.items():
        if not selected(name, args):
            continue
        config = QuantizerConfig(num_codes=k, dim=48, **kw)
        model, _, seconds = train_quantizer(config, pool, args.steps, args.batch, args.lr, args.seed)
        value, used, ppl = evaluate(model, held_out)
        rows.append(f"| {name} | {value:.2f} | {used:.1%} | {ppl:.0f} | {seconds:.0f} |")
        print(rows[-1], flush=True)


def whiten(pool: torch.Tensor) -> torch.Tensor:
    """PCA-whitened rows (zero mean, identity covariance): the spread-out latents an encoder would give.

    Raw patches are nearly low-rank (a few directions hold most of the variance), so a grid (fsq, lfq) or
    a Gaussian codebook (simvq) reached through a freshly initialised linear map would see only a sliver
    of them; the large-codebook test asks how much of the codebook each kind can keep in use.
    """
    centred = pool - pool.mean(dim=0)
    values, vectors = torch.linalg.eigh(centred.t() @ centred / pool.shape[0])  # (48,), (48, 48)
    return centred @ vectors / values.clamp_min(1e-8).sqrt()


def uniform_ceiling(num_codes: int, window: int) -> float:
    """Expected fraction of K codes seen in `window` draws if every code were equally likely."""
    return 1.0 - math.exp(window * math.log1p(-1.0 / num_codes))


LARGE_SETTINGS = {
    "vq l2 low-dim (code_dim 8), K=16384": dict(num_codes=16384, code_dim=8, l2_normalize=True),
    "simvq, K=16384": dict(kind="simvq", num_codes=16384),
    "simvq, K=16384, lr 2e-3": dict(kind="simvq", num_codes=16384, lr=2e-3),
    "ibq, K=16384 (entropy 0.05, T 0.01, no restarts)": dict(kind="ibq", num_codes=16384, entropy_weight=0.05,
                                                              entropy_temperature=0.01, dead_code_threshold=0),
    "ibq, K=16384 (entropy 0.05, T 0.01, with restarts)": dict(kind="ibq", num_codes=16384, entropy_weight=0.05,
                                                                entropy_temperature=0.01),
    "lfq 2^14 (entropy 0.3, T 0.01, groups of 9 bits)": dict(kind="lfq", num_codes=2**14, entropy_weight=0.3,
                                                            entropy_temperature=0.01, entropy_group_bits=9),
    "lfq 2^14 (entropy 0.3, T 0.01, exact: one group) [defaults but the weight]": dict(
        kind="lfq", num_codes=2**14, entropy_weight=0.3, entropy_temperature=0.01),
    "fsq 2^14": dict(kind="fsq", num_codes=2**14),
    "fsq 2^14 (entropy 0.1, T 0.1, exact)": dict(kind="fsq", num_codes=2**14, entropy_weight=0.1,
                                                  entropy_temperature=0.1),
    "fsq 2^14 (entropy 0.3, T 0.1, exact)": dict(kind="fsq", num_codes=2**14, entropy_weight=0.3,
                                                  entropy_temperature=0.1),
    "lfq 2^18 (entropy 0.3, T 0.01, groups of 14 + 4 bits)": dict(kind="lfq", num_codes=2**18, entropy_weight=0.3,
                                                                 entropy_temperature=0.01),
    "fsq 2^18": dict(kind="fsq", num_codes=2**18),
    "fsq 2^18 (entropy 0.1, T 0.1, groups)": dict(kind="fsq", num_codes=2**18, entropy_weight=0.1,
                                                   entropy_temperature=0.1),
}


def untrained_references(pool: Tensor, seed: int) -> list[str]:
    """Table rows for codebooks fitted to nothing, assigning draws of the whitened (n, 48) pool.

    - Frozen isotropic Gaussian codes N(0, s^2 I), K = 16384, at the best of four scales s chosen on the
      window itself: simvq's codes are frozen Gaussian vectors through one linear map, and these are the
      codebooks that map reaches by scaling alone (the pool's covariance is already I). An optimistic
      reference, not simvq's start (its map starts random).
    - Signs of the first 14 or 18 coordinates of a random rotation: an lfq whose projection is a rotation.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = pool[torch.randint(pool.shape[0], (4 * 2**18,), generator=generator)]  # (4 * 2^18, 48): the longest window
    window = draws[:WINDOW]  # (65536, 48)
    codes = torch.randn(16384, pool.shape[1], generator=generator)  # (K, 48)
    gaussian, scale = max((fraction_used(histogram(nearest_code(window, codes * s, 4096), 16384)), s)
                          for s in (0.1, 0.3, 0.5, 1.0))
    rotation = torch.linalg.qr(torch.randn(pool.shape[1], pool.shape[1], generator=generator))[0]  # (48, 48)

    def signs(rows: Tensor, bits: int) -> Tensor:
        """(n, 48) -> (n,) lfq's index of the signs of the first `bits` rotated coordinates."""
        lfq = build_quantizer(QuantizerConfig(kind="lfq", num_codes=2**bits, dim=bits))
        return lfq.search(rows @ rotation[:, :bits])

    rows = [f"| untrained: frozen N(0, {scale}^2 I) codes, K=16384 (the best of 4 scales, chosen on this window) | "
            f"{gaussian:.1%} | {uniform_ceiling(16384, WINDOW):.1%} | {gaussian:.1%} over {WINDOW:,} | 0 |"]
    for bits in (14, 18):
        k = 2**bits
        used, used_long = (fraction_used(histogram(signs(rows_, bits), k)) for rows_ in (window, draws[: 4 * k]))
        rows.append(f"| untrained: signs of a random rotation, 2^{bits} | {used:.1%} | {uniform_ceiling(k, WINDOW):.1%} | "
                    f"{used_long:.1%} over {4 * k:,} | 0 |")
    return rows


def large_codebooks(args, pool, rows: list[str]) -> None:
    pool = whiten(pool)
    if reference_rows(args):
        rows += untrained_references(pool, args.seed)
        print(*rows[-3:], sep="\n", flush=True)
    for name, kw in LARGE_SETTINGS.items():
        if not selected(name, args):
            continue
        kw = dict(kw)
        lr = kw.pop("lr", args.large_lr)
        config = QuantizerConfig(dim=48, **kw)
        model, _, seconds = train_quantizer(config, pool, args.large_steps, args.large_batch, lr, args.seed)
        k = config.num_codes
        long_window = min(4 * k, args.large_steps * args.large_batch)  # 4K: uniform draws would see 98.2 %
        used, used_long = (float(model.quantizer.window_usage(w)) for w in (WINDOW, long_window))
        rows.append(f"| {name} | {used:.1%} | {uniform_ceiling(k, WINDOW):.1%} | "
                    f"{used_long:.1%} over {long_window:,} | {seconds:.0f} |")
        print(rows[-1], flush=True)


def photo_tensors(names, resize: int) -> list[torch.Tensor]:
    """Photos as (3, H, W) float in [-1, 1], shorter side resized to `resize` (as the quickstart)."""
    from PIL import Image

    from vqgan.data import resized_pixels

    return [resized_pixels(Image.fromarray(photo(n)), resize, resize).float() / 127.5 - 1.0 for n in names]


def random_crops(photos: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(count):
        x = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        top = int(torch.randint(x.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(x.shape[2] - size + 1, (1,), generator=generator))
        out.append(x[:, top : top + size, left : left + size])
    return torch.stack(out)


def tokenizer_test(args, rows: list[str]) -> None:
    """The `tiny` preset (f4, K=256) per kind: L1 + quantizer loss on 32 px crops, held-out photos."""
    from vqgan.autoencoder import VQModel, preset

    train_photos = photo_tensors([n for n in EMBEDDED_PHOTOS if n not in EMBEDDED_EVAL], 96)
    eval_photos = photo_tensors(EMBEDDED_EVAL, 96)
    held_out = random_crops(eval_photos, 64, 32, torch.Generator().manual_seed(123))  # fixed held-out crops
    settings = {
        "vq (defaults: k-means init + restarts)": dict(kind="vq"),
        "vq plain (no k-means, no restarts)": dict(kind="vq", kmeans_init=False, dead_code_threshold=0),
        "vq l2 code_dim 8": dict(kind="vq", code_dim=8, l2_normalize=True),
        "simvq": dict(kind="simvq"),
        "ibq (no entropy, no restarts)": dict(kind="ibq", dead_code_threshold=0),
        "ibq (no entropy, with restarts: the defaults)": dict(kind="ibq"),
        "ibq (entropy 0.05, T 0.01, no restarts)": dict(kind="ibq", entropy_weight=0.05, entropy_temperature=0.01,
                                                        dead_code_threshold=0),
        "ibq (entropy 0.05, T 0.01, with restarts)": dict(kind="ibq", entropy_weight=0.05, entropy_temperature=0.01),
        "fsq (8, 8, 4)": dict(kind="fsq"),
        "fsq (8, 8, 4), entropy 0.1, T 0.1": dict(kind="fsq", entropy_weight=0.1, entropy_temperature=0.1),
        "lfq (8 bits, entropy 0.1, T 0.01)": dict(kind="lfq", entropy_weight=0.1, entropy_temperature=0.01),
    }
    base = preset("tiny")
    for name, kw in settings.items():
        if not selected(name, args):
            continue
        torch.manual_seed(args.seed)
        config = replace(base, quantizer=QuantizerConfig(num_codes=256, dim=base.quantizer.dim, **kw))
        model = VQModel(config)
        opt = build_optimizer(model, OptimConfig(lr=4e-4))
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for _ in range(args.tokenizer_steps):
            x = random_crops(train_photos, 16, 32, generator)
            recon, quant = model(x)
            loss = (recon - x).abs().mean() + quant.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            ids = model.encode_model_range(held_out)
            images = model.decode_model_range(ids)
        used = ids.unique().numel() / 256
        value = 10.0 * math.log10(4.0 / F.mse_loss(images, held_out).item())  # images in [-1, 1]
        rows.append(f"| {name} | {value:.2f} | {used:.1%} | {seconds:.0f} |")
        print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, small pool: a smoke run")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pool", type=int, default=262144, help="training patches (k-means runs on all)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lloyd-iters", type=int, default=300)
    parser.add_argument("--large-steps", type=int, default=200)
    parser.add_argument("--large-batch", type=int, default=8192)
    parser.add_argument("--large-lr", type=float, default=1e-2)
    parser.add_argument("--large-pool", type=int, default=2**21,
                        help="training patches of the large-codebook test (more than 2^18 distinct ones)")
    parser.add_argument("--tokenizer-steps", type=int, default=400)
    parser.add_argument("--only", choices=["patches", "large", "tokenizer"], default=None,
                        help="run one test; its section replaces the same section of the results file")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="run only the trained rows whose name holds one of these words (no k-means or "
                             "untrained references); they replace the rows of the same name in the results file "
                             "and every other row is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pool, args.lloyd_iters, args.large_steps, args.large_batch = 60, 32768, 20, 16, 4096
        args.large_pool = 65536
        args.tokenizer_steps = 10
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    pool = training_pool(args.pool, generator)
    held_out = torch.cat([patches_of(photo(n)) for n in EMBEDDED_EVAL])
    # Centred on the pool's mean: no change for Euclidean search (k-means, vq, fsq/lfq through their maps),
    # but inner-product search (ibq) would otherwise send every patch to the longest code.
    mean = pool.mean(dim=0)
    pool, held_out = pool - mean, held_out - mean
    run = f"Run: `{shlex.join(sys.argv)}` on {describe_machine(torch.device('cpu'))}."  # in each section (see --only)
    lines = [
        "# Quantizer fidelity",
        "",
        f"- Data: 4x4 RGB patches (D=48) in [0, 1]; training pool {pool.shape[0]:,} patches of "
        f"{[n for n in EMBEDDED_PHOTOS if n not in EMBEDDED_EVAL]}; held out: all {held_out.shape[0]:,} "
        f"non-overlapping patches of {list(EMBEDDED_EVAL)}.",
        f"- Training: {args.steps} Adam steps (betas 0.9, 0.99, lr {args.lr} cosine to 0) on batches of "
        f"{args.batch} on mse(quantized, x) + the quantizer's loss; patches centred on the pool's mean.",
        "",
    ]
    if args.only in (None, "patches"):
        rows = ["| K = 1024 | held-out PSNR (dB) | codes used (held out) | perplexity | time (s) |",
                "| --- | --- | --- | --- | --- |"]
        patch_test(args, pool, held_out, rows)
        lines += ["## Patch test, K = 1024", "", run, "", *rows, ""]
    if args.only in (None, "large"):
        rows = [f"| codebook | used over the last {WINDOW:,} training tokens | the same if codes were drawn "
                f"uniformly | used over the last 4K tokens (uniform draws: {uniform_ceiling(2**14, 2**16):.1%}) | "
                "time (s) |", "| --- | --- | --- | --- | --- |"]
        large_pool = training_pool(args.large_pool, torch.Generator().manual_seed(args.seed))
        large_codebooks(args, large_pool, rows)
        lines += [f"## Large codebooks ({args.large_steps} steps of {args.large_batch} PCA-whitened patches, "
                  f"lr {args.large_lr}, pool of {large_pool.shape[0]:,})", "", run, "", *rows, ""]
    if args.only in (None, "tokenizer"):
        rows = [f"| tiny f4 tokenizer, K = 256 | held-out PSNR (dB) | codes used by 64 held-out crops "
                "(4,096 tokens) | time (s) |", "| --- | --- | --- | --- |"]
        tokenizer_test(args, rows)
        lines += [f"## Tokenizer: `tiny` preset, {args.tokenizer_steps} Adam steps (lr 4e-4) of 16 crops of 32 px, "
                  "L1 + quantizer loss (no GAN, no LPIPS)", "", run, "", *rows, ""]
    text = "\n".join(lines)
    out = Path(__file__).parent / "results" / ("quantizer_fidelity_quick.md" if args.quick else "quantizer_fidelity.md")
    if (args.only or args.rows) and out.exists():
        text = merged_sections(out.read_text(), text, rows_only=args.rows is not None)
    print(text)
    atomic_write_text(out, text + "\n")
    print(f"wrote {out}")


SECTIONS = ("Patch test", "Large codebooks", "Tokenizer")  # in the order main() writes them


def section_key(section: str) -> str:
    """'## Large codebooks (200 steps ...)' -> 'Large codebooks': a section's name without its parameters."""
    heading = section.splitlines()[0].removeprefix("## ")
    return next((name for name in SECTIONS if heading.startswith(name)), heading)


def merged_sections(earlier: str, latest: str, rows_only: bool = False) -> str:
    """An `--only` / `--rows` run's results file: the earlier file with the latest run's sections (with
    rows_only: its rows) in place of theirs.

    The earlier header is kept (it describes the sections kept); each section names its own runs.
    """
    def split(text: str) -> tuple[str, dict[str, str]]:
        header, *parts = text.rstrip("\n").split("\n## ")
        return header.rstrip("\n"), {section_key("## " + part): "## " + part.rstrip("\n") for part in parts}

    header, sections = split(earlier)
    latest_header, latest_sections = split(latest)
    if rows_only and latest_header != header:
        raise SystemExit("--rows: this run's data or training settings differ from the results file's:\n"
                         f"{latest_header}\nagainst\n{header}\nrerun the whole sections with --only")
    for name, section in latest_sections.items():
        if rows_only and name in sections:
            sections[name] = merged_rows(sections[name], section)
        else:
            sections[name] = section
    order = sorted(sections, key=lambda name: SECTIONS.index(name) if name in SECTIONS else len(SECTIONS))
    return "\n\n".join([header, *(sections[name] for name in order)])


def merged_rows(earlier: str, latest: str) -> str:
    """One section: the latest run's table rows replace the earlier rows of the same name (new names go
    after the last row), and a line under the earlier text names the rows re-measured and their run.

    Refused when the headings differ (the rows were measured with other settings than the section's) or
    a table repeats a row name; a latest section without rows leaves the earlier one as it was.
    """
    def body_rows(lines: list[str]) -> list[int]:  # indices of table rows below the header and the rule
        return [i for i, line in enumerate(lines) if line.startswith("|")][2:]

    def row_name(line: str) -> str:
        return line.split("|")[1].strip()

    lines, new_lines = earlier.split("\n"), latest.split("\n")
    old_rows, new_indices = body_rows(lines), body_rows(new_lines)
    if not new_indices:
        return earlier
    if lines[0] != new_lines[0]:
        raise SystemExit(f"--rows: the section was measured as {lines[0]!r}, this run as {new_lines[0]!r}; "
                         "rerun the whole section with --only")
    for table in (lines, new_lines):
        names = [row_name(table[i]) for i in body_rows(table)]
        if len(set(names)) != len(names):
            raise SystemExit(f"--rows: {sorted({n for n in names if names.count(n) > 1})} name more than one row")
    if not old_rows:
        return latest
    new_rows = {row_name(new_lines[i]): new_lines[i] for i in new_indices}
    old_names = {row_name(lines[i]) for i in old_rows}
    for i in old_rows:
        lines[i] = new_rows.get(row_name(lines[i]), lines[i])
    lines[old_rows[-1] + 1 : old_rows[-1] + 1] = [row for name, row in new_rows.items() if name not in old_names]
    run = next((line for line in new_lines if line.startswith("Run:")), "")
    return "\n".join([*lines, "", f"Re-measured since: {', '.join(new_rows)}. {run}"])


if __name__ == "__main__":
    main()
