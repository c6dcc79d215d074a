"""The training engine's pieces on their own: accumulation, fp16 overflow, the window undo, no host syncs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vqgan.autoencoder import VQModel, preset
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgan.losses import LeCAM, LossConfig, discriminator_loss, generator_loss
from vqgan.quantizers import QuantizerConfig, VectorQuantizer
from vqgan.training.checkpoint import check_config_drift, config_changes, is_frozen
from vqgan.training.ema import ema_decay_at
from vqgan.training.gan_step import discriminator_step, generator_step
from vqgan.training.rng import window_seed
from vqgan.training.state import TrainState
from vqgan.training.window import (
    Update,
    WindowFlags,
    WindowSnapshot,
    apply_updates,
    discard_window,
    in_place_params,
    loss_scale,
    settle_window,
)


def tiny_models(seed: int = 0, **quantizer) -> tuple[VQModel, PatchDiscriminator]:
    import dataclasses

    torch.manual_seed(seed)
    config = preset("tiny")
    # without k-means init and restarts unless asked: these tests compare forwards that must not write the codebook
    quantizer = {"kmeans_init": False, "dead_code_threshold": 0, **quantizer}
    config = dataclasses.replace(config, quantizer=dataclasses.replace(config.quantizer, **quantizer))
    model = VQModel(config)
    model.check_finite = False
    return model, PatchDiscriminator(DiscriminatorConfig(base_channels=16, num_layers=2, norm="group"))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- accumulation


def window_gradients(model, disc, batch, micro_batches: int, config: LossConfig) -> dict[str, torch.Tensor]:
    """Gradients after one window of `micro_batches` equal slices of `batch` (generator and discriminator)."""
    for chunk in batch.chunk(micro_batches):
        gen = generator_step(model, model, disc, None, chunk, config, step=5, accum_steps=micro_batches)
        discriminator_step(disc, chunk, gen.fake, config, step=5, accum_steps=micro_batches)
    named = [(f"g.{n}", p) for n, p in model.named_parameters()] + [(f"d.{n}", p) for n, p in disc.named_parameters()]
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def test_one_window_of_micro_batches_equals_one_step_on_the_concatenated_batch():
    model, disc = tiny_models()
    # the adaptive weight is a per-micro-batch ratio of norms (as in taming under accumulation), so it is
    # fixed here; every other term is a mean over the batch and must add up exactly
    config = LossConfig(perceptual_weight=0.0, disc_start=0, use_adaptive_weight=False)
    batch = images(4)
    whole = window_gradients(copy.deepcopy(model), copy.deepcopy(disc), batch, 1, config)
    split = window_gradients(copy.deepcopy(model), copy.deepcopy(disc), batch, 2, config)
    assert whole.keys() == split.keys() and any(k.startswith("d.") for k in whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)

    # and the optimizer step built on them: the same parameters after apply_updates
    params = {}
    for micro in (1, 2):
        m, d = copy.deepcopy(model), copy.deepcopy(disc)
        opt_g, opt_d = torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
        window_gradients(m, d, batch, micro, config)
        apply_updates([Update(opt_g, list(m.parameters()), 1.0), Update(opt_d, list(d.parameters()), 1.0)], None)
        params[micro] = {n: p.detach().clone() for n, p in list(m.named_parameters()) + list(d.named_parameters())}
        assert all(p.grad is None for p in m.parameters())  # zeroed for the next window
    for name in params[1]:
        torch.testing.assert_close(params[2][name], params[1][name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- fp16


def fp16_generator(model, disc, scaler, fallback: float):
    with torch.autocast("cpu", dtype=torch.float16):
        return generator_step(model, model, disc, None, images(2), LossConfig(perceptual_weight=0.0, disc_start=0),
                              step=0, backward=lambda loss: scaler.scale(loss).backward(),
                              loss_scale=loss_scale(scaler, torch.device("cpu")),
                              adaptive_fallback=torch.tensor(fallback))


def test_fp16_adaptive_weight_is_the_fp32_one_and_an_overflow_backs_the_scale_off():
    model, disc = tiny_models()
    # fp32 reference lambda
    m32, d32 = copy.deepcopy(model), copy.deepcopy(disc)
    ref = generator_step(m32, m32, d32, None, images(2), LossConfig(perceptual_weight=0.0, disc_start=0), step=0)
    ref_weight = float(ref.logs["adaptive_weight"])
    assert 0 < ref_weight < 1e4

    # a moderate scale: lambda from unscaled fp32 norms equals the fp32 one up to fp16 rounding
    m, d = copy.deepcopy(model), copy.deepcopy(disc)
    gen = fp16_generator(m, d, torch.amp.GradScaler("cpu", init_scale=2.0**8), fallback=0.37)
    assert float(gen.logs["adaptive_overflow"]) == 0.0
    assert abs(float(gen.logs["adaptive_weight"]) - ref_weight) < 0.02 * ref_weight

    # a scale that overflows fp16: lambda is the fallback (not NaN, 0 or the clamp), the loss is finite,
    # the update is skipped, and the scale backs off
    m, d = copy.deepcopy(model), copy.deepcopy(disc)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    gen = fp16_generator(m, d, scaler, fallback=0.37)
    assert float(gen.logs["adaptive_overflow"]) == 1.0
    assert float(gen.logs["adaptive_weight"]) == pytest.approx(0.37)
    assert torch.isfinite(gen.loss)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    apply_updates([Update(opt, list(m.parameters()), 1.0)], scaler, skip=True)
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())

    # the scaler itself, on gradients that overflow in backward: it skips and backs off once for all optimizers
    m, d = copy.deepcopy(model), copy.deepcopy(disc)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    fp16_generator(m, d, scaler, fallback=0.37)
    opt_g = torch.optim.Adam(m.parameters(), lr=1e-3)
    apply_updates([Update(opt_g, list(m.parameters()), 1.0)], scaler)
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())


def test_a_nonfinite_fp16_loss_still_backs_the_scale_off():
    model, _ = tiny_models()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bad = images(2)
    bad[0, 0, 0, 0] = float("nan")
    with torch.autocast("cpu", dtype=torch.float16):
        decoded, quant = model(bad)
        loss = (decoded.float() - bad).abs().mean() + quant.loss
    scaler.scale(loss).backward()
    assert not torch.isfinite(loss)
    discard_window([opt], scaler)
    assert scaler.get_scale() == 2.0**15
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- the window's undo and policy


def test_a_discarded_window_restores_codebook_counters_lecam_and_the_init_flag():
    model, disc = tiny_models(kmeans_init=True, dead_code_threshold=1, use_ema=True, num_codes=16)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=16, num_layers=2, norm="batch"))
    lecam = LeCAM()
    before = {**{f"g.{k}": v.clone() for k, v in model.state_dict().items()},
              **{f"d.{k}": v.clone() for k, v in disc.state_dict().items()},
              **{f"l.{k}": v.clone() for k, v in lecam.state_dict().items()}}
    snapshot = WindowSnapshot([model, disc, lecam], in_place_params(model))
    for _ in range(2):  # k-means init, then a restart and an EMA codebook update
        gen = generator_step(model, model, disc, None, images(2), LossConfig(perceptual_weight=0.0, disc_start=0,
                                                                            lecam_weight=0.1), step=0)
        discriminator_loss(LossConfig(perceptual_weight=0.0, lecam_weight=0.1), disc, images(2), gen.fake, 0, lecam)
    assert model.quantizer._initialized and not torch.equal(model.quantizer.weight, before["g.quantizer.weight"])
    snapshot.restore()
    after = {**{f"g.{k}": v for k, v in model.state_dict().items()}, **{f"d.{k}": v for k, v in disc.state_dict().items()},
             **{f"l.{k}": v for k, v in lecam.state_dict().items()}}
    changed = [k for k in before if not torch.equal(before[k], after[k]) and not k.startswith(("g.encoder", "g.decoder"))]
    assert changed == []
    assert model.quantizer._initialized is False  # the Python mirror follows the restored buffer


def test_settle_window_counts_and_stops():
    state, said = TrainState(step=7), []
    assert settle_window(state, WindowFlags(False, False, False), 3, said.append)
    assert not settle_window(state, WindowFlags(True, False, False), 3, said.append)
    assert not settle_window(state, WindowFlags(False, True, False), 3, said.append)
    assert (state.nonfinite_steps, state.nonfinite_in_row, state.empty_batches) == (1, 1, 1)
    assert settle_window(state, WindowFlags(False, False, True), 3, said.append) and state.overflow_steps == 1
    assert state.nonfinite_in_row == 0
    for _ in range(2):
        settle_window(state, WindowFlags(True, False, False), 3, said.append)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 7"):
        settle_window(state, WindowFlags(True, False, False), 3, said.append)


def test_window_seed_depends_on_seed_position_and_rank_only():
    seeds = {window_seed(s, p, r) for s in (0, 1) for p in (0, 1, 2) for r in (0, 1)}
    assert len(seeds) == 12 and window_seed(0, 5, 1) == window_seed(0, 5, 1)
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------- EMA, config drift, encode


def test_ema_decay_warms_up_from_a_copy():
    assert ema_decay_at(0, 0.9999) == 0.0  # the first update copies the model (k-means codebook included)
    assert ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay_at(100, 0.9999) == pytest.approx(101 / 110)
    assert ema_decay_at(10**7, 0.999) == 0.999


def test_config_drift_names_frozen_keys_and_allows_the_rest(tmp_path):
    saved = {"model": {"quantizer": {"num_codes": 64}}, "optim": {"lr": 1e-4}, "train": {"steps": 10, "resume": "auto"}}
    current = {"model": {"quantizer": {"num_codes": 128}}, "optim": {"lr": 2e-4}, "train": {"steps": 20, "resume": ""}}
    assert config_changes(saved, current) == {"model.quantizer.num_codes": (64, 128), "optim.lr": (1e-4, 2e-4),
                                              "train.resume": ("auto", ""), "train.steps": (10, 20)}
    assert is_frozen("model.quantizer.num_codes", ("model.",)) and not is_frozen("modelx", ("model.",))
    assert is_frozen("data.image_size", ("data.image_size",)) and not is_frozen("data.image_size2", ("data.image_size",))
    import json

    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(Exception, match=r"model\.quantizer\.num_codes: 64 in the checkpoint, 128 now"):
        check_config_drift(tmp_path, current, ("model.",))
    allowed = check_config_drift(tmp_path, {**current, "model": saved["model"]}, ("model.",))
    assert allowed == {"optim.lr": (1e-4, 2e-4), "train.steps": (10, 20)}


def test_vqmodel_encode_in_train_mode_changes_no_state():
    model, _ = tiny_models(kmeans_init=True, dead_code_threshold=1, use_ema=True, num_codes=16)
    model.train()
    model(images(2))  # initialise (k-means), so that encode runs on a trained-looking codebook
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = model.encode_model_range(images(2, seed=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert torch.equal(ids, model.encode_model_range(images(2, seed=3))) and torch.equal(ids, model(images(2, seed=3))[1].indices)


# ---------------------------------------------------------------- no host sync inside a step


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that read a device value back to the host (item, bool, tolist, nonzero, ...).

    `host_tensors`: tensors that live on the CPU whatever the model's device, so reading them is no
    sync: torch.optim's step counters (`state["step"]`, read with .item() by Adam's non-capturable path).
    """

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "equal")

    def __init__(self, host_tensors: list[torch.Tensor] = ()):
        super().__init__()
        self.seen: list[str] = []
        self.host_pointers = {t.data_ptr() for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNC_OPS and not (args and isinstance(args[0], torch.Tensor)
                                          and args[0].data_ptr() in self.host_pointers):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def optimizer_step_counters(*optimizers: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The CPU step counters of each parameter's optimizer state (present after a first step)."""
    return [state["step"] for opt in optimizers for state in opt.state.values()
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device.type == "cpu"]


@pytest.mark.parametrize("options", [
    {"use_ema": True, "dead_code_threshold": 1},
    {"dead_code_threshold": 2, "entropy_weight": 0.1, "affine_reparam": True, "l2_normalize": True, "code_dim": 4},
    {"rotation_trick": True, "kmeans_init": True},
])
def test_quantizer_training_forward_has_no_host_sync_after_init(options):
    q = VectorQuantizer(QuantizerConfig(num_codes=32, dim=8, **options)).train()
    z = torch.randn(64, 8)
    q(z)  # the first call initialises (k-means may read back; once per run)
    z = z.clone().requires_grad_(True)
    z.data[3, 0] = float("nan")  # a non-finite row too: handled with masks, not branches
    with HostSyncCounter() as counter:
        out = q(z)
        out.loss.backward()
    assert counter.seen == [], f"host syncs in the quantizer's training step: {counter.seen}"


def test_generator_and_discriminator_losses_have_no_host_sync():
    model, disc = tiny_models()
    lecam = LeCAM()
    config = LossConfig(perceptual_weight=0.0, disc_start=0, lecam_weight=0.1, r1_weight=0.1)
    x = images(2)
    model(x)  # initialise the quantizer
    with HostSyncCounter() as counter:
        decoded, quant = model(x)
        total, logs = generator_loss(config, x, decoded, decoded, quant.loss, disc(decoded), model.last_layer_weight,
                                     step=0, loss_scale=torch.tensor(256.0), adaptive_fallback=torch.tensor(1.0))
        total.backward()
        d_total, _ = discriminator_loss(config, disc, x, decoded.detach(), 0, lecam)
        d_total.backward()
    assert counter.seen == [], f"host syncs in the losses: {counter.seen}"
