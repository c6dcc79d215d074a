"""End-to-end training runs on tiny configs: checkpoints, export, exact resume, DDP, bf16, messy data."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from vqgan.training.checkpoint import list_checkpoints, read_train_state
from vqgan.tokenizer import VQTokenizer
from vqgan.autoencoder import VQModel
from vqgan.config import ConfigError
from vqgan.train import load_train_config, main

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(run_dir: Path, **sections) -> dict:
    recipe = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "quantizer": {"num_codes": 64}},
        "discriminator": {"base_channels": 16, "num_layers": 2, "norm": "group"},
        "loss": {"perceptual_weight": 0.0, "disc_start": 1},
        "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},
        "train": {"steps": 4, "batch_size": 4, "log_every": 1, "image_every": 2, "eval_every": 2,
                  "checkpoint_every": 2, "keep_checkpoints": 5, "tracker": "none", "progress_bar": False,
                  "mixed_precision": "no", "export_with_checkpoint": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean slate."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)  # train.deterministic sets it process-wide


def assert_same_checkpoint(expected: Path, found: Path) -> None:
    """The generator, its EMA and the discriminator of two checkpoints hold equal tensors, key for key."""
    for name in ("generator.safetensors", "generator_ema.safetensors", "model_1.safetensors"):
        a, b = load_file(expected / name), load_file(found / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


def run(recipe_path: Path, *overrides: str) -> dict:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main([str(recipe_path), *overrides])


def test_end_to_end_checkpoints_export_and_auto_resume(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", train={"tracker": "tensorboard", "export_with_checkpoint": True})
    path = write_recipe(tmp_path, recipe)
    summary = run(path)
    run_dir = tmp_path / "run"
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [read_train_state(c)["step"] for c in checkpoints] == [2, 4]
    for name in ("generator.safetensors", "generator_ema.safetensors", "vqmodel_config.json", "model.safetensors",
                 "optimizer.bin", "tokenizer/model.safetensors"):
        assert (checkpoints[-1] / name).is_file(), name
    assert list((run_dir / "images").glob("reconstructions_*.png"))
    assert list(run_dir.rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert (run_dir / "config.yaml").is_file() and summary["step"] == 4
    assert "perceptual term off" not in (run_dir / "config.yaml").read_text()  # weight 0 by choice, no note

    tokenizer = VQTokenizer.from_pretrained(run_dir / "tokenizer")
    images = torch.rand(2, 3, 32, 32)
    ids = tokenizer.encode(images)
    assert ids.shape == (2, 8, 8) and int(ids.max()) < 64
    assert tokenizer.decode(ids).shape == (2, 3, 32, 32)

    # resume=auto continues from the newest checkpoint instead of starting over
    summary = run(path, "train.steps=6")
    assert summary["step"] == 6
    assert [read_train_state(c)["step"] for c in list_checkpoints(run_dir / "checkpoints")] == [2, 4, 6]
    assert read_train_state(list_checkpoints(run_dir / "checkpoints")[-1])["batches_seen"] == 6


def test_exact_resume_is_bit_identical(tmp_path):
    """4 steps straight == 2 steps, 'crash', resume from the step-2 checkpoint, 2 more steps."""
    sections = {
        "model": {"preset": "tiny", "quantizer": {"num_codes": 64, "kmeans_init": True, "dead_code_threshold": 1}},
        "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},  # 12 crops: 3 steps an epoch
        "optim": {"schedule": "cosine", "warmup_steps": 1},
    }
    straight = write_recipe(tmp_path, tiny_recipe(tmp_path / "straight", **sections), "a.yaml")
    resumed = write_recipe(tmp_path, tiny_recipe(tmp_path / "resumed", **sections), "b.yaml")
    run(straight)
    run(resumed)
    final = tmp_path / "resumed" / "checkpoints" / "checkpoint-0000004"
    # the run is killed after step 2: its last checkpoint disappears, and training resumes
    shutil.rmtree(final)
    run(resumed)
    assert_same_checkpoint(tmp_path / "straight" / "checkpoints" / "checkpoint-0000004", final)


def test_bf16_mixed_precision_trains_with_finite_losses(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path / "run", train={"mixed_precision": "bf16", "steps": 3}))
    summary = run(path)
    assert summary["nonfinite_steps"] == 0
    assert summary["train"]["rec"] > 0 and all(math.isfinite(v) for v in summary["train"].values())
    assert "d_loss" in summary["train"]  # the discriminator ran under autocast too


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(path)


def test_messy_folder_trains_and_reports_one_skipped_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _png(folder / "rgb.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    _png(folder / "gray.png", rng.integers(0, 255, (48, 48), dtype=np.uint8))
    _png(folder / "rgba.png", rng.integers(0, 255, (48, 48, 4), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 65535, (48, 48), dtype=np.uint16)).save(folder / "deep16.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    recipe = tiny_recipe(tmp_path / "run", data={"source": str(folder), "image_size": 32, "num_eval_images": 1},
                         train={"steps": 3, "batch_size": 2})
    recipe["data"].pop("embedded_repeats")
    recipe["data"].pop("resize")
    summary = run(write_recipe(tmp_path, recipe))
    assert summary["step"] == 3
    # 3 steps of 2 images span two epochs: corrupt.png is met twice but is one unreadable file
    assert summary["skipped_files"] == 1
    assert summary["skipped_file_names"] == [str(folder / "corrupt.png")]


def test_unknown_recipe_key_fails_naming_it(tmp_path):
    recipe = tiny_recipe(tmp_path / "run")
    recipe["train"]["checkpoint_evry"] = 5
    result = subprocess.run([sys.executable, "-m", "vqgan.train", str(write_recipe(tmp_path, recipe))],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "train.checkpoint_evry" in result.stderr and "checkpoint_every" in result.stderr


DDP_WRAPPER = """
import sys
import vqgan.train as train
from safetensors.torch import save_file

