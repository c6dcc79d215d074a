"""Resume on another number of processes or batch size: weights from unwrapped names, data position through samples.

The multi-process runs are real gloo DDP (`accelerate launch --multi_gpu --num_processes 2` on CPU).
A wrapper dumps, on every rank, the weights each model holds right after the resume, which must equal
the checkpoint's files; the run then trains on and writes the next checkpoint, which the other world
size resumes in turn (2 -> 1 -> 2 processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from vqgan.errors import DataError
from vqgan.prior.data import save_token_dataset
from vqgan.training.batches import convert_position, map_layout, resumable_batches
from vqgan.training.checkpoint import load_model_weights, read_train_state
from vqgan.training.state import TrainState

ROOT = Path(__file__).resolve().parents[1]

# Runs a trainer and, right after its resume, saves what every prepared model holds on this rank.
# On GPUs (DistributedType.MULTI_GPU) Accelerate keeps the DDP wrapper in its model list, so save_state
# writes `module.*` names and load_state loads into the wrapper; with gloo on CPU (MULTI_CPU) it keeps
# the bare module and the names never differ. The wrapper makes a CPU run keep the wrapper as a GPU run does.
DUMP_AFTER_RESUME = """
import os, sys
from pathlib import Path
from safetensors.torch import save_file
from accelerate import Accelerator

prepare_model = Accelerator.prepare_model

def prepare_model_as_on_gpus(self, model, *args, **kwargs):
    wrapped = prepare_model(self, model, *args, **kwargs)
    if self.num_processes > 1 and self._models and self._models[-1] is model:
        self._models[-1] = wrapped
    return wrapped

Accelerator.prepare_model = prepare_model_as_on_gpus

trainer_name = sys.argv.pop(1)
if trainer_name == "tokenizer":
    import vqgan.train as trainer
else:
    import vqgan.train_prior as trainer
original = trainer.resume

def resume_and_dump(accelerator, *args, **kwargs):
    path = original(accelerator, *args, **kwargs)
    if path is not None:
        out = Path(os.environ["VQGAN_TEST_DUMP"])
        out.mkdir(parents=True, exist_ok=True)
        for i, model in enumerate(accelerator._models):
            state = accelerator.unwrap_model(model).state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      out / f"{Path(path).name}_rank{accelerator.process_index}_model{i}.safetensors")
    return path

