"""The next-scale (VAR) prior: block-causal mask, KV-cached sampling, CFG ramp, NextScaleInput, overfitting."""

import pytest
import torch
import torch.nn.functional as F

from vqgan.prior.next_scale_input import (
    VAR_SCALES,
    NextScaleInput,
    ResidualPyramidInput,
    split_scales,
    teacher_forcing_input,
)
from vqgan.prior.sampling import SamplingConfig
from vqgan.prior.var import VARConfig, VARPrior, as_scale_grids, next_scale_logits, next_scale_loss
from vqgan.prior.var_sampling import guidance_weights, sample_var

SCALES = (1, 2, 3, 4)  # L = 30
K, C = 16, 4


def tiny_var(dtype=torch.float64, **overrides) -> VARPrior:
    torch.manual_seed(0)
    kw = dict(num_codes=K, scales=SCALES, input_dim=C, num_classes=3, dim=32, depth=2, heads=4, class_dropout=0.1)
    kw.update(overrides)
    model = VARPrior(VARConfig(**kw)).to(dtype).eval()
    # VAR starts every block's residual gate near zero and the head at 0.02 x 0.02: open both so that the
    # tests see attention at work and logits far from uniform
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
        for block in model.blocks:
            block.ada[-1].bias[: 2 * model.config.dim].fill_(1.0)
    return model


def tiny_inputs(dtype=torch.float64, scales=SCALES, input_dim=C, with_phi=True) -> ResidualPyramidInput:
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(K, input_dim, generator=g, dtype=dtype)
    phi = None
    if with_phi:  # VAR's Phi: h * (1 - r) + conv(h) * r, one conv per scale here
        convs = [torch.nn.Conv2d(input_dim, input_dim, 3, padding=1).to(dtype) for _ in scales]
        phi = lambda h, i: h * 0.5 + convs[i](h) * 0.5  # noqa: E731
    return ResidualPyramidInput(codebook, scales, phi)


def random_ids(n: int, seed: int = 0, scales=SCALES) -> torch.Tensor:
    return torch.randint(0, K, (n, sum(s * s for s in scales)), generator=torch.Generator().manual_seed(seed))


def test_var_defaults_are_vars_pyramid():
    c = VARConfig(num_codes=16, dim=32, depth=1, heads=2)
    assert c.scales == VAR_SCALES and c.seq_len == 680 and c.grid == (16, 16)


def test_reference_input_is_protocol_and_depends_only_on_earlier_scales():
    inputs = tiny_inputs()
    assert isinstance(inputs, NextScaleInput)
    ids = split_scales(random_ids(2), SCALES)
    for k in range(1, len(SCALES)):
        out = inputs.next_scale_input(ids, k)
        assert out.shape == (2, SCALES[k] ** 2, C)
        changed = [t.clone() for t in ids]
        for j in range(k, len(SCALES)):  # scales >= k may change freely
            changed[j] = (changed[j] + 1) % K
        assert torch.equal(inputs.next_scale_input(changed, k), out)
        changed[k - 1] = (changed[k - 1] + 1) % K  # the scale just before does matter
        assert not torch.allclose(inputs.next_scale_input(changed, k), out)


def test_reference_input_equals_a_brute_force_pyramid():
    """input_k = area-mean over s_k x s_k cells of sum_{i<k} phi(bicubic-up(codes_i)), written out by hand."""
    inputs = tiny_inputs(with_phi=False)
    ids = split_scales(random_ids(1), SCALES)
    S = SCALES[-1]
    f_hat = torch.zeros(1, C, S, S, dtype=torch.float64)
    for k in range(1, len(SCALES)):
        side = SCALES[k - 1]
        codes = inputs.codebook[ids[k - 1][0]].T.reshape(1, C, side, side)
        f_hat += codes if side == S else F.interpolate(codes, size=(S, S), mode="bicubic")
        # area downsampling by an integer or fractional factor: mean of the covered cells, weighted
        want = F.adaptive_avg_pool2d(f_hat, SCALES[k]).flatten(2).transpose(1, 2)
        torch.testing.assert_close(inputs.next_scale_input(ids, k), want, rtol=0, atol=1e-12)
        if S % SCALES[k] == 0:  # whole blocks: the plain mean of each block
            r = S // SCALES[k]
            block_mean = f_hat.reshape(1, C, SCALES[k], r, SCALES[k], r).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
            torch.testing.assert_close(inputs.next_scale_input(ids, k), block_mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 2])])
