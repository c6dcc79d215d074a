"""MaskGIT prior: mask schedules, parallel decoding invariants, bidirectional attention, CFG, and learning a
known token distribution, with the same learning test for the GPT and PixelCNN priors."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from vqgan.autoencoder import VQModel, preset
from vqgan.tokenizer import VQTokenizer
from vqgan.prior import (
    MaskGITConfig,
    MaskGITPrior,
    PixelCNNConfig,
    PixelCNNPrior,
    SamplingConfig,
    TransformerConfig,
    TransformerPrior,
    maskgit_decode,
    sample_maskgit,
    sample_prior,
)
from vqgan.prior.evaluate import nll_bits_per_token, token_statistics_distance
from vqgan.prior.io import load_prior, save_prior
from vqgan.prior.mask_schedule import MASK_SCHEDULES, mask_ratio, masked_counts
from vqgan.prior.maskgit import masked_token_loss, training_mask
from vqgan.prior.sampling import guided_logits
from vqgan.train_prior import prior_step

from test_prior import markov_grids  # the known chain test_prior's autoregressive priors learn too


def tiny_maskgit(**overrides) -> MaskGITPrior:
    cfg = dict(num_codes=6, grid=(4, 4), num_classes=3, dim=16, depth=2, heads=2, mlp_ratio=2.0)
    cfg.update(overrides)
    return MaskGITPrior(MaskGITConfig(**cfg))


# ------------------------------------------------------------------------------------------ mask schedules


@pytest.mark.parametrize("steps", [1, 8, 12, 16])
def test_cosine_counts_per_step_follow_the_schedule(steps):
    counts = masked_counts("cosine", torch.tensor([256]), steps)[0].tolist()
    expected = [math.floor(256 * math.cos(math.pi / 2 * (t + 1) / steps)) for t in range(steps)]
    expected[-1] = 0  # cos(pi/2) is 6e-17, not 0: the last step reveals the rest
    assert counts == expected


@pytest.mark.parametrize("name", sorted(MASK_SCHEDULES))
def test_every_schedule_reveals_at_least_one_per_step_and_ends_unmasked(name):
    assert float(mask_ratio(name, torch.tensor(0.0), 256)) == pytest.approx(1.0, abs=1 / 256)  # exp: 1 - 1/256
    for unknown, steps in [(256, 8), (256, 12), (16, 12), (12, 12), (64, 1)]:
        counts = masked_counts(name, torch.tensor([unknown]), steps)[0]
        before = torch.cat([torch.tensor([unknown]), counts[:-1]])
        assert (counts < before).all() and counts[-1] == 0, (name, unknown, steps, counts)


def test_linear_counts_by_hand():
    assert masked_counts("linear", torch.tensor([10, 20]), 4).tolist() == [[7, 5, 2, 0], [15, 10, 5, 0]]


def test_training_mask_follows_the_cosine_schedule():
    torch.manual_seed(0)
    mask = training_mask((20000, 4, 4), "cosine")
    fraction = mask.flatten(1).float().mean(1)
    assert (mask.flatten(1).sum(1) >= 1).all()
    # E[ceil(16 cos(pi r / 2))] / 16 for r ~ U[0, 1), by quadrature; binomial-ish noise of 20000 rows
    r = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    expected = torch.ceil(16 * torch.cos(math.pi / 2 * r)).clamp(1, 16).mean() / 16
    assert abs(fraction.mean().item() - expected.item()) < 4 * fraction.std().item() / math.sqrt(20000)
    per_position = mask.float().mean(0)  # positions are chosen uniformly
    assert (per_position - per_position.mean()).abs().max() < 0.02


def test_masked_token_loss_ignores_unmasked_positions():
    logits = torch.randn(2, 5, 3, 3)
    tokens = torch.randint(0, 5, (2, 3, 3))
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = True
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, :, 1, 2], logits[1, :, 0, 0]]),
                                                 torch.stack([tokens[0, 1, 2], tokens[1, 0, 0]]))
    assert torch.allclose(masked_token_loss(logits, tokens, mask), expected)
    logits[~mask.unsqueeze(1).expand_as(logits)] = 100.0  # anything at the unmasked positions
    assert torch.allclose(masked_token_loss(logits, tokens, mask), expected)


# -------------------------------------------------------------------------------------- decoding invariants


@pytest.mark.parametrize("schedule, steps", [("cosine", 12), ("linear", 8), ("exp", 16), ("cosine", 1)])
def test_decoding_unmasks_every_position_once_and_never_changes_a_fixed_token(schedule, steps):
    model = tiny_maskgit(num_classes=0)
    g = torch.Generator().manual_seed(0)
    states = list(maskgit_decode(model, 5, steps=steps, schedule=schedule, generator=g))
    assert len(states) == steps
    expected_counts = masked_counts(schedule, torch.full((5,), 16), steps)
    previous_mask = torch.ones(5, 4, 4, dtype=torch.bool)
    previous_tokens = None
    revealed_at = torch.full((5, 4, 4), -1)
    for state in states:
        assert torch.equal(state.mask.flatten(1).sum(1), expected_counts[:, state.step])
        assert not (state.mask & ~previous_mask).any(), "a revealed position was masked again"
        newly = previous_mask & ~state.mask
        assert newly.flatten(1).sum(1).min() >= 1
        revealed_at[newly] = state.step
        if previous_tokens is not None:
            fixed = ~previous_mask
            assert torch.equal(state.tokens[fixed], previous_tokens[fixed]), "a fixed token changed"
        assert (state.tokens[state.mask] == 0).all()
        previous_mask, previous_tokens = state.mask, state.tokens
    assert not states[-1].mask.any() and (revealed_at >= 0).all()  # each position revealed at exactly one step


def test_given_tokens_are_kept_and_only_the_rest_is_decoded():
    model = tiny_maskgit(num_classes=0)
    tokens = torch.randint(0, 6, (3, 4, 4), generator=torch.Generator().manual_seed(5))
    known = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(6)) < 0.5
    known[:, 0, 0] = False
    states = list(maskgit_decode(model, 3, steps=4, generator=torch.Generator().manual_seed(0), tokens=tokens,
                                 known=known))
    for state in states:
        assert torch.equal(state.tokens[known], tokens[known]) and not state.mask[known].any()
    counts = masked_counts("cosine", (~known).flatten(1).sum(1), 4)
    assert torch.equal(torch.stack([s.mask.flatten(1).sum(1) for s in states], 1), counts)


def test_sampling_is_deterministic_for_a_seed_and_the_seed_matters():
    model = tiny_maskgit(num_classes=3, class_dropout=0.1)
    with torch.no_grad():
        model.head.weight.mul_(30)
    config = SamplingConfig(num_samples=6, batch_size=4, top_k=4, cfg_scale=2.0, seed=3)
    labels = [0, 1, 2, 0, 1, 2]
    first = sample_prior(model, config, labels=labels)
    assert first.shape == (6, 4, 4) and first.dtype == torch.long
    assert torch.equal(first, sample_prior(model, config, labels=labels))
    assert not torch.equal(first, sample_prior(model, SamplingConfig(**{**config.__dict__, "seed": 4}), labels=labels))


# ------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("positions", ["learned", "rope2d"])
def test_attention_is_bidirectional_every_position_sees_every_other(positions):
    model = tiny_maskgit(num_classes=3, positions=positions, dim=32, heads=2).eval()
    ids = model.input_ids(torch.randint(0, 6, (1, 4, 4)), torch.rand(1, 4, 4) < 0.5, torch.tensor([1]))
    x = model.token_emb(ids).detach().requires_grad_(True)                             # (1, 17, dim)
    logits = model.forward_embeddings(x)                                                # (1, K, 16)
    for i in range(16):
        (grad,) = torch.autograd.grad(logits[0, :, i].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(-1) > 0                                                # (17,) class + grid
        assert seen.all(), (i, seen)


def test_unmasked_tokens_reach_every_position_and_masked_tokens_reach_none():
    model = tiny_maskgit(num_classes=0, dim=32).eval()
    tokens = torch.randint(0, 6, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2, 1] = mask[0, 3, 3] = True
    with torch.no_grad():
        base = model(tokens, None, mask)
        for r, c in [(0, 0), (1, 3), (3, 2)]:  # unmasked: changing the token changes every position's logits
            changed = tokens.clone()
            changed[0, r, c] = (changed[0, r, c] + 1) % 6
            diff = (model(changed, None, mask) - base).abs().amax(1)[0]                 # (4, 4)
            assert (diff > 0).all(), (r, c, diff)
        hidden = tokens.clone()
        hidden[0, 2, 1] = (hidden[0, 2, 1] + 3) % 6  # under the mask: nothing changes
        assert torch.equal(model(hidden, None, mask), base)


def test_cfg_combines_logits_as_the_gpt_sampler_does():
    model = tiny_maskgit(num_classes=3, class_dropout=0.1).eval()
    labels, scale = torch.tensor([0, 1, 2]), 2.5
    everything = torch.ones(3, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        cond = model(torch.zeros(3, 4, 4, dtype=torch.long), labels, everything)
        uncond = model(torch.zeros(3, 4, 4, dtype=torch.long), torch.full((3,), 3), everything)
    expected = uncond + scale * (cond - uncond)                                          # (3, K, 4, 4)
    assert torch.equal(guided_logits(torch.cat([cond, uncond]), 3, scale), expected)  # the GPT's combination
    # One step reveals every position from the all-masked grid: greedy tokens are the guided argmax.
    tokens = sample_maskgit(model, 3, labels, temperature=0.0, cfg_scale=scale, steps=1)
    assert torch.equal(tokens, expected.argmax(1))
    assert not torch.equal(tokens, cond.argmax(1)) or not torch.equal(tokens, uncond.argmax(1))


def test_class_dropout_only_in_training():
    model = tiny_maskgit(num_classes=3, class_dropout=0.3)
    tokens, labels = torch.randint(0, 6, (4000, 4, 4)), torch.ones(4000, dtype=torch.long)
    none = torch.zeros_like(tokens, dtype=torch.bool)
    null = model.config.num_codes + model.config.null_class
    dropped = (model.input_ids(tokens, none, labels)[:, 0] == null).float().mean()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert (model.eval().input_ids(tokens, none, labels)[:, 0] == null).sum() == 0


def test_save_load_round_trip(tmp_path):
    model = tiny_maskgit(positions="rope2d", class_dropout=0.1)
    save_prior(model, tmp_path / "prior")
    loaded, meta = load_prior(tmp_path / "prior")
    assert meta["kind"] == "maskgit" and loaded.config == model.config
    tokens, mask = torch.randint(0, 6, (2, 4, 4)), torch.rand(2, 4, 4) < 0.5
    with torch.no_grad():
        assert torch.equal(loaded(tokens, torch.tensor([0, 2]), mask), model.eval()(tokens, torch.tensor([0, 2]), mask))
    assert nll_bits_per_token(loaded, tokens) is None  # MaskGIT defines no likelihood


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), r"steps must be an integer >= 1"),
        (dict(steps=17), r"steps=17 but a grid has only 16 masked positions"),
        (dict(schedule="cosin"), r"unknown mask schedule 'cosin'; choose from \['cosine', 'cubic', 'exp'"),
        (dict(choice_temperature=-1.0), r"choice_temperature must be a finite number >= 0"),
        (dict(temperature=-1.0), r"temperature must be a finite number >= 0"),
        (dict(top_k=7), r"top_k must be <= the number of codes 6"),
        (dict(cfg_scale=2.0, labels=None), r"cfg_scale=2.0 needs labels"),
        (dict(cfg_scale=2.0), r"maskgit\.class_dropout=0, so its null class never trained"),
        (dict(labels=3), r"class id 3 out of range \[0, 3\)"),
    ],
)
def test_invalid_settings_are_clear_errors(kwargs, message):
    model = tiny_maskgit(num_classes=3)
    kwargs = {"labels": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_maskgit(model, 2, **kwargs)


def test_invalid_sampling_config_and_model_config():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError, match="unknown mask schedule 'zigzag'"):
        SamplingConfig(mask_schedule="zigzag")
    with pytest.raises(ValueError, match="choice_temperature must be a finite number >= 0"):
        SamplingConfig(choice_temperature=math.inf)
    with pytest.raises(ValueError, match="unknown mask schedule 'zigzag'"):
        MaskGITConfig(mask_schedule="zigzag")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        MaskGITConfig(label_smoothing=1.0)


# --------------------------------------------- learning a known distribution: the three families alike

FAMILIES = {
    "maskgit": lambda: MaskGITPrior(MaskGITConfig(num_codes=4, grid=(4, 4), dim=32, depth=2, heads=2, mlp_ratio=2.0)),
    "transformer": lambda: TransformerPrior(TransformerConfig(num_codes=4, grid=(4, 4), dim=32, depth=2, heads=2,
                                                              mlp_ratio=2.0)),
    # 4 layers of 3x3 reach 3 columns right in the row above: (r, 0) sees its predecessor (r-1, 3).
    "pixelcnn": lambda: PixelCNNPrior(PixelCNNConfig(num_codes=4, grid=(4, 4), hidden=16, num_layers=4,
                                                     kernel_size=3)),
}
# Total-variation tolerances for 1000 sampled grids; two independent sets of 1000 true grids differ by
# about 0.005 (unigram) and 0.013 (neighbour pairs), the noise floor the test measures too.
UNIGRAM_TOLERANCE, PAIR_TOLERANCE = 0.03, 0.05
# MaskGIT's default decoding keeps the most confident draws (choice_temperature 4.5, annealed): that
# over-selects likely tokens, a mode-seeking bias MaskGIT accepts for image fidelity (Chang et al. 2022,
# section 3.2). Measured here at about 0.11 (unigram) and 0.12 (pairs); decoding in random order
# (a huge choice temperature) removes it and meets the common tolerances.
MASKGIT_DEFAULT_TOLERANCE = 0.2
RANDOM_ORDER = {"choice_temperature": 1e4}


@functools.lru_cache(maxsize=None)
def trained_on_markov_grids(family: str) -> torch.nn.Module:
    """The family's tiny prior after 600 steps of its own training objective on Markov-chain grids."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    masking = model.config if family == "maskgit" else None
    steps, lr = 600, 1e-2
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    data = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):  # the trainer's own step function, so each family trains on its own objective
        prior_step(model, markov_grids(64, data), None, masking=masking)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return model.eval()


