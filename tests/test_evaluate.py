"""vqgan-evaluate and gFID of a prior through vqgan-fid, on tiny models and random Inception weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgan.autoencoder import VQModel, preset
from vqgan.data import DataConfig, build_dataloader
from vqgan.export import VQTokenizer
from vqgan.metrics.image_metrics import psnr
from vqgan.metrics.inception import write_random_inception_weights
from vqgan.prior.io import save_prior
from vqgan.prior.transformer import TransformerConfig, TransformerPrior
from vqgan.utils import images_from_model_range

ROOT = Path(__file__).resolve().parents[1]
DATA = ["source=embedded", "image_size=32", "resize=64", "num_eval_images=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    tokenizer = folder / "tokenizer"
    VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(tokenizer)
    prior = TransformerPrior(TransformerConfig(num_codes=256, grid=(8, 8), dim=32, depth=1, heads=2))
    save_prior(prior, folder / "prior", extra={"tokenizer": str(tokenizer)})
    return {"tokenizer": tokenizer, "prior": folder / "prior",
            "inception": write_random_inception_weights(folder / "inception.pth", seed=0)}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """`python -m vqgan.cli.NAME ARGS` in a fresh process, as the console command runs."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"VQGAN_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_evaluate_tokenizer_reports_metrics_plots_and_missing_weights(tmp_path, assets):
    out = tmp_path / "eval"
    result = run_tool("vqgan.cli.evaluate", str(assets["tokenizer"]), "--out", str(out), "--no-download",
                      "--inception-weights", str(assets["inception"]), "--feature-layer", "64",
                      "--lpips-weights", str(tmp_path / "missing-vgg.pth"), "--data", *DATA)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    metrics, notes = report["metrics"], report["notes"]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == metrics

    # PSNR equals a direct computation on the same centre crops
    tokenizer = VQTokenizer.from_pretrained(assets["tokenizer"])
    config = DataConfig(image_size=32, resize=64, num_eval_images=2, random_crop=False, hflip=False)
    images = images_from_model_range(next(iter(build_dataloader(config, "eval", batch_size=8, shuffle=False)))["images"])
    ids = tokenizer.encode(images)
    expected_psnr = psnr(tokenizer.decode(ids).clamp(0, 1), images, data_range=1.0).mean()
    assert metrics["num_images"] == 2 and metrics["psnr"] == pytest.approx(float(expected_psnr), rel=1e-5)

    # usage and perplexity follow from the code histogram the tool wrote
    counts = torch.tensor(json.loads((out / "code_counts.json").read_text()))
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=256))
    probs = counts.double() / counts.sum()
    assert metrics["usage"] == pytest.approx(float((counts > 0).double().mean()))
    assert metrics["perplexity"] == pytest.approx(math.exp(-float((probs[probs > 0] * probs[probs > 0].log()).sum())))
    assert 0 < metrics["ssim"] <= 1 and metrics["tokens_per_image"] == 64
    assert metrics["rfid"] is not None and math.isfinite(metrics["rfid"])
    assert metrics["lpips"] is None and any(n.startswith("LPIPS skipped") and "missing-vgg.pth" in n for n in notes)
    for name in ("reconstructions.png", "code_usage.png", "codebook_tsne.png"):
        with Image.open(out / name) as image:
            image.verify()
    page = (out / "summary.html").read_text()  # one page: the figures and the three pictures, embedded
    assert page.count("data:image/png;base64,") == 3 and "psnr" in page and "LPIPS skipped" in page
    with Image.open(out / "reconstructions.png") as grid:
        assert grid.height >= 2 * 96  # 32 px images enlarged to readable cells


def test_bad_data_key_is_a_clear_error(assets):
    result = run_tool("vqgan.cli.evaluate", str(assets["tokenizer"]), "--data", "imag_size=32")
    assert result.returncode == 2 and "imag_size" in result.stderr and "image_size" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")  # one line, no traceback


def test_gfid_samples_a_prior_on_the_fly(tmp_path, assets):
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    result = run_tool("vqgan.cli.fid", str(folder), f"prior:{assets['prior']}", "--num-samples", "5",
                      "--batch-size", "2", "--top-k", "20", "--inception-weights", str(assets["inception"]),
                      "--feature-layer", "64", "--no-download")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["count1"] == 4 and summary["count2"] == 5 and math.isfinite(summary["fid"])
    bad = run_tool("vqgan.cli.fid", str(folder), f"prior:{assets['prior']}", "--num-samples", "2", "--top-p", "2",
                   "--inception-weights", str(assets["inception"]), "--feature-layer", "64", "--no-download")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and len(errors) == 1 and "top_p" in errors[0] and "Traceback" not in bad.stderr
