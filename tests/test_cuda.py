"""On a CUDA GPU (skipped without one; `pytest -m cuda`, run by benchmarks/gpu_acceptance.py).

- The real training loops (vqgan.train, vqgan.train_prior for the GPT and MaskGIT) make no host sync
  in a whole step after warm-up except the window flag's one documented read (reduce_window_flags):
  from the end of one flag read to the start of the next, torch.cuda.set_sync_debug_mode("error")
  turns any synchronising call into an exception at its site.
- bf16 and fp16 training steps stay finite.
- Every quantizer kind searches in fp32 under bf16 and fp16 autocast (its fp32 island).
- A tokenizer encodes and decodes on CUDA as on the CPU: fp32 with TF32 off, ids equal on at least
  99 % of tokens (a near-tie may flip with the summation order) and decoded images within 1e-3.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from vqgan.autoencoder import VQModel, preset
from vqgan.tokenizer import VQTokenizer
from vqgan.prior.data import save_token_dataset
from vqgan.quantizers import QuantizerConfig, build_quantizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

WARMUP_WINDOWS = 2  # k-means init, cuDNN autotuning and the allocator settle in these


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    torch.cuda.set_sync_debug_mode("default")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tokenizer_recipe(run_dir: Path, mixed_precision: str, steps: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "quantizer": {"num_codes": 64}},  # k-means init and restarts: the defaults
        "discriminator": {"base_channels": 16, "num_layers": 2},  # BatchNorm, as the recipes
        "loss": {"perceptual_weight": 0.0, "disc_start": 0, "lecam_weight": 0.1},
        "data": {"image_size": 32, "resize": 64, "embedded_repeats": 4, "num_eval_images": 1},
        "train": {"steps": steps, "batch_size": 4, "grad_accum_steps": 2, "log_every": 100, "image_every": 100,
                  "eval_every": 100, "checkpoint_every": 100, "tracker": "none", "progress_bar": False,
                  "mixed_precision": mixed_precision, "ema_decay": 0.99},
    }


class SyncTrap:
    """Wraps a loop's reduce_window_flags: sync debug mode "error" from the end of flag read `armed_after`
    to the start of the next one, i.e. over one whole step (update, EMA, next batch, forwards, backwards)."""

    def __init__(self, reduce_window_flags, armed_after: int):
        self.inner, self.armed_after, self.calls, self.closed = reduce_window_flags, armed_after, 0, False

    def __call__(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")  # the window's one documented read
        if self.calls == self.armed_after + 1:
            self.closed = True
        self.calls += 1
        flags = self.inner(*args, **kwargs)
        if self.calls == self.armed_after + 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        return flags


def test_tokenizer_step_has_no_host_sync_besides_the_window_flag(tmp_path, monkeypatch):
    import vqgan.train as trainer
    import vqgan.training.tokenizer_step as tokenizer_step  # the loop's step, which reads the window's flags

    trap = SyncTrap(tokenizer_step.reduce_window_flags, armed_after=WARMUP_WINDOWS)
    monkeypatch.setattr(tokenizer_step, "reduce_window_flags", trap)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tokenizer_recipe(tmp_path / "run", "bf16", steps=WARMUP_WINDOWS + 2)))
    summary = trainer.main([str(path)])  # a sync inside the trapped step raises RuntimeError here, at its site
    assert trap.closed and summary["step"] == WARMUP_WINDOWS + 2


@pytest.mark.parametrize("prior", ["transformer", "maskgit"])
def test_prior_step_has_no_host_sync_besides_the_window_flag(tmp_path, monkeypatch, prior):
    import vqgan.train_prior as trainer

    tokens = torch.randint(0, 32, (64, 4, 4), generator=torch.Generator().manual_seed(0))
    save_token_dataset(tmp_path / "tokens", tokens, None, {"num_codes": 32, "grid": [4, 4], "tokenizer_hash": "t"})
    recipe = {
        "run_dir": str(tmp_path / "run"), "prior": prior,
        prior: {"num_codes": 32, "grid": [4, 4], "dim": 32, "depth": 2, "heads": 2},
        "tokens": {"path": str(tmp_path / "tokens")},
        "train": {"steps": WARMUP_WINDOWS + 2, "batch_size": 8, "grad_accum_steps": 2, "log_every": 100,
                  "checkpoint_every": 100, "tracker": "none", "progress_bar": False, "mixed_precision": "bf16",
                  "ema_decay": 0.99},
    }
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trap = SyncTrap(trainer.reduce_window_flags, armed_after=WARMUP_WINDOWS)
    monkeypatch.setattr(trainer, "reduce_window_flags", trap)
    summary = trainer.main([str(path)])
    assert trap.closed and summary["step"] == WARMUP_WINDOWS + 2


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite(tmp_path, mixed_precision):
    from vqgan.train import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tokenizer_recipe(tmp_path / "run", mixed_precision, steps=6)))
    summary = main([str(path)])
    assert summary["step"] == 6 and summary["nonfinite_steps"] == 0
    assert all(math.isfinite(value) for value in summary["train"].values()), summary["train"]
    tokenizer = VQTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert all(torch.isfinite(p).all() for p in tokenizer.parameters())


KINDS = {
    "vq l2 low-dim": dict(kind="vq", code_dim=4, l2_normalize=True),
    "simvq": dict(kind="simvq"),
    "ibq": dict(kind="ibq", entropy_weight=0.05, entropy_temperature=0.01),
    "fsq": dict(kind="fsq", entropy_weight=0.1, entropy_temperature=0.1),
    "lfq": dict(kind="lfq", entropy_weight=0.1, entropy_temperature=0.01),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", KINDS)
def test_quantizers_search_in_fp32_under_cuda_autocast(case, dtype):
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(num_codes=64, dim=8, **KINDS[case])).cuda()
    q(torch.randn(4, 8, 4, 4, device="cuda"))  # a training forward: k-means init where the kind has it
    q.eval()
    z = torch.randn(3, 8, 4, 4, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        out = q(z)
    assert torch.equal(out.indices, q(z.float()).indices)  # the same search as fp32 on the same inputs
    assert out.loss.dtype == torch.float32


@pytest.fixture
def no_tf32():
    """fp32 convolutions on CUDA, as on the CPU (cuDNN's default is TF32); matmuls are fp32 by default."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def test_encode_decode_on_cuda_equal_the_cpu_within_tolerance(no_tf32):
    assert torch.get_float32_matmul_precision() == "highest"
    torch.manual_seed(0)
    cpu = VQTokenizer.from_model(VQModel(preset("imagenet256_f16_l2")).eval())
    gpu = VQTokenizer.from_model(VQModel(preset("imagenet256_f16_l2")).eval())
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    ids = cpu.encode(images)  # (2, 16, 16)
    ids_gpu = gpu.encode(images.cuda()).cpu()
    agree = (ids == ids_gpu).float().mean().item()
    assert agree >= 0.99, f"CUDA ids equal the CPU's on {agree:.2%} of tokens"
    diff = (cpu.decode(ids) - gpu.decode(ids.cuda()).cpu()).abs().max().item()
    assert diff <= 1e-3, f"decoded images differ by up to {diff:.2e}"
