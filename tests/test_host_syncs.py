"""No host sync inside a training step: the composed tokenizer window reads back only its flags, and the
prior step, as the prior trainer runs it, reads back nothing (its ids were range-checked at load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from test_engine import HostSyncCounter, images, optimizer_step_counters, tiny_models
from test_train_prior import recipe, run
from vqgan.losses import LossConfig
from vqgan.optim import OptimConfig
from vqgan.prior import MaskGITConfig, MaskGITPrior, PixelCNNConfig, PixelCNNPrior, TransformerConfig, TransformerPrior

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_step imports its neighbour `common`

from train_step import RealStep  # noqa: E402 - vqgan/train.py's own TokenizerStep on fixed images


def test_tokenizer_window_reads_back_only_its_flags():
    """One window with the discriminator, LeCAM and EMA on: the flags' read is its one host sync."""
    model, disc = tiny_models(dead_code_threshold=2)
    loss = LossConfig(perceptual_weight=0.0, disc_start=0, lecam_weight=0.1)
    step = RealStep(model, disc, loss, OptimConfig(), OptimConfig(), images(4), "no", ema_decay=0.99)
    step()  # the first window initialises the codebook (k-means may read back, once a run)
    with HostSyncCounter(optimizer_step_counters(step.opt_g, step.opt_d)) as counter:
        step()
    # the flags' one read (reduce_window_flags: Tensor.tolist) does not pass the dispatcher on the CPU; the
    # CUDA test (tests/test_cuda.py, torch.cuda.set_sync_debug_mode) sees it as the window's one sync
    assert counter.seen == [], f"host syncs in the tokenizer window: {counter.seen}"


PRIORS = {
    "transformer": lambda: TransformerPrior(TransformerConfig(num_codes=16, grid=(4, 4), num_classes=3, dim=16,
                                                              depth=1, heads=2, class_dropout=0.5)),
    "pixelcnn": lambda: PixelCNNPrior(PixelCNNConfig(num_codes=16, grid=(4, 4), hidden=8, num_layers=2, num_classes=3)),
    "maskgit": lambda: MaskGITPrior(MaskGITConfig(num_codes=16, grid=(4, 4), num_classes=3, dim=16, depth=1, heads=2)),
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("prior", ["transformer", "maskgit"])
def test_the_prior_trainers_step_has_no_host_sync(tmp_path, monkeypatch, prior):
    """The real loop of vqgan.train_prior, its model as the loop sets it up: every prior_step call counted."""
    import vqgan.train_prior as trainer
    from vqgan.autoencoder import VQModel, preset
    from vqgan.tokenizer import VQTokenizer

    torch.manual_seed(0)
    tokenizer = tmp_path / "tokenizer"
    VQTokenizer.from_model(VQModel(preset("tiny")).eval()).save_pretrained(tokenizer)
    real_step, seen = trainer.prior_step, []

    def counted_step(*args, **kwargs):
        with HostSyncCounter() as counter:
            loss = real_step(*args, **kwargs)
        seen.extend(counter.seen)
        return loss

    monkeypatch.setattr(trainer, "prior_step", counted_step)
    summary = run(recipe(tmp_path, tokenizer, prior=prior, steps=3, checkpoint_every=100))
    assert summary["step"] == 3 and seen == [], f"host syncs in {prior}'s training step: {seen}"


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_forward_and_backward_without_id_checks_have_no_host_sync(name):
    """Each family's training forward with labels (class dropout drawn on the device), as check_ids=False runs it."""
    from vqgan.train_prior import prior_step

    model = PRIORS[name]().train()
    model.check_ids = False
    grids = torch.randint(0, 16, (4, 4, 4))
    labels = torch.tensor([0, 1, 2, 1])
    masking = model.config if name == "maskgit" else None
    prior_step(model, grids, labels, masking=masking)  # warm-up
    with HostSyncCounter() as counter:
        prior_step(model, grids, labels, masking=masking)
    assert counter.seen == [], f"host syncs in the {name} step: {counter.seen}"


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_a_prior_still_checks_the_ids_it_is_given_by_default(name):
    model = PRIORS[name]()
    bad = torch.full((1, 4, 4), 16)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\), got \[16, 16\]"):
        model(bad, torch.tensor([0]), mask) if name == "maskgit" else model(bad, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, \d\)"):
        good = torch.zeros(1, 4, 4, dtype=torch.long)
        model(good, torch.tensor([7]), mask) if name == "maskgit" else model(good, torch.tensor([7]))
