"""Optimizers: weight decay only on conv/linear weights (nanoGPT's split), and the lr schedule."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from vqgan.autoencoder import VQModel, VQModelConfig, preset
from vqgan.discriminator import DiscriminatorConfig, PatchDiscriminator
from vqgan.optim import (
    OptimConfig,
    apply_config_after_resume,
    build_optimizer,
    build_scheduler,
    decay_split,
    lr_multiplier,
    weight_decay_groups,
)
from vqgan.prior.pixelcnn import PixelCNNConfig, PixelCNNPrior
from vqgan.prior.transformer import TransformerConfig, TransformerPrior


def tiny_vqmodel(affine_lr: float = 10.0) -> VQModel:
    """tiny preset with a projected (Linear in/out), affine-reparametrised codebook: every parameter kind."""
    base = preset("tiny")
    quantizer = dataclasses.replace(base.quantizer, code_dim=8, affine_reparam=True, affine_lr=affine_lr)
    return VQModel(VQModelConfig(base.autoencoder, quantizer))


def tiny_transformer() -> TransformerPrior:
    return TransformerPrior(TransformerConfig(num_codes=6, grid=(4, 4), num_classes=3, dim=16, depth=2, heads=2,
                                              mlp_ratio=2.0, positions="learned"))


def names(pairs) -> set[str]:
    return {name for name, _ in pairs}


def test_vqmodel_decays_conv_and_linear_weights_only():
    model = tiny_vqmodel()
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    conv_kernels = {n for n, p in params.items() if p.dim() == 4}
    assert names(decay) == conv_kernels | {"quantizer.project_in.weight", "quantizer.project_out.weight"}
    assert names(decay) | names(no_decay) == set(params) and not names(decay) & names(no_decay)
    # The codebook is a 2-D tensor, so a "dim >= 2" rule would decay it; the module rule does not.
    assert {"quantizer.weight", "quantizer.affine_scale", "quantizer.affine_shift"} <= names(no_decay)
    assert {"encoder.norm_out.weight", "encoder.norm_out.bias", "decoder.conv_out.bias"} <= names(no_decay)
    assert all(n.endswith("bias") or "norm" in n or n.startswith("quantizer.") for n in names(no_decay))


@pytest.mark.parametrize("norm", ["batch", "group", "spectral"])
def test_discriminator_decays_conv_kernels_only(norm):
    model = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2, norm=norm))
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    assert names(decay) == {n for n, p in params.items() if p.dim() == 4}
    assert names(no_decay) == {n for n, p in params.items() if p.dim() == 1}  # biases and norm affines
    if norm == "spectral":  # the raw kernel behind the spectral-normalised weight
        assert all(n.endswith("parametrizations.weight.original") for n in names(decay))
    if norm != "spectral":
        assert any(n.endswith(".weight") for n in names(no_decay))  # BatchNorm / GroupNorm scales


def test_transformer_decays_linear_weights_not_embeddings_or_norms():
    model = tiny_transformer()
    decay, no_decay = decay_split(model)
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert names(decay) == linear
    assert "head.weight" in linear and "blocks.0.attn.qkv.weight" in linear and "blocks.1.mlp.2.weight" in linear
    assert {"token_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "blocks.0.ln1.weight",
            "blocks.0.attn.qkv.bias"} <= names(no_decay)
    assert names(decay) | names(no_decay) == set(dict(model.named_parameters()))


def test_pixelcnn_keeps_token_and_class_embeddings_undecayed():
    model = PixelCNNPrior(PixelCNNConfig(num_codes=6, grid=(3, 3), hidden=8, num_layers=2, kernel_size=3,
                                         num_classes=2))
    decay, no_decay = decay_split(model)
    assert names(decay) == {n for n, p in model.named_parameters() if p.dim() == 4}
    assert {"embedding.weight", "layers.0.class_bias.weight"} <= names(no_decay)


def test_frozen_parameters_are_left_out_and_groups_carry_the_decay():
    model = tiny_vqmodel()
    model.encoder.requires_grad_(False)
    groups = weight_decay_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert not {id(p) for p in model.encoder.parameters()} & {id(p) for p in grouped}


def test_adamw_step_with_zero_gradients_shrinks_only_decayed_weights():
    model = tiny_transformer()
    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=wd))
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    # Zero gradients leave Adam's update at 0, so only AdamW's decoupled decay p <- (1 - lr * wd) p acts.
    for name in ("head.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(after[name].detach(), before[name] * (1 - lr * wd))
        assert after[name].norm() < before[name].norm()
    for name in ("token_emb.weight", "pos_emb", "ln_f.weight", "blocks.0.attn.qkv.bias"):
        assert torch.equal(after[name].detach(), before[name]), name


def test_without_decay_it_is_adamw_in_two_groups_and_steps_exactly_like_adam():
    assert len(build_optimizer(tiny_vqmodel(), OptimConfig(lr=1e-3)).param_groups) == 3  # + the affine_lr group
    model = tiny_vqmodel(affine_lr=1.0)  # at multiplier 1 the affine parameters stay in their group
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 2  # a resume may turn decay on
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    adam_model = copy.deepcopy(model)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for m, opt in ((model, optimizer), (adam_model, adam)):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.01
        opt.step()
    for (name, a), b in zip(model.named_parameters(), adam_model.parameters()):
        assert torch.equal(a, b), name
    assert type(build_optimizer(model.parameters(), OptimConfig(lr=1e-3))) is torch.optim.Adam


def test_resumed_optimizer_takes_the_recipes_lr_betas_and_decay():
    model = tiny_transformer()
    saved_config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=2, schedule="cosine")
    optimizer = build_optimizer(model, saved_config)
    scheduler = build_scheduler(optimizer, saved_config, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = (copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict()))
    new_config = OptimConfig(lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=2, schedule="cosine")
    optimizer = build_optimizer(model, new_config)
    scheduler = build_scheduler(optimizer, new_config, total_steps=10)
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # what loading alone gives: the old recipe
    apply_config_after_resume(optimizer, scheduler, new_config)
    expected_lr = 5e-4 * lr_multiplier(3, new_config, 10)
    assert [g["lr"] for g in optimizer.param_groups] == [expected_lr, expected_lr]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_multiplier(4, new_config, 10))


def test_plain_parameters_with_decay_are_refused_naming_the_fix():
    model = tiny_transformer()
    with pytest.raises(TypeError, match=r"pass the module itself"):
        build_optimizer(model.parameters(), OptimConfig(weight_decay=0.05))
    with pytest.raises(ValueError, match="weight_decay"):
        OptimConfig(weight_decay=-0.1)


# ----------------------------------------------------------------------------------------------- schedule


def test_warmup_is_linear_then_cosine_decays_to_the_floor():
    config = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, config, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, config, 14) == 1.0
    assert math.isclose(lr_multiplier(9, config, 14), 0.1 + 0.9 * 0.5)  # half-way: cos = 0
    assert math.isclose(lr_multiplier(14, config, 14), 0.1) and math.isclose(lr_multiplier(99, config, 14), 0.1)


def test_linear_and_constant_schedules():
    linear = OptimConfig(schedule="linear")
    assert [lr_multiplier(s, linear, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_multiplier(123, OptimConfig(), 10) == 1.0