trainer.resume = resume_and_dump
trainer.main(sys.argv[1:])
"""

TOKENIZER_RECIPE = {
    "model": {"preset": "tiny", "quantizer": {"num_codes": 64, "kmeans_init": True, "dead_code_threshold": 1}},
    "discriminator": {"base_channels": 16, "num_layers": 2},  # BatchNorm: running statistics restore too
    "loss": {"perceptual_weight": 0.0, "disc_start": 1, "lecam_weight": 0.1},
    "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},  # 12 crops an epoch
    "train": {"steps": 2, "batch_size": 2, "log_every": 1, "image_every": 100, "eval_every": 100,
              "checkpoint_every": 2, "keep_checkpoints": 5, "tracker": "none", "progress_bar": False,
              "mixed_precision": "no", "export_with_checkpoint": False, "ema_decay": 0.9},
}

PRIOR_RECIPE = {
    "prior": "transformer",
    "transformer": {"num_codes": 16, "grid": [4, 4], "num_classes": 3, "dim": 32, "depth": 2, "heads": 2},
    "train": {"steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5,
              "tracker": "none", "progress_bar": False, "mixed_precision": "no", "ema_decay": 0.9},
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def launch(tmp_path: Path, trainer: str, recipe: dict, processes: int, *overrides: str, port: int = 29563):
    """Run `trainer` on `processes` CPU processes (gloo DDP when 2), dumping the weights it resumed with."""
    recipe_path = tmp_path / f"{trainer}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    wrapper = tmp_path / "dump_after_resume.py"
    wrapper.write_text(DUMP_AFTER_RESUME)
    if processes == 1:
        command = [sys.executable, str(wrapper), trainer, str(recipe_path), *overrides]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), str(wrapper), trainer, str(recipe_path), *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "VQGAN_TEST_DUMP": str(tmp_path / "resumed")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def assert_resumed_weights(tmp_path: Path, checkpoint: Path, files: list[str], processes: int) -> None:
    """Every rank's models right after the resume equal the checkpoint's files, tensor for tensor."""
    for rank in range(processes):
        for index, name in enumerate(files):
            saved = load_file(checkpoint / name)
            resumed = load_file(tmp_path / "resumed" / f"{checkpoint.name}_rank{rank}_model{index}.safetensors")
            assert saved.keys() == resumed.keys(), name
            for key in saved:
                assert torch.equal(saved[key], resumed[key]), f"rank {rank} {name}:{key} not restored"


def assert_unwrapped_names(checkpoint: Path) -> None:
    for path in checkpoint.glob("model*.safetensors"):
        assert not [k for k in load_file(path) if k.startswith(("module.", "_orig_mod."))], path


@pytest.mark.slow
def test_tokenizer_checkpoint_resumes_on_two_then_one_then_two_processes(tmp_path):
    recipe = {**TOKENIZER_RECIPE, "run_dir": str(tmp_path / "run")}
    root = tmp_path / "run" / "checkpoints"
    launch(tmp_path, "tokenizer", recipe, 2)  # 2 processes x 2 images: 3 batches per process per epoch
    two = root / "checkpoint-0000002"
    assert_unwrapped_names(two)
    assert read_train_state(two)["data_layout"] == {"processes": 2, "batch_size": 2, "batches_per_epoch": 3}
    generator = load_file(two / "generator.safetensors")
    model = load_file(two / "model.safetensors")
    assert model.keys() == generator.keys() and all(torch.equal(model[k], generator[k]) for k in model)

    # 2 -> 1 process, batch 4 (the same 4 images a step): 8 images drawn = batch 2 of the new layout
    result = launch(tmp_path, "tokenizer", recipe, 1, "train.batch_size=4", "train.steps=4")
    assert "written by 2 processes, this run has 1" in result.stdout
    assert "processes 2 -> 1, train.batch_size 2 -> 4; batch 2 of the saved layout is batch 2" in result.stdout
    assert_resumed_weights(tmp_path, two, ["model.safetensors", "model_1.safetensors"], 1)
    four = root / "checkpoint-0000004"
    assert read_train_state(four)["batches_seen"] == 4
    assert read_train_state(four)["data_layout"] == {"processes": 1, "batch_size": 4, "batches_per_epoch": 3}

    # 1 -> 2 processes, batch 2: epoch 1 after 4 images = batch 3 + 1 of the new layout
    result = launch(tmp_path, "tokenizer", recipe, 2, "train.steps=6", port=29567)
    assert "written by 1 processes, this run has 2" in result.stdout
    assert_resumed_weights(tmp_path, four, ["model.safetensors", "model_1.safetensors"], 2)
    assert read_train_state(root / "checkpoint-0000006")["step"] == 6


@pytest.mark.slow
def test_prior_checkpoint_resumes_on_two_then_one_then_two_processes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (64, 4, 4), generator=generator)
    labels = torch.randint(0, 3, (64,), generator=generator)
    save_token_dataset(tmp_path / "tokens", tokens, labels, {"num_codes": 16, "grid": [4, 4], "tokenizer_hash": "t"})
    recipe = {**PRIOR_RECIPE, "run_dir": str(tmp_path / "run"), "tokens": {"path": str(tmp_path / "tokens")}}
    root = tmp_path / "run" / "checkpoints"
    launch(tmp_path, "prior", recipe, 2, port=29571)  # 64 grids / (4 x 2): 8 batches per process per epoch
    three = root / "checkpoint-0000003"
    assert_unwrapped_names(three)
    assert read_train_state(three)["data_layout"] == {"processes": 2, "batch_size": 4, "batches_per_epoch": 8}

    # 2 -> 1 process, batch 8: 24 grids drawn = batch 3 of the new layout
    result = launch(tmp_path, "prior", recipe, 1, "train.batch_size=8", "train.steps=6")
    assert "written by 2 processes, this run has 1" in result.stdout
    assert_resumed_weights(tmp_path, three, ["model.safetensors"], 1)
    six = root / "checkpoint-0000006"
    assert read_train_state(six)["batches_seen"] == 6

    # 1 -> 2 processes, batch 4: 48 grids drawn = batch 6 of the new layout
    result = launch(tmp_path, "prior", recipe, 2, "train.steps=8", port=29575)
    assert "batch 6 of the saved layout is batch 6" in result.stdout
    assert_resumed_weights(tmp_path, six, ["model.safetensors"], 2)
    final = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert final["step"] == 8 and final["nonfinite_steps"] == 0


class Wrapper(nn.Module):
    """Stands for DistributedDataParallel: the wrapped module's names gain `module.`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_weights_load_across_wrappers_and_from_todays_prefixed_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    source[1].running_mean.add_(1.0)
    plain = {k: v.clone() for k, v in source.state_dict().items()}
    prefixed = {f"module._orig_mod.{k}": v for k, v in plain.items()}  # a DDP run of a torch.compile'd model
    for weights, target in ((prefixed, nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))),
                            (plain, Wrapper(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))):
        save_file(weights, tmp_path / "model.safetensors")
        load_model_weights(target, load_file(tmp_path / "model.safetensors"), tmp_path / "model.safetensors")
        loaded = {k.removeprefix("module."): v for k, v in target.state_dict().items()}
        assert all(torch.equal(loaded[k], plain[k]) for k in plain)
    with pytest.raises(RuntimeError, match=r"lacks \['1.running_var'\]"):
        load_model_weights(source, {k: v for k, v in plain.items() if k != "1.running_var"}, tmp_path)
    with pytest.raises(RuntimeError, match="'module.2.weight', which this model does not have"):
        load_model_weights(source, {**prefixed, "module.2.weight": torch.zeros(1)}, tmp_path)