def test_scale_k_logits_depend_only_on_class_and_earlier_scales(labels):
    """Gradient test on the input embeddings, then the same on ids through the tokenizer's input."""
    model = tiny_var()
    inputs = tiny_inputs()
    ids = random_ids(2)
    scale_inputs = teacher_forcing_input(inputs, split_scales(ids, SCALES)).requires_grad_(True)
    logits = model(scale_inputs, labels)                                           # (B, L, K)
    first = SCALES[0] ** 2
    for k, (begin, end) in enumerate(model.bounds):
        (grad,) = torch.autograd.grad(logits[:, begin:end].sum(), scale_inputs, retain_graph=True)
        per_position = grad.abs().sum(dim=(0, 2))                                   # (L - first,)
        visible = end - first  # input positions of scales 1..k (scale k's own input holds scales < k)
        assert per_position[visible:].eq(0).all(), f"scale {k} sees a later scale's input"
        assert per_position[:visible].gt(0).all() or k == 0
    # ids: changing scales >= k leaves the logits of scales <= k exactly as they were
    for k, (_, end) in enumerate(model.bounds):
        begin_k = model.bounds[k][0]
        changed = ids.clone()
        changed[:, begin_k:] = (changed[:, begin_k:] + 1) % K
        with torch.no_grad():
            a = next_scale_logits(model, inputs, ids, labels)
            b = next_scale_logits(model, inputs, changed, labels)
        assert torch.equal(a[:, :end], b[:, :end])
        if end < ids.shape[1]:
            assert not torch.allclose(a[:, end:], b[:, end:])


def test_class_conditions_every_scale():
    model = tiny_var()
    scale_inputs = teacher_forcing_input(tiny_inputs(), split_scales(random_ids(1), SCALES))
    a = model(scale_inputs, torch.tensor([0]))
    b = model(scale_inputs, torch.tensor([1]))
    for begin, end in model.bounds:
        assert not torch.allclose(a[:, begin:end], b[:, begin:end])


def record_calls(model):
    """Wrap forward_scale and forward to record what each call got -> the list they append to."""
    calls = []
    scale_step, full = model.forward_scale, model.forward

    def forward_scale(k, scale_input, cond, cache):
        out = scale_step(k, scale_input, cond, cache)
        calls.append(("scale", k, None if scale_input is None else tuple(scale_input.shape), out.clone()))
        return out

    def forward(*args, **kwargs):
        calls.append(("full",))
        return full(*args, **kwargs)

    model.forward_scale, model.forward = forward_scale, forward
    return calls


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_sampling_logits_equal_teacher_forcing(cfg_scale):
    """The logits of each cached step equal the full-sequence teacher-forced logits of the drawn ids (fp64)."""
    model, inputs = tiny_var(), tiny_inputs()
    labels = torch.tensor([0, 1, 2])
    calls = record_calls(model)
    ids = sample_var(model, inputs, 3, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 30) and ids.dtype == torch.long
    rows = labels if cfg_scale == 1 else torch.cat([labels, torch.full((3,), 3)])
    ids_rows = ids.repeat(len(rows) // 3, 1)
    with torch.no_grad():
        full = next_scale_logits(model, inputs, ids_rows, rows)                        # (R, L, K)
    steps = [c for c in calls if c[0] == "scale"]
    for (_, k, _, logits), (begin, end) in zip(steps, model.bounds):
        torch.testing.assert_close(logits, full[:, begin:end], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=2.0, top_k=5), dict(top_p=0.7, temperature=0.8)])