@pytest.mark.parametrize(
    "family, sampling, unigram_tolerance, pair_tolerance",
    [
        ("transformer", {}, UNIGRAM_TOLERANCE, PAIR_TOLERANCE),
        ("pixelcnn", {}, UNIGRAM_TOLERANCE, PAIR_TOLERANCE),
        ("maskgit", RANDOM_ORDER, UNIGRAM_TOLERANCE, PAIR_TOLERANCE),
        ("maskgit", {}, MASKGIT_DEFAULT_TOLERANCE, MASKGIT_DEFAULT_TOLERANCE),
    ],
    ids=["transformer", "pixelcnn", "maskgit-random-order", "maskgit-defaults"],
)
def test_each_family_recovers_unigram_and_neighbour_pair_frequencies(family, sampling, unigram_tolerance,
                                                                    pair_tolerance):
    model = trained_on_markov_grids(family)
    config = SamplingConfig(num_samples=1000, batch_size=500, seed=3, **sampling)  # otherwise the defaults
    samples = sample_prior(model, config)
    reference = markov_grids(20000, torch.Generator().manual_seed(2))
    floor = token_statistics_distance(markov_grids(1000, torch.Generator().manual_seed(4)), reference, 4)
    got = token_statistics_distance(samples, reference, 4)
    assert floor["unigram"] < UNIGRAM_TOLERANCE / 2 and floor["pair"] < PAIR_TOLERANCE / 2, floor
    assert got["unigram"] < unigram_tolerance and got["pair"] < pair_tolerance, (family, got, floor)
    if family == "maskgit" and not sampling:  # the bias goes towards the likely codes: lower entropy
        def entropy(tokens):
            p = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
            return float(-(p * p.clamp_min(1e-12).log()).sum())
        assert entropy(samples) < entropy(reference)
    nll = nll_bits_per_token(model, reference[:2000])
    assert (nll is None) == (family == "maskgit")


