"""The multi-scale quickstart as a user runs it (README): the recipes verbatim, with fewer steps.

accelerate launch -m vqgan.train recipes/quickstart_var.yaml (a kind=msvq tokenizer), then
accelerate launch -m vqgan.train_prior recipes/prior_quickstart_var.yaml (tokenizes the photos, trains the
next-scale prior, samples a grid), then vqgan-sample on the prior.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml")]


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.mark.slow
def test_multi_scale_quickstart_trains_tokenizer_and_next_scale_prior_and_samples(tmp_path):
    # the recipes' relative run dirs land in tmp_path; only the step counts (and the image cadence) are shortened
    command(LAUNCH + ["-m", "vqgan.train", str(ROOT / "recipes/quickstart_var.yaml"), "train.steps=20",
                      "train.image_every=20", "train.eval_every=20", "train.checkpoint_every=20"], tmp_path)
    tokenizer = tmp_path / "runs/quickstart_var/tokenizer"
    config = json.loads((tokenizer / "config.json").read_text())
    quantizer = config.get("quantizer") or config["model"]["quantizer"]
    assert quantizer["kind"] == "msvq" and quantizer["scales"] == [1, 2, 3, 4, 6, 8]

    command(LAUNCH + ["-m", "vqgan.train_prior", str(ROOT / "recipes/prior_quickstart_var.yaml"), "train.steps=10",
                      "train.checkpoint_every=10"], tmp_path)
    tokens_meta = json.loads((tmp_path / "runs/quickstart_var/tokens/tokenizer.json").read_text())
    assert tokens_meta["scales"] == [1, 2, 3, 4, 6, 8] and tokens_meta["num_rows"] == 6 * 256 * 2  # flipped rows
    run = tmp_path / "runs/prior_quickstart_var"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 10 and 0 < summary["bits_per_token"] < 8.5  # K = 256: 8 bits uniform
    sampled = torch.tensor(json.loads((run / "samples/tokens.json").read_text()))
    assert sampled.shape == (16, 130) and 0 <= int(sampled.min()) and int(sampled.max()) < 256
    assert Image.open(run / "samples/grid.png").size[0] >= 4 * 32

    done = command([sys.executable, "-m", "vqgan.cli.sample", str(run / "prior"), "--out", str(tmp_path / "samples"),
                    "--num-samples", "4", "--top-k", "64", "--device", "cpu"], tmp_path)
    assert (tmp_path / "samples/grid.png").is_file() and "(130,) tokens" in done.stdout