def test_cached_and_uncached_sampling_draw_the_same_tokens(kw):
    model, inputs = tiny_var(), tiny_inputs()
    runs = [sample_var(model, inputs, 4, [0, 1, 2, 0], generator=torch.Generator().manual_seed(5),
                       use_kv_cache=cache, **kw) for cache in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_sampling_without_labels_uses_the_null_class(num_classes):
    model, inputs = tiny_var(num_classes=num_classes), tiny_inputs()
    runs = [sample_var(model, inputs, 2, generator=torch.Generator().manual_seed(0), use_kv_cache=cache)
            for cache in (True, False)]
    assert torch.equal(*runs)
    if num_classes:
        null = sample_var(model, inputs, 2, [num_classes - 1] * 2, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(runs[0], null)


def test_sampling_takes_one_model_call_per_scale_over_that_scale_only():
    model, inputs = tiny_var(), tiny_inputs()
    calls = record_calls(model)
    sample_var(model, inputs, 2, [0, 1], cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == ["scale"] * len(SCALES)
    assert [c[1] for c in calls] == list(range(len(SCALES)))
    # each step embeds only the new scale's tokens (2n rows under CFG)
    assert [c[2] for c in calls] == [None] + [(4, s * s, C) for s in SCALES[1:]]
    assert [tuple(c[3].shape) for c in calls] == [(4, s * s, K) for s in SCALES]


def test_cfg_ramp_and_scale_one_is_conditional_only():
    assert guidance_weights(3.0, 4) == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert guidance_weights(1.0, 10) == [1.0] * 10
    model, inputs = tiny_var(), tiny_inputs()
    labels = [2, 0, 1]

    def draw(**kw):
        return sample_var(model, inputs, 3, labels, generator=torch.Generator().manual_seed(3), **kw)

    # cfg_scale 1: conditional only. Same draws as the unguided path; logits equal those of the conditional rows
    calls = record_calls(model)
    plain = draw()
    cond_logits = [c[3] for c in calls]
    assert torch.equal(draw(cfg_scale=1.0), plain)
    # the ramp leaves the coarsest scale unguided: any cfg_scale draws the same scale-0 tokens
    calls.clear()
    guided = draw(cfg_scale=4.0)
    torch.testing.assert_close(calls[0][3][:3], cond_logits[0], rtol=0, atol=1e-12)  # 2n rows vs n: rounding
    assert torch.equal(guided[:, :1], plain[:, :1])
    assert not torch.equal(guided, plain)


def test_guided_step_mixes_conditional_and_null_logits_with_the_ramp_weight():
    model, inputs = tiny_var(), tiny_inputs()
    calls = record_calls(model)
    seen = []
    import vqgan.prior.var_sampling as var_sampling

    original = var_sampling.sample_from_logits

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return original(logits, *args, **kwargs)

    var_sampling.sample_from_logits = spy
    try:
        sample_var(model, inputs, 2, [0, 1], cfg_scale=2.5, generator=torch.Generator().manual_seed(0))
    finally:
        var_sampling.sample_from_logits = original
    for k, (call, mixed) in enumerate(zip(calls, seen)):
        w = 1 + 1.5 * k / (len(SCALES) - 1)
        raw = call[3]
        want = raw[:2] if k == 0 else raw[2:] + w * (raw[:2] - raw[2:])  # weight 1: the conditional rows
        torch.testing.assert_close(mixed, want.flatten(0, 1), rtol=0, atol=1e-12)


def test_var_readme_settings_translate_exactly_cfg_1_5_is_cfg_scale_2_5_and_top_k_then_top_p():
    """recipes/prior_imagenet256_var.yaml samples with VAR's FID settings (cfg 1.5, top-k 900, top-p 0.96) as
    cfg_scale 2.5: VAR's step (FoundationVision/VAR 78b9539, models/var.py autoregressive_infer_cfg) mixes
    (1 + t) cond - t uncond with t = cfg * si / (num_scales - 1), and helpers.sample_with_top_k_top_p_ drops
    what is below the k-th logit, then, over what is left, every token whose ascending cumulative mass is
    <= 1 - top_p. Both written out here from that description and compared with ours."""
    from vqgan.prior.sampling import filter_logits, guided_logits

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 64, generator=g, dtype=torch.float64)
    var_cfg, num_scales = 1.5, 10
    for si, weight in enumerate(guidance_weights(1 + var_cfg, num_scales)):
        t = var_cfg * si / (num_scales - 1)
        torch.testing.assert_close(guided_logits(torch.cat([cond, uncond]), 6, weight), (1 + t) * cond - t * uncond,
                                   rtol=0, atol=1e-12)

    def var_filter(logits, top_k, top_p):
        logits = logits.clone()
        logits[logits < logits.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True)] = -torch.inf
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        return logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)

    logits = 3 * torch.randn(32, 4096, generator=g, dtype=torch.float64)
    for top_k, top_p in [(900, 0.96), (900, 0.95), (50, 0.5)]:
        assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p)),
                           torch.isfinite(var_filter(logits, top_k, top_p)))