def test_token_statistics_distance_by_hand():
    a = torch.tensor([[[0, 1], [1, 1]]])
    b = torch.tensor([[[0, 0], [0, 0]]])
    d = token_statistics_distance(a, b, 2)
    assert d["unigram"] == pytest.approx(0.75)             # (1/4, 3/4) vs (1, 0)
    assert d["pair_right"] == pytest.approx(1.0)           # {(0,1), (1,1)} vs {(0,0), (0,0)}
    assert d["pair_down"] == pytest.approx(1.0)            # {(0,1), (1,1)} vs {(0,0), (0,0)}
    assert token_statistics_distance(a, a, 2) == {"unigram": 0.0, "pair_right": 0.0, "pair_down": 0.0, "pair": 0.0}
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\)"):
        token_statistics_distance(a + 1, b, 2)


def test_sample_tool_samples_a_maskgit_prior_with_its_steps(tmp_path, capsys):
    tokenizer_dir = VQTokenizer.from_model(VQModel(preset("tiny"))).save_pretrained(tmp_path / "tokenizer")  # K=256
    model = tiny_maskgit(num_codes=256, num_classes=0)
    prior_dir = save_prior(model, tmp_path / "prior", {"tokenizer": str(tokenizer_dir)})
    from vqgan.cli import sample as tool
    out = tmp_path / "out"
    args = [str(prior_dir), "--out", str(out), "--num-samples", "3", "--device", "cpu", "--seed", "5"]
    assert tool.main([*args, "--steps", "4", "--mask-schedule", "linear", "--choice-temperature", "2"]) == 0
    expected = sample_prior(model.eval(), SamplingConfig(num_samples=3, seed=5, steps=4, mask_schedule="linear",
                                                         choice_temperature=2.0))
    assert json.loads((out / "tokens.json").read_text()) == expected.tolist()
    assert (out / "grid.png").is_file()
    assert tool.main([*args, "--steps", "17"]) == 2  # a 4x4 grid has 16 positions
    assert "steps=17 but a grid has only 16 masked positions" in capsys.readouterr().err


