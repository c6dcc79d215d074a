"""vqgan-fid under `accelerate launch` with 2 CPU processes gives the 1-process FID and counts.

7 and 5 images: uneven shards, and the shard of 2 processes must neither drop nor duplicate the odd image.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_metrics import random_weights, run_tool, write_images

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*not the official TF-FID")  # the random test weights, on purpose


def free_port() -> int:
    with socket.socket() as sock:  # other test runs share this machine: never assume 29500 is free
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_fid(tmp_path_factory):
    weights = random_weights(tmp_path_factory)
    root = tmp_path_factory.mktemp("fid_dist")
    write_images(root / "a", 7, shift=0.0, seed=0)
    write_images(root / "b", 5, shift=40.0, seed=1)
    args = [str(root / "a"), str(root / "b"), "--inception-weights", str(weights), "--feature-layer", "64",
            "--batch-size", "2", "--isc", "--prc"]  # IS and P/R gather per-image features in global order
    single = run_tool([*args, "--num-workers", "0"])

    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "vqgan.cli.fid", *args, "--num-workers", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout  # really sharded, not two independent copies
    double = json.loads(done.stdout.strip().splitlines()[-1])
    assert (double["count1"], double["count2"]) == (single["count1"], single["count2"]) == (7, 5)
    assert double["fid"] == pytest.approx(single["fid"], rel=1e-9)
    for key in ("isc1", "isc2", "isc1_std", "precision", "recall"):
        assert double[key] == pytest.approx(single[key], rel=1e-6), key


@pytest.mark.slow
def test_evaluate_on_two_processes_gives_the_one_process_figures(tmp_path_factory):
    """vqgan-evaluate shards the images like vqgan-fid; per-image figures are gathered in the source's order."""
    import torch

    from vqgan.autoencoder import VQModel, preset
    from vqgan.tokenizer import VQTokenizer

    root = tmp_path_factory.mktemp("evaluate_dist")
    torch.manual_seed(0)
    VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(root / "tokenizer")
    write_images(root / "images", 5, shift=0.0, seed=0, size=40)
    args = ["-m", "vqgan.cli.evaluate", str(root / "tokenizer"), "--images", str(root / "images"),
            "--inception-weights", str(random_weights(tmp_path_factory)), "--feature-layer", "64", "--batch-size", "2",
            "--no-plots", "--no-download", "--lpips-weights", str(root / "no-vgg.pth"), "--num-workers", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(root / "one")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          *args, "--out", str(root / "two")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    single, double = (json.loads(run.stdout.strip().splitlines()[-1]) for run in (one, two))
    assert single["num_images"] == double["num_images"] == 5
    for key in ("psnr", "ssim", "usage", "perplexity", "rfid"):  # images batched with other companions: rounding
        assert double[key] == pytest.approx(single[key], rel=1e-6), key
