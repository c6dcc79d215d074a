"""Training's held-out evaluation: sharded over processes with the same figures on any number of them, finite PSNR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from test_fid_distributed import free_port
from test_metrics import write_images
from vqgan.data import DataConfig, build_dataloader
from vqgan.train_utils import evaluate_reconstruction

ROOT = Path(__file__).resolve().parents[1]

# The function vqgan-train calls every eval_every steps, on a seeded tiny model; each process writes what it saw
# to its own file (two ranks printing into one pipe can interleave their lines).
WORKER = """
import json, sys
import torch
from accelerate import Accelerator
from vqgan.autoencoder import VQModel, preset
from vqgan.data import DataConfig, build_dataloader
from vqgan.train_utils import evaluate_reconstruction

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = VQModel(preset("tiny")).to(accelerator.device)
seen = []
model.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
config = DataConfig(source=sys.argv[1], eval_split="train", image_size=32, cache_dir=sys.argv[2])
loader = build_dataloader(config, "eval", batch_size=2, shuffle=False)
metrics = evaluate_reconstruction(model, loader, accelerator)
result = {"rank": accelerator.process_index, "images": sum(seen), "metrics": metrics}
with open(f"{sys.argv[3]}/result_{accelerator.num_processes}_{accelerator.process_index}.json", "w") as handle:
    json.dump(result, handle)
"""


def results(folder: Path, world: int) -> list[dict]:
    """The result file of each process of a `world`-process run, by rank."""
    return [json.loads((folder / f"result_{world}_{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.slow
def test_eval_is_sharded_and_equal_on_one_and_two_processes(tmp_path):
    write_images(tmp_path / "images", 7, shift=0.0, seed=0)  # 4 batches of 2, 2, 2, 1: uneven shares
    script = tmp_path / "eval_worker.py"
    script.write_text(WORKER)
    args = [str(script), str(tmp_path / "images"), str(tmp_path / "hf_cache"), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    [single], double = results(tmp_path, 1), results(tmp_path, 2)
    assert single["images"] == 7 and single["metrics"]["num_images"] == 7
    assert [r["images"] for r in double] == [4, 3]  # each process encoded and decoded its own batches only
    # NOTE: exact equality, no tolerance: each image is computed in the same batch on 1 or 2 processes, and the
    # per-image PSNRs are averaged in the single-process order (the code counts are integer sums).
    for r in double:
        assert r["metrics"] == single["metrics"]


class IdentityModel(nn.Module):
    """Reconstructs every image exactly: the case whose PSNR is infinite."""

    config = SimpleNamespace(quantizer=SimpleNamespace(num_codes=4))

    def forward(self, images: torch.Tensor):
        indices = torch.zeros(images.shape[0], 2, 2, dtype=torch.long)
        return images, SimpleNamespace(indices=indices)

    def to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.clamp(-1.0, 1.0)


def test_eval_psnr_of_exact_reconstructions_is_finite():
    loader = build_dataloader(DataConfig(image_size=32), "eval", batch_size=2, shuffle=False)
    metrics = evaluate_reconstruction(IdentityModel(), loader, Accelerator(cpu=True))
    assert metrics["num_images"] == 2 and metrics["psnr"] == 100.0  # capped as vqgan-evaluate caps it, not inf