original = train.save_checkpoint

def save_and_dump(accelerator, root, state, config, write_extra, keep_last):
    path = original(accelerator, root, state, config, write_extra, keep_last)
    for i, model in enumerate(accelerator._models):
        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, f"{root}/rank{accelerator.process_index}_model{i}_step{state.step}.safetensors")
    return path

train.save_checkpoint = save_and_dump
train.main(sys.argv[1:])
"""


def train_on_two_ranks(tmp_path: Path, recipe: dict) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of vqgan.train on `recipe` under DDP_WRAPPER (each rank
    dumps its modules at every checkpoint); fails the test on a non-zero exit."""
    from test_fid_distributed import free_port

    wrapper = tmp_path / "ddp_wrapper.py"
    wrapper.write_text(DDP_WRAPPER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(wrapper), str(write_recipe(tmp_path, recipe))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_ranks_identical(checkpoints: Path, step: int) -> None:
    """Every tensor of the generator (0) and the discriminator (1) that the two ranks dumped at `step` is equal."""
    for model_index in (0, 1):
        a = load_file(checkpoints / f"rank0_model{model_index}_step{step}.safetensors")
        b = load_file(checkpoints / f"rank1_model{model_index}_step{step}.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), f"model {model_index} {key} differs between ranks"


@pytest.mark.slow
def test_two_process_ddp_keeps_codebooks_and_weights_identical(tmp_path):
    recipe = tiny_recipe(
        tmp_path / "run",
        model={"preset": "tiny", "quantizer": {"num_codes": 64, "use_ema": True, "kmeans_init": True,
                                               "dead_code_threshold": 1}},
        train={"steps": 3, "checkpoint_every": 3},
    )
    result = train_on_two_ranks(tmp_path, recipe)
    recipe_path = tmp_path / "recipe.yaml"
    assert "2 processes" in result.stdout
    root = tmp_path / "run" / "checkpoints"
    assert_ranks_identical(root, step=3)  # generator (with its EMA codebook), discriminator
    generator = load_file(root / "rank0_model0_step3.safetensors")
    assert bool(generator["quantizer.initialized"])  # k-means ran (on gathered data, broadcast)
    assert int(generator["quantizer.step"]) == 3 and generator["quantizer.cluster_size"].sum() > 0  # EMA updated
    fresh = VQModel(load_train_config(str(recipe_path), []).model).state_dict()
    assert not torch.equal(generator["quantizer.weight"], fresh["quantizer.weight"])  # the codebook moved
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["nonfinite_steps"] == 0


def test_missing_lpips_weights_train_without_the_term_and_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VQGAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("VQGAN_VGG16_WEIGHTS", raising=False)
    recipe = tiny_recipe(tmp_path / "run", loss={"perceptual_weight": 1.0, "disc_start": 1}, train={"steps": 1})
    summary = run(write_recipe(tmp_path, recipe))
    assert summary["step"] == 1
    assert capsys.readouterr().out.count("LPIPS weights are not available") == 1
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["loss"]["perceptual_weight"] == 0.0
    assert any("perceptual term off" in note for note in resolved["notes"])
    # a recipe that requires the perceptual term stops instead of training without it
    recipe["train"]["require_lpips"] = True
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        run(write_recipe(tmp_path, recipe, "strict.yaml"))


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    import vqgan.training.gan_step as train_module

    real_loss = train_module.generator_loss
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        total, logs = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (total * float("nan"), logs) if calls["n"] == 2 else (total, logs)

    monkeypatch.setattr(train_module, "generator_loss", nan_on_second_call)
    summary = run(write_recipe(tmp_path, tiny_recipe(tmp_path / "once", train={"steps": 3})))
    assert summary["step"] == 3 and summary["nonfinite_steps"] == 1
    assert summary["train"]["nonfinite_steps"] == 1

    def always_nan(*args, **kwargs):
        total, logs = real_loss(*args, **kwargs)
        return total * float("nan"), logs

    monkeypatch.setattr(train_module, "generator_loss", always_nan)
    recipe = tiny_recipe(tmp_path / "always", train={"steps": 3, "max_nonfinite_in_row": 2})
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row at step 0"):
        run(write_recipe(tmp_path, recipe))


def test_resume_from_a_missing_folder_says_so(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        run(path, f"train.resume={tmp_path / 'nope'}")


def test_bf16_trains_many_steps_with_the_discriminator_on(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", loss={"perceptual_weight": 0.0, "disc_start": 5, "lecam_weight": 0.1},
                         train={"mixed_precision": "bf16", "steps": 30, "log_every": 5, "eval_every": 30,
                                "checkpoint_every": 30})
    summary = run(write_recipe(tmp_path, recipe))
    assert summary["step"] == 30 and summary["nonfinite_steps"] == 0 and summary["overflow_steps"] == 0
    assert all(math.isfinite(v) for v in summary["train"].values())
    assert summary["train"]["adaptive_weight"] > 0 and summary["train"]["d_loss"] > 0


def test_accumulation_window_discarded_whole_when_one_micro_batch_is_nonfinite(tmp_path, monkeypatch):
    import vqgan.training.gan_step as gan_step

    real_loss = gan_step.generator_loss
    calls = {"n": 0}

    def nan_on_third_micro_batch(*args, **kwargs):
        total, logs = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (total * float("nan"), logs) if calls["n"] == 3 else (total, logs)  # window 2, first micro-batch

    monkeypatch.setattr(gan_step, "generator_loss", nan_on_third_micro_batch)
    recipe = tiny_recipe(tmp_path / "run", train={"steps": 3, "batch_size": 2, "grad_accum_steps": 2,
                                                  "checkpoint_every": 3})
    summary = run(write_recipe(tmp_path, recipe))
    assert summary["step"] == 3 and summary["nonfinite_steps"] == 1  # one window, not one micro-batch
    state = read_train_state(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert state["batches_seen"] == 8 and state["nonfinite_in_row"] == 0  # 4 windows of 2 drawn, 3 kept
    assert calls["n"] == 8


def test_compiled_training_checkpoints_exports_and_resumes(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", train={"compile": True, "steps": 3, "checkpoint_every": 2,
                                                  "export_with_checkpoint": True, "ema_decay": 0.99})
    path = write_recipe(tmp_path, recipe)
    summary = run(path)
    assert summary["step"] == 3
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    ema = load_file(checkpoint / "generator_ema.safetensors")
    assert not any("_orig_mod" in key for key in ema)  # compiled in place: the keys are the module's own
    VQTokenizer.from_pretrained(checkpoint / "tokenizer")
    VQTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert run(path, "train.steps=4")["step"] == 4  # and it resumes compiled


def test_compile_with_r1_is_refused_with_the_reason(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", train={"compile": True}, loss={"r1_weight": 1.0, "perceptual_weight": 0.0})
    with pytest.raises(ConfigError, match="r1_weight"):
        run(write_recipe(tmp_path, recipe))


def test_early_ema_export_tracks_the_live_model(tmp_path):
    """At decay 0.9999 a plain EMA would be ~all initial weights after 3 steps; the warm-up EMA follows the model."""
    recipe = tiny_recipe(tmp_path / "run", model={"preset": "tiny", "quantizer": {"num_codes": 64, "kmeans_init": True}},
                         train={"steps": 3, "checkpoint_every": 3, "ema_decay": 0.9999, "export_with_checkpoint": True,
                                "deterministic": True})
    path = write_recipe(tmp_path, recipe)
    run(path)
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    live = load_file(checkpoint / "generator.safetensors")
    exported = load_file(checkpoint / "tokenizer" / "model.safetensors")
    torch.manual_seed(0)
    initial = VQModel(load_train_config(str(path), []).model).state_dict()
    assert set(exported) < set(live)  # the folder leaves the quantizer's training state out
    weights = [k for k in exported if exported[k].is_floating_point()]
    to_live = sum(float((exported[k].float() - live[k].float()).norm()) for k in weights)
    to_init = sum(float((initial[k].float() - live[k].float()).norm()) for k in weights)
    assert to_live < 0.25 * to_init, (to_live, to_init)
    # the codebook the EMA exports is the k-means one the model trained from, not the random init
    codes = "quantizer.weight"
    assert float((exported[codes] - live[codes]).norm()) < 0.1 * float((initial[codes] - live[codes]).norm())


def test_resume_refuses_a_changed_model_and_records_other_changes(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path / "run", train={"steps": 2, "checkpoint_every": 2}))
    run(path)
    with pytest.raises(ConfigError, match=r"model\.quantizer\.num_codes: 64 in the checkpoint, 128 now"):
        run(path, "train.steps=4", "model.quantizer.num_codes=128")
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        run(path, "train.steps=4", "data.image_size=16")
    summary = run(path, "train.steps=4", "optim.lr=0.0002")
    assert summary["step"] == 4 and summary["train"]["lr"] == 0.0002  # applied, not only recorded
    changes = [json.loads(line) for line in (tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["step"] == 2
    assert changes[-1]["changes"] == {"optim.lr": {"was": 0.0001, "now": 0.0002}, "train.steps": {"was": 2, "now": 4}}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["lr"] == 0.0002
    # a finished run resumed again changes nothing and says so
    assert run(path, "train.steps=4", "optim.lr=0.0002")["step"] == 4
    # starting over keeps the earlier checkpoints, out of the way
    assert run(path, "train.steps=1", "train.resume=", "train.checkpoint_every=1")["step"] == 1
    assert [read_train_state(c)["step"] for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
    assert len(list((tmp_path / "run").glob("checkpoints.replaced-*"))) == 1


SHARED_FS_CHECK = """
import sys
from pathlib import Path
from accelerate import Accelerator
from vqgan.training.run import check_shared_filesystem

accelerator = Accelerator(cpu=True)
# each process looks at its own folder: what a node without the shared filesystem would see
folder = Path(sys.argv[1]) / (f"rank{accelerator.process_index}" if sys.argv[2] == "split" else "shared")
try:
    check_shared_filesystem(accelerator, folder)
    print(f"rank {accelerator.process_index}: shared ok")
except RuntimeError as err:
    print(f"rank {accelerator.process_index}: {err}")
accelerator.end_training()  # destroys the process group: a clean exit
"""


@pytest.mark.slow
def test_a_run_dir_not_shared_by_every_process_fails_at_start(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SHARED_FS_CHECK)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for mode, expected in (("shared", "shared ok"), ("split", "cannot see files the main process writes")):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29523", str(script), str(tmp_path), mode]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count(expected) == 2, result.stdout  # every process says the same
    assert not list(tmp_path.rglob(".shared-check-*"))