def test_top_k_one_is_greedy_per_token():
    model, inputs = tiny_var(), tiny_inputs()
    ids = sample_var(model, inputs, 2, [0, 1], top_k=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = next_scale_logits(model, inputs, ids, torch.tensor([0, 1]))
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_bad_inputs_are_refused_clearly():
    model = tiny_var()
    with pytest.raises(ValueError, match="scales"):
        sample_var(model, tiny_inputs(scales=(1, 2, 4)), 1, [0])
    with pytest.raises(ValueError, match="input_dim"):
        sample_var(model, tiny_inputs(input_dim=5), 1, [0])
    with pytest.raises(ValueError, match="one of"):
        model(torch.zeros(1, 7, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="token ids"):
        next_scale_logits(model, tiny_inputs(), random_ids(1) + K, None)
    with pytest.raises(TypeError, match="not a NextScaleInput"):
        sample_var(model, object(), 1, [0])
    with pytest.raises(ValueError, match="inputs="):
        model.sample(1, [0], SamplingConfig())
    with pytest.raises(ValueError, match="increase"):
        VARConfig(scales=(1, 3, 2))
    with pytest.raises(ValueError, match="class_dropout"):
        sample_var(tiny_var(class_dropout=0.0), tiny_inputs(), 1, [0], cfg_scale=2.0)


def test_sample_method_and_grids():
    model, inputs = tiny_var(), tiny_inputs()
    ids = model.sample(2, [0, 1], SamplingConfig(seed=0), torch.Generator().manual_seed(0), inputs=inputs)
    grids = as_scale_grids(ids, SCALES)
    assert [tuple(g.shape) for g in grids] == [(2, s, s) for s in SCALES]
    assert torch.equal(grids[-1].flatten(1), ids[:, -16:])


def test_tiny_model_overfits_fixed_pyramids():
    """A few fixed class-conditional pyramids are learned: the loss falls far below uniform (log K) in seconds."""
    torch.manual_seed(0)
    model = VARPrior(VARConfig(num_codes=K, scales=SCALES, input_dim=C, num_classes=4, dim=64, depth=2, heads=4,
                               class_dropout=0.0)).train()
    inputs = tiny_inputs(dtype=torch.float32)
    ids, labels = random_ids(4, seed=7), torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = next_scale_loss(model, inputs, ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(K))).item(), rel=0.05)
    assert losses[-1] < 0.1 * losses[0], losses[::15]
    model.eval()
    drawn = sample_var(model, inputs, 4, labels, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, ids)  # greedy sampling reproduces each class's pyramid


