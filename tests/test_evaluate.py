"""vqgan-evaluate (protocol rFID, exact fp32, recorded setup) and gFID of a prior through vqgan-fid, on tiny models
and random Inception weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_metrics import write_images
from vqgan.autoencoder import VQModel, preset
from vqgan.cli.export import read_evaluation
from vqgan.data import DataConfig, build_dataset, decode_image
from vqgan.tokenizer import VQTokenizer
from vqgan.metrics.image_metrics import psnr
from vqgan.metrics.inception import write_random_inception_weights
from vqgan.metrics.protocols import center_crop_arr
from vqgan.prior.io import save_prior
from vqgan.prior.transformer import TransformerConfig, TransformerPrior

ROOT = Path(__file__).resolve().parents[1]
DATA = ["source=embedded"]  # its eval split: two whole photographs (coffee, rocket)


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

    # the default protocol: imagenet-val (shorter side 256, centre crop), recorded with split, count and extractor
    setup = report["setup"]
    assert (setup["protocol"], setup["crop"], setup["split"], setup["num_images"]) == ("imagenet-val", 256, "eval", 2)
    assert setup["feature_extractor"].startswith("inception-v3-compat layer 64, weights sha256 ")
    assert setup["float32"].startswith("exact") and "embedded [eval]" in setup["images"]

    # PSNR equals a direct computation on the protocol's images
    tokenizer = VQTokenizer.from_pretrained(assets["tokenizer"])
    rows = build_dataset(DataConfig(image_size=32, resize=64), "eval")
    images = torch.stack([torch.from_numpy(np.array(center_crop_arr(decode_image(rows.table[i]["image"]), 256)))
                          .permute(2, 0, 1) for i in range(2)]).float() / 255  # (2, 3, 256, 256)
    ids = tokenizer.encode(images)
    expected_psnr = psnr(tokenizer.decode(ids).clamp(0, 1), images, data_range=1.0).mean()
    assert metrics["num_images"] == 2 and metrics["psnr"] == pytest.approx(float(expected_psnr), rel=1e-5)

    # the model card labels the rFID with its protocol and lists the setup
    (tmp_path / "card").mkdir()
    tokenizer.write_files(tmp_path / "card", evaluation=read_evaluation(out / "metrics.json"))  # push_to_hub's files
    card = (tmp_path / "card" / "README.md").read_text()
    assert "| rfid (imagenet-val, split eval, 2 images) |" in card
    assert "protocol imagenet-val (shorter side 256, centre crop); split eval; 2 images" in card
    assert "features inception-v3-compat layer 64" in card

    # usage and perplexity follow from the code histogram the tool wrote
    counts = torch.tensor(json.loads((out / "code_counts.json").read_text()))
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=256))
    probs = counts.double() / counts.sum()
    assert metrics["usage"] == pytest.approx(float((counts > 0).double().mean()))
    assert metrics["perplexity"] == pytest.approx(math.exp(-float((probs[probs > 0] * probs[probs > 0].log()).sum())))
    assert 0 < metrics["ssim"] <= 1 and metrics["tokens_per_image"] == (256 // 4) ** 2
    assert metrics["rfid"] is not None and math.isfinite(metrics["rfid"])
    assert metrics["lpips"] is None and any(n.startswith("LPIPS skipped") and "missing-vgg.pth" in n for n in notes)
    for name in ("reconstructions.png", "code_usage.png", "codebook_tsne.png"):
        with Image.open(out / name) as image:
            image.verify()
    page = (out / "summary.html").read_text()  # one page: the figures and the three pictures, embedded
    assert page.count("data:image/png;base64,") == 3 and "psnr" in page and "LPIPS skipped" in page
    with Image.open(out / "reconstructions.png") as grid:
        assert grid.height >= 2 * 256


def test_evaluate_rfid_is_vqgan_fid_rfid_under_the_protocol(tmp_path, assets):
    """The same source, reconstructions and extractor: vqgan-evaluate's rFID is vqgan-fid's recon: number."""
    write_images(tmp_path / "images", 3, shift=0.0, seed=0, size=40)  # 40 px: upscaled by the protocol
    common = ["--inception-weights", str(assets["inception"]), "--feature-layer", "64", "--batch-size", "2",
              "--no-download"]
    evaluated = run_tool("vqgan.cli.evaluate", str(assets["tokenizer"]), "--images", str(tmp_path / "images"),
                         "--out", str(tmp_path / "eval"), "--no-plots", "--lpips-weights", str(tmp_path / "no.pth"),
                         *common)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    fid = run_tool("vqgan.cli.fid", str(tmp_path / "images"), f"recon:{assets['tokenizer']}", "--protocol",
                   "imagenet-val", "--num-workers", "0", *common)
    assert fid.returncode == 0, fid.stderr[-3000:]
    rfid = json.loads(evaluated.stdout.strip().splitlines()[-1])["rfid"]
    assert rfid == pytest.approx(json.loads(fid.stdout.strip().splitlines()[-1])["fid"], rel=1e-9)
    setup = json.loads((tmp_path / "eval" / "metrics.json").read_text())["setup"]
    assert setup["protocol"] == "imagenet-val" and setup["split"] is None and setup["num_images"] == 3


def test_evaluate_runs_the_metric_in_exact_fp32_and_restores_tf32(tmp_path, assets, monkeypatch, capsys):
    from vqgan.cli import evaluate
    from vqgan.metrics.inception import InceptionFeatures

    seen = []
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    for cls, name in ((InceptionFeatures, "forward_layers"), (VQTokenizer, "encode"), (VQTokenizer, "decode")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _original=original, **k: (seen.append(flags()),
                                                                                  _original(self, *a, **k))[1])
    saved = flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training may leave them
    try:
        evaluate.run([str(assets["tokenizer"]), "--out", str(tmp_path / "eval"), "--no-plots", "--no-download",
                      "--inception-weights", str(assets["inception"]), "--feature-layer", "64",
                      "--lpips-weights", str(tmp_path / "no.pth"), "--data", *DATA])
        after = flags()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and set(seen) == {(False, False)}  # the tokenizer and the extractor ran without TF32
    assert after == (True, True)  # and the caller's flags are back


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
