"""SIGKILL real training processes at random moments (and at the worst ones), resume, compare bit for bit.

Each test trains a tiny run uninterrupted, then the same run again under a killer: the process is
started with the defaults (`train.resume=auto`, checkpoint export on), killed with SIGKILL after a
random delay, restarted, killed again, ... and finally left to finish. Targeted kills land inside a
checkpoint write (after Accelerate's files, before the folder is renamed), inside the tokenizer
export, and inside a prune. The final checkpoint and the exported tokenizer must equal the
uninterrupted run's bitwise. The recipes run over many epochs with every stateful option on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqgan.prior.data import save_token_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TOKENIZER_RECIPE = {
    # 12 crops, batch 4, 2 micro-batches a step: an epoch every 1.5 steps, 66 epochs in 100 steps
    "model": {"preset": "tiny", "quantizer": {"num_codes": 64, "kmeans_init": True, "dead_code_threshold": 2,
                                              "use_ema": True}},
    "discriminator": {"base_channels": 16, "num_layers": 2},  # BatchNorm: running statistics to keep too
    "loss": {"perceptual_weight": 0.0, "disc_start": 15, "lecam_weight": 0.1, "r1_weight": 0.1},
    "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},
    "optim": {"schedule": "cosine", "warmup_steps": 3, "weight_decay": 0.01},
    "train": {"steps": 100, "batch_size": 4, "grad_accum_steps": 2, "log_every": 5, "image_every": 20,
              "eval_every": 10, "checkpoint_every": 7, "keep_checkpoints": 2, "tracker": "none",
              "progress_bar": False, "mixed_precision": "no", "ema_decay": 0.999},
}

PRIOR_RECIPE = {
    "prior": "transformer",
    "transformer": {"num_codes": 16, "grid": [8, 8], "num_classes": 3, "dim": 64, "depth": 3, "heads": 2,
                    "dropout": 0.1, "class_dropout": 0.1, "positions": "rope2d"},
    "optim": {"lr": 1e-3, "warmup_steps": 5, "schedule": "cosine", "weight_decay": 0.01},
    "train": {"steps": 400, "batch_size": 8, "grad_accum_steps": 2, "log_every": 5, "checkpoint_every": 23,
              "keep_checkpoints": 2, "tracker": "none", "progress_bar": False, "mixed_precision": "no",
              "ema_decay": 0.99},
}

# Runs the trainer with SIGKILL wired into the moment named by $VQGAN_TEST_KILL (once, at the Nth call).
KILLER = """
import os, signal, sys
import vqgan.training.checkpoint as checkpoint

where, nth = os.environ.get("VQGAN_TEST_KILL", "none:0").split(":")
calls = {"n": 0}