def test_tied_weights_saved_once_still_load_strictly():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    source, target = Tied(), Tied()
    load_model_weights(target, {"module.embed.weight": source.embed.weight.detach()}, Path("x"))
    assert torch.equal(target.head.weight, source.embed.weight)


def test_accelerate_deals_global_batches_round_robin():
    """The assumption convert_position rests on: after `offset` batches on each of W processes, the
    first offset x B x W samples of the epoch's order are drawn, whatever the layout."""
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3)).tolist()
    for processes, batch_size in ((2, 3), (3, 4), (4, 2)):
        shards = [list(BatchSamplerShard(BatchSampler(order, batch_size, drop_last=True), processes, rank))
                  for rank in range(processes)]
        for offset in range(len(shards[0]) + 1):
            drawn = sorted(i for shard in shards for batch in shard[:offset] for i in batch)
            assert drawn == sorted(order[:offset * batch_size * processes])


def loader_batches(batch_size: int, state: TrainState, count: int) -> list[list[int]]:
    """`count` batches of sample ids from a prepared one-process DataLoader over 30 ids, from `state`."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)  # SeedableRandomSampler's seed: the order depends on (seed, epoch) only
    from vqgan.training.run import build_accelerator

    accelerator = build_accelerator(Path("unused"), "no", "none")
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(30)), batch_size=batch_size, shuffle=True,
                                            drop_last=True))
    batches = resumable_batches(accelerator, loader, state)
    return [next(batches)[0].tolist() for _ in range(count)]


def test_a_position_saved_under_another_layout_resumes_on_the_next_unseen_samples():
    # saved by 2 processes x 3: 30 ids -> 5 batches per process; 7 = epoch 1, offset 2 -> 12 samples of epoch 1 drawn
    saved = TrainState(batches_seen=7, data_layout={"processes": 2, "batch_size": 3, "batches_per_epoch": 5})
    stream = [i for batch in loader_batches(4, TrainState(), 14) for i in batch]  # one process x 4: 7 per epoch
    epoch_1 = stream[28:56]
    resumed = loader_batches(4, saved, 3)
    assert saved.batches_seen == 7 + 3 + 3 and saved.data_layout["batch_size"] == 4  # converted to 7 + 3, 3 drawn
    assert [i for batch in resumed for i in batch] == epoch_1[12:24]


def test_a_position_that_is_no_whole_number_of_new_batches_is_refused_naming_the_change():
    saved = {"processes": 2, "batch_size": 3, "batches_per_epoch": 5}
    current = {"processes": 1, "batch_size": 4, "batches_per_epoch": 7}
    with pytest.raises(DataError, match=r"processes 2 -> 1, train.batch_size 3 -> 4.*drew 6 samples of epoch 0"):
        convert_position(1, saved, current)
    assert convert_position(2, saved, current) == 3  # 12 samples = 3 batches of 4
    assert convert_position(4, saved, {**current, "batches_per_epoch": 5}) == 5  # past a shorter epoch: the next one
    assert convert_position(9, saved, saved) == 9


def test_a_one_process_run_resumed_with_another_batch_size_converts_or_refuses(tmp_path):
    from vqgan.train import main

    recipe = {**TOKENIZER_RECIPE, "run_dir": str(tmp_path / "run"),
              "train": {**TOKENIZER_RECIPE["train"], "steps": 1, "checkpoint_every": 1, "batch_size": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main([str(path)])  # 4 images drawn
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(DataError, match=r"train.batch_size 4 -> 8.*drew 4 samples of epoch 0"):
        main([str(path), "train.batch_size=8", "train.steps=2"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    summary = main([str(path), "train.batch_size=2", "train.steps=2"])  # 4 images = 2 batches of 2
    state = read_train_state(tmp_path / "run" / "checkpoints" / "checkpoint-0000002")
    assert summary["step"] == 2 and state["batches_seen"] == 3
    assert state["data_layout"] == {"processes": 1, "batch_size": 2, "batches_per_epoch": 6}