def test_fid_prior_source_samples_a_maskgit_prior(tmp_path, monkeypatch):
    """vqgan-fid's `prior:` source (gFID) goes through sample_prior, so it takes MaskGIT unchanged."""
    tokenizer_dir = VQTokenizer.from_model(VQModel(preset("tiny"))).save_pretrained(tmp_path / "tokenizer")
    prior_dir = save_prior(tiny_maskgit(num_codes=256, num_classes=3), tmp_path / "prior", {"tokenizer": str(tokenizer_dir)})
    from vqgan.metrics.sources import SourceOptions, prior_samples

    options = SourceOptions(num_samples=5, batch_size=4, steps=4)
    batches = list(prior_samples(str(prior_dir), 0, 1, options, torch.device("cpu")))
    assert [b.shape[0] for b in batches] == [4, 1] and batches[0].dtype == torch.uint8
    assert batches[0].shape[1:] == (3, 16, 16)  # 4x4 tokens, f=4


def test_a_damaged_prior_folder_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from vqgan.folder_format import ExportError

    folder = save_prior(tiny_maskgit(), tmp_path / "prior")
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "head.weight"}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"missing keys: head\.weight"):
        load_prior(folder)
    save_file({**state, "head.weight": torch.zeros(3, 16)}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"head\.weight has shape \(3, 16\).*\(6, 16\)"):
        load_prior(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_prior(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ExportError, match="config.json: not valid JSON"):
        load_prior(folder)