def kill_at(name, function):
    def wrapped(*args, **kwargs):
        if where == name:
            calls["n"] += 1
            if calls["n"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapped

checkpoint.atomic_write_text = kill_at("checkpoint-write", checkpoint.atomic_write_text)  # before the rename
original_remove = checkpoint._remove

def remove_and_die(folder):
    # mid-prune: the old folder renamed aside and half deleted when the process dies
    calls["n"] += where == "prune"
    if where == "prune" and calls["n"] == int(nth):
        trash = folder.with_name(checkpoint.TRASH_PREFIX + folder.name)
        os.replace(folder, trash)
        for path in sorted(trash.rglob("*.safetensors"))[::2]:
            path.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return original_remove(folder)

checkpoint._remove = remove_and_die
if where == "export":
    import vqgan.train
    vqgan.train.export_checkpoint = kill_at("export", vqgan.train.export_checkpoint)
module = sys.argv.pop(1)
if module == "tokenizer":
    import vqgan.train as trainer
else:
    import vqgan.train_prior as trainer
trainer.main(sys.argv[1:])
"""


def write_recipe(path: Path, recipe: dict, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**recipe, "run_dir": str(run_dir)}))
    return path


def command(tmp_path: Path, trainer: str, recipe: Path, processes: int, port: int) -> list[str]:
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    if processes == 1:
        return [sys.executable, str(killer), trainer, str(recipe)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(killer), trainer, str(recipe)]


def environment(kill: str = "none:0") -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "VQGAN_TEST_KILL": kill}


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a run and every process under it at once, as a crashed machine would.

    torchrun starts each rank in a session of its own, so killing the launcher's process group would
    leave the ranks running as orphans: collect the whole tree first.
    """
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def run_once(cmd: list[str], kill: str) -> subprocess.CompletedProcess:
    """Run to the end, then SIGKILL whatever of it is left (a rank orphaned by a kill inside the run)."""
    process = subprocess.Popen(cmd, cwd=ROOT, env=environment(kill), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:
        kill_tree(process)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def run_to_end(cmd: list[str], kill: str = "none:0") -> subprocess.CompletedProcess:
    for _ in range(3):
        result = run_once(cmd, kill)
        # gloo's rendezvous on a loaded 2-core machine sometimes times out before any training starts
        if "connectFullMesh failed" not in result.stderr:
            break
    return result


def newest_step(root: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in root.glob("checkpoint-*") if (p / "train_state.json").is_file()]
    return max(steps, default=-1)


def run_and_kill(cmd: list[str], checkpoints: Path, extra: float) -> bool:
    """Start the run; once it has written a new checkpoint, SIGKILL it `extra` s later; -> killed mid-run.

    Waiting for a checkpoint makes every kill land after real progress (start-up times vary with the
    machine's load); the random `extra` puts the kill anywhere in the steps, evaluations, exports,
    checkpoint writes and prunes that follow.
    """
    before = newest_step(checkpoints)
    process = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while process.poll() is None and newest_step(checkpoints) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=extra)
    finished = process.poll() is not None
    kill_tree(process)
    return not finished


def assert_same_run(reference: Path, resumed: Path, final_step: int) -> int:
    """The final checkpoints and exported folders of two run folders are bitwise equal; -> tensors compared."""
    name = f"checkpoint-{final_step:07d}"
    a, b = reference / "checkpoints" / name, resumed / "checkpoints" / name
    assert json.loads((a / "train_state.json").read_text()) == json.loads((b / "train_state.json").read_text())
    compared = 0
    for path in sorted(a.rglob("*.safetensors")) + sorted(reference.glob("*/model.safetensors")):
        other = resumed / path.relative_to(reference)
        x, y = load_file(path), load_file(other)
        assert x.keys() == y.keys(), path
        for key in x:
            assert torch.equal(x[key], y[key]), f"{path.relative_to(reference)}:{key} differs after the kills"
            compared += 1
    for path in sorted(a.glob("*.bin")):  # optimizer, scheduler (and scaler) states
        x = torch.load(path, weights_only=True)
        y = torch.load(b / path.name, weights_only=True)
        assert str(x) == str(y), f"{path.name} differs after the kills"
    assert not list((resumed / "checkpoints").glob(".*")), "a temporary or half-deleted folder was left behind"
    return compared


def kill_and_resume(tmp_path: Path, trainer: str, recipe: dict, steps: int, processes: int, kills: int,
                    targeted: tuple[str, ...], seed: int, port: int = 29531) -> tuple[int, int, float]:
    """Reference run, then the killed one; -> (kills that landed mid-run, tensors compared, seconds)."""
    started = time.perf_counter()
    reference_cmd = command(tmp_path, trainer, write_recipe(tmp_path / "a.yaml", recipe, tmp_path / "ref"),
                            processes, port)
    result = run_to_end(reference_cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete" in run_to_end(reference_cmd).stdout  # a finished run resumed does nothing
    killed_cmd = command(tmp_path, trainer, write_recipe(tmp_path / "b.yaml", recipe, tmp_path / "killed"),
                         processes, port)
    landed = 0
    for where in targeted:  # SIGKILL from inside, at the worst moments of the first checkpoint each process writes
        result = run_to_end(killed_cmd, kill=where)
        fired = result.returncode == -signal.SIGKILL if processes == 1 else "SIGKILL" in result.stderr
        assert fired, f"{where}: the run did not die by SIGKILL (rc {result.returncode}): {result.stderr[-2000:]}"
        landed += 1
    rng = random.Random(seed)
    for _ in range(kills):  # and from outside, at random moments of the run
        if (tmp_path / "killed" / "summary.json").is_file():
            break
        extra = rng.uniform(0.0, 1.5)
        hit = run_and_kill(killed_cmd, tmp_path / "killed" / "checkpoints", extra)
        landed += hit
        print(f"kill {extra:.2f} s after a new checkpoint: {'landed' if hit else 'the run had finished'}; "
              f"newest checkpoint now step {newest_step(tmp_path / 'killed' / 'checkpoints')}")
    result = run_to_end(killed_cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    compared = assert_same_run(tmp_path / "ref", tmp_path / "killed", steps)
    return landed, compared, time.perf_counter() - started


def test_tokenizer_killed_at_random_moments_resumes_bit_identical(tmp_path):
    landed, compared, seconds = kill_and_resume(
        tmp_path, "tokenizer", TOKENIZER_RECIPE, 100, processes=1, kills=6,
        targeted=("checkpoint-write:2", "export:1", "prune:1"), seed=0)
    print(f"tokenizer, 1 process: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 6 and compared > 100


def prior_recipe(tmp_path: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (64, 8, 8), generator=generator)  # 4 steps an epoch, 100 epochs
    labels = torch.randint(0, 3, (64,), generator=generator)
    save_token_dataset(tmp_path / "tokens", tokens, labels, {"num_codes": 16, "grid": [8, 8], "tokenizer_hash": "test"})
    return {**PRIOR_RECIPE, "tokens": {"path": str(tmp_path / "tokens")}}


def test_prior_killed_at_random_moments_resumes_bit_identical(tmp_path):
    landed, compared, seconds = kill_and_resume(
        tmp_path, "prior", prior_recipe(tmp_path), 400, processes=1, kills=8,
        targeted=("checkpoint-write:2", "prune:1"), seed=1)
    print(f"prior, 1 process: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 6 and compared > 10


def test_two_process_tokenizer_killed_at_random_moments_resumes_bit_identical(tmp_path):
    landed, compared, seconds = kill_and_resume(
        tmp_path, "tokenizer", TOKENIZER_RECIPE, 100, processes=2, kills=8, targeted=("checkpoint-write:2",),
        seed=2, port=29541)
    print(f"tokenizer, 2 processes: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 6 and compared > 100


def test_two_process_prior_killed_at_random_moments_resumes_bit_identical(tmp_path):
    landed, compared, seconds = kill_and_resume(
        tmp_path, "prior", prior_recipe(tmp_path), 400, processes=2, kills=6, targeted=("prune:1",), seed=3,
        port=29551)
    print(f"prior, 2 processes: {landed} kills landed, {compared} tensors equal, {seconds:.0f} s")
    assert landed >= 6 and compared > 10