def test_reference_input_equals_vars_own_quantizer():
    """ResidualPyramidInput = VAR's idxBl_to_var_input and get_next_autoregressive_input (its models/quant.py,
    run by tests/fixtures/upstream/make_var_input_fixture.py on random weights; VAR computes f_hat in fp32)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(__file__).parent / "fixtures" / "upstream" / "var_next_scale_input.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    scales, ratio = tuple(json.loads(meta["scales"])), float(meta["quant_resi"])
    phi_of_scale = json.loads(meta["phi_of_scale"])

    def phi(h, i):  # VAR's Phi: h (1 - r) + conv(h) r, with the conv VAR picks for scale i
        j = phi_of_scale[i]
        return h * (1 - ratio) + F.conv2d(h, t[f"phi.{j}.weight"], t[f"phi.{j}.bias"], padding=1) * ratio

    inputs = ResidualPyramidInput(t["codebook"], scales, phi)
    ids = [t[f"ids.{k}"] for k in range(len(scales))]
    torch.testing.assert_close(teacher_forcing_input(inputs, ids), t["var_input"], rtol=0, atol=1e-6)
    for k in range(1, len(scales)):
        torch.testing.assert_close(inputs.next_scale_input(ids, k), t[f"autoregressive_input.{k}"], rtol=0, atol=1e-6)


class OnePassInput(ResidualPyramidInput):
    """A tokenizer side that also offers the one-pass teacher-forcing input (as the msvq quantizer does)."""

    calls = 0

    def teacher_forcing_input(self, ids):
        OnePassInput.calls += 1
        f_hat, parts = 0, []
        for k, part in enumerate(split_scales(ids, self.scales)[:-1]):
            f_hat = f_hat + self.upsampled_codes(part, k)
            side = self.scales[k + 1]
            parts.append(F.interpolate(f_hat, size=(side, side), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)


def test_one_pass_teacher_forcing_input_is_used_when_offered_and_equals_the_loop():
    reference = tiny_inputs()
    one_pass = OnePassInput(reference.codebook, SCALES, reference.phi)
    model, ids = tiny_var(), random_ids(3)
    with torch.no_grad():
        want = next_scale_logits(model, reference, ids, None)
        got = next_scale_logits(model, one_pass, ids, None)
    assert OnePassInput.calls == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # uncached sampling's last step asks for scales 1..K-1 holding the ids of scales < K only: the loop, not the one pass
    runs = [sample_var(model, one_pass, 2, [0, 1], generator=torch.Generator().manual_seed(0), use_kv_cache=cache)
            for cache in (True, False)]
    assert torch.equal(*runs)


def test_save_and_load_round_trip_through_the_prior_registry(tmp_path):
    from vqgan.prior.io import load_prior, save_prior

    model, inputs = tiny_var(dtype=torch.float32), tiny_inputs(dtype=torch.float32)
    save_prior(model, tmp_path / "prior")
    loaded, meta = load_prior(tmp_path / "prior")
    assert meta["kind"] == "var" and loaded.config == model.config
    ids = random_ids(2)
    with torch.no_grad():
        assert torch.equal(next_scale_logits(loaded, inputs, ids, None), next_scale_logits(model, inputs, ids, None))


def test_training_loss_without_id_checks_has_no_host_sync():
    from test_engine import HostSyncCounter

    model = tiny_var(dtype=torch.float32).train()
    model.check_ids = False
    inputs, ids, labels = tiny_inputs(dtype=torch.float32), random_ids(4), torch.tensor([0, 1, 2, 1])
    next_scale_loss(model, inputs, ids, labels).backward()  # warm-up
    with HostSyncCounter() as counter:
        next_scale_loss(model, inputs, ids, labels).backward()
    assert counter.seen == [], f"host syncs in the VAR step: {counter.seen}"


def test_one_grid_priors_refuse_multi_scale_token_sets_and_var_checks_its_scales():
    from vqgan.prior.data import check_token_dataset

    meta = {"num_codes": 16, "grid": [4, 4], "tokenizer_hash": "abc123", "scales": [1, 2, 3, 4]}
    with pytest.raises(ValueError, match=r"multi-scale tokens \(scales \[1, 2, 3, 4\], 30 ids per image.*prior: var"):
        check_token_dataset(meta, 16, (4, 4))
    check_token_dataset(meta, 16, (4, 4), scales=SCALES)
    with pytest.raises(ValueError, match=r"has scales \[1, 2, 3, 4\], the next-scale prior expects scales \[1, 2, 4\]"):
        check_token_dataset(meta, 16, (4, 4), scales=(1, 2, 4))
    one_grid = {k: v for k, v in meta.items() if k != "scales"}
    check_token_dataset(one_grid, 16, (4, 4))  # one-grid sets keep working
    check_token_dataset({**one_grid, "scales": [4]}, 16, (4, 4))
    with pytest.raises(ValueError, match="has scales none"):
        check_token_dataset(one_grid, 16, (4, 4), scales=SCALES)


def test_vars_own_pyramid_samples_680_tokens_in_ten_cached_steps_equal_to_teacher_forcing():
    """The default scales (1..16, 680 tokens; 13 -> 16 is a fractional area/bicubic resize) end to end, fp64."""
    model = tiny_var(scales=VAR_SCALES, depth=1)
    inputs = tiny_inputs(scales=VAR_SCALES)
    calls = record_calls(model)
    ids = sample_var(model, inputs, 2, [0, 2], cfg_scale=1.5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 680) and [c[1] for c in calls] == list(range(10))
    rows = torch.tensor([0, 2, 3, 3])
    with torch.no_grad():
        full = next_scale_logits(model, inputs, ids.repeat(2, 1), rows)
    for (_, _, _, logits), (begin, end) in zip(calls, model.bounds):
        torch.testing.assert_close(logits, full[:, begin:end], rtol=0, atol=1e-10)


def test_training_loss_under_bf16_autocast_is_finite_and_close_to_fp32():
    model, inputs = tiny_var(dtype=torch.float32), tiny_inputs(dtype=torch.float32)  # eval: no class dropout
    ids, labels = random_ids(4), torch.tensor([0, 1, 2, 1])
    fp32 = next_scale_loss(model, inputs, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = next_scale_loss(model, inputs, ids, labels)
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()
