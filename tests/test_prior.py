"""Priors over token grids: causality, KV cache, sampling filters, learning a known distribution, token datasets."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vqgan.autoencoder import VQModel, preset
from vqgan.config import from_dict
from vqgan.tokenizer import VQTokenizer
from vqgan.prior import (
    PixelCNNConfig,
    PixelCNNPrior,
    SamplingConfig,
    TransformerConfig,
    TransformerPrior,
    check_token_dataset,
    filter_logits,
    load_token_dataset,
    nll_bits,
    sample_from_logits,
    sample_pixelcnn,
    sample_prior,
    sample_transformer,
    save_token_dataset,
    token_dataset_tensors,
)
from vqgan.prior.io import save_prior


def tiny_transformer(**overrides) -> TransformerPrior:
    cfg = dict(num_codes=6, grid=(4, 4), num_classes=3, dim=16, depth=2, heads=2, mlp_ratio=2.0)
    cfg.update(overrides)
    return TransformerPrior(TransformerConfig(**cfg))


def tiny_pixelcnn(**overrides) -> PixelCNNPrior:
    cfg = dict(num_codes=6, grid=(5, 5), hidden=8, num_layers=5, kernel_size=3, num_classes=0)
    cfg.update(overrides)
    return PixelCNNPrior(PixelCNNConfig(**cfg))


# ----------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("num_classes", [0, 2])
def test_pixelcnn_causal_without_blind_spot(num_classes):
    model = tiny_pixelcnn(num_classes=num_classes).double()
    h, w = model.config.grid
    tokens = torch.randint(0, 6, (1, h, w))
    labels = torch.tensor([1]) if num_classes else None
    x = model.embed(tokens).detach().requires_grad_(True)  # (1, C, h, w)
    logits = model.forward_embeddings(x, labels)           # (1, K, h, w)

    def logits_at(i):
        return logits[0, :, i // w, i % w]

    def per_position(grad):
        return grad[0].abs().sum(0).flatten()

    deps = torch.zeros(h * w, h * w)
    projection = torch.randn(model.config.num_codes, dtype=torch.float64)
    for i in range(h * w):
        (grad,) = torch.autograd.grad(logits_at(i) @ projection, x, retain_graph=True)
        deps[i] = per_position(grad)
    later = torch.ones(h * w, h * w).triu().bool()  # j >= i
    assert deps[later].abs().max() == 0, "a logit depends on its own or a later token"
    # No blind spot: with 5 layers of 3x3 the receptive field covers every earlier position.
    assert (deps[~later] > 0).all(), f"blind spot at {(deps[~later] == 0).nonzero().tolist()}"
    # The classic blind-spot cells of a masked PixelCNN: above and to the right.
    for (r, c), (r0, c0) in [((2, 0), (1, 4)), ((2, 1), (1, 3)), ((3, 0), (1, 4)), ((4, 2), (3, 4)), ((1, 0), (0, 2))]:
        assert deps[r * w + c, r0 * w + c0] > 0, f"({r}, {c}) does not see ({r0}, {c0})"


def test_pixelcnn_receptive_field_grows_with_layers():
    """One 3x3 layer sees one column to the right in the row above and not two (a real constraint)."""
    model = tiny_pixelcnn(num_layers=1).double()
    x = model.embed(torch.randint(0, 6, (1, 5, 5))).detach().requires_grad_(True)
    logits = model.forward_embeddings(x)
    (grad,) = torch.autograd.grad(logits[0, :, 2, 2].sum(), x)
    seen = grad[0].abs().sum(0) > 0  # (5, 5)
    assert seen[1, 3] and not seen[1, 4] and seen[2, 1] and not seen[2, 2]


@pytest.mark.parametrize("positions", ["learned", "rope2d"])
@pytest.mark.parametrize("labels", [None, 2])
def test_transformer_causal(positions, labels):
    model = tiny_transformer(positions=positions)
    n = model.config.seq_len
    tokens = torch.randint(0, 6, (1, 4, 4))
    labels = None if labels is None else torch.tensor([labels])
    x = model.token_emb(model.input_sequence(tokens, labels)).detach().requires_grad_(True)  # (1, L, D)
    logits = model.forward_embeddings(x)  # (1, K, L)
    projection = torch.randn(model.config.num_codes)
    deps = torch.zeros(n, n + 1)  # column 0: the start token; column j + 1: token z_j (input position j + 1)
    for i in range(n):
        (grad,) = torch.autograd.grad(logits[0, :, i] @ projection, x, retain_graph=True)
        deps[i, :n] = grad[0].abs().sum(-1)
    to_token = deps[:, 1:]  # [i, j]: logits of z_i w.r.t. the embedding of z_j
    later = torch.ones(n, n).triu().bool()
    assert to_token[later].max() == 0, "a logit depends on its own or a later token"
    assert (to_token[~later] > 0).all() and (deps[:, 0] > 0).all()


@pytest.mark.parametrize("make", [tiny_pixelcnn, tiny_transformer])
def test_changing_a_token_changes_only_later_logits(make):
    """The same property through the integer-token forward that training uses."""
    model = make().eval()
    h, w = model.config.grid
    labels = torch.tensor([1]) if model.config.num_classes else None
    tokens = torch.randint(0, 6, (1, h, w))
    base = model(tokens, labels)
    for m in (0, 7, h * w - 2):
        changed = tokens.clone()
        changed[0, m // w, m % w] = (changed[0, m // w, m % w] + 1) % 6
        diff = (model(changed, labels) - base).abs().amax(1).flatten()  # (h*w,)
        assert diff[: m + 1].max() == 0 and diff[m + 1 :].min() > 0


# ------------------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("positions", ["learned", "rope2d"])
def test_kv_cache_logits_equal_full_forward(positions):
    model = tiny_transformer(positions=positions).eval()
    tokens, labels = torch.randint(0, 6, (3, 4, 4)), torch.tensor([0, 2, 3])  # 3 = the null class
    full = model(tokens, labels).flatten(2)  # (B, K, L)
    seq = model.input_sequence(tokens, labels)
    cache = model.new_kv_cache(3)
    chunks = [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 16)]  # prefill, a chunk, then single steps
    cached = torch.cat([model(seq[:, a:b], kv_cache=cache, start_pos=a) for a, b in chunks], dim=2)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_kw, sample_kw",
    [
        (dict(num_classes=0), dict()),
        (dict(num_classes=3, positions="rope2d"), dict(labels=[0, 1, 2, 1], top_k=4)),
        (dict(num_classes=3, class_dropout=0.1), dict(labels=2, cfg_scale=3.0, top_p=0.9, temperature=0.8)),
        (dict(num_classes=3, positions="rope2d", class_dropout=0.1),
         dict(labels=[2, 0, 1, 1], cfg_scale=0.5, top_k=3, top_p=0.7)),
    ],
)
def test_kv_cache_sampling_equals_uncached(model_kw, sample_kw):
    model = tiny_transformer(**model_kw)
    with torch.no_grad():
        model.head.weight.mul_(30)  # sharper, distinct distributions so that a wrong logit flips tokens

    def run(seed, use_kv_cache):
        g = torch.Generator().manual_seed(seed)
        return sample_transformer(model, 4, generator=g, use_kv_cache=use_kv_cache, **sample_kw)

    cached = run(0, True)
    assert cached.shape == (4, 4, 4) and cached.dtype == torch.long
    assert torch.equal(cached, run(0, False))
    assert not torch.equal(cached, run(1, True)), "the seed does not reach the samples"


def test_cfg_combines_conditional_and_unconditional_logits():
    model = tiny_transformer(num_classes=3, class_dropout=0.1).eval()
    labels, scale = torch.tensor([0, 1, 2]), 2.5
    with torch.no_grad():
        cond = model(model.start_ids(labels, 3)[:, None])[:, :, 0]  # logits of z_0
        uncond = model(model.start_ids(None, 3)[:, None])[:, :, 0]
    expected = (uncond + scale * (cond - uncond)).argmax(-1)
    tokens = sample_transformer(model, 3, labels, temperature=0.0, cfg_scale=scale)
    assert torch.equal(tokens[:, 0, 0], expected)


def test_class_dropout_only_in_training():
    model = tiny_transformer(num_classes=3, class_dropout=0.3)
    tokens, labels = torch.randint(0, 6, (4000, 4, 4)), torch.ones(4000, dtype=torch.long)
    null = model.config.num_codes + model.config.null_class
    dropped = (model.input_sequence(tokens, labels)[:, 0] == null).float().mean()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    model.eval()
    assert (model.input_sequence(tokens, labels)[:, 0] == null).sum() == 0


# ------------------------------------------------------------------------------------- filters and drawing


def test_top_k_keeps_exactly_k():
    logits = torch.randn(5, 10)
    kept = torch.isfinite(filter_logits(logits, top_k=4))
    assert (kept.sum(-1) == 4).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, logits.topk(4).indices, True))
    ties = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])  # a 3-way tie at the boundary: keep 2, lowest index
    assert torch.isfinite(filter_logits(ties, top_k=2)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(ties, top_k=5)).all()


@pytest.mark.parametrize(
    "probs, top_p, kept",
    [
        ([0.5, 0.3, 0.2], 0.8, [1, 1, 0]),        # reaches p exactly with two
        ([0.5, 0.3, 0.2], 0.81, [1, 1, 1]),
        ([0.5, 0.3, 0.2], 0.5, [1, 0, 0]),
        ([0.5, 0.3, 0.2], 0.01, [1, 0, 0]),       # the most likely token always survives
        ([0.5, 0.3, 0.2], 1.0, [1, 1, 1]),
        ([0.2, 0.4, 0.2, 0.2], 0.5, [1, 1, 0, 0]),   # ties: smallest set, lowest index first
        ([0.2, 0.4, 0.2, 0.2], 0.6, [1, 1, 0, 0]),
        ([0.2, 0.4, 0.2, 0.2], 0.61, [1, 1, 1, 0]),
        ([0.25, 0.25, 0.25, 0.25], 0.75, [1, 1, 1, 0]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(probs, top_p, kept):
    logits = torch.tensor([probs]).log()
    assert torch.isfinite(filter_logits(logits, top_p=top_p)).int().tolist() == [kept]


def test_top_p_matches_brute_force():
    logits = torch.randn(200, 7) * 2
    for p in (0.3, 0.6, 0.9):
        kept = torch.isfinite(filter_logits(logits, top_p=p))
        for row, keep in zip(logits.double().softmax(-1), kept):
            order = row.argsort(descending=True)
            size = int((row[order].cumsum(0) < p).sum()) + 1  # smallest prefix with mass >= p
            assert keep.sum() == size and keep[order[:size]].all()


def test_top_k_then_top_p_renormalizes():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # after top-2 the mass is (4/7, 3/7): p = 0.5 keeps one, p = 0.6 keeps both
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5)).sum() == 1
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).sum() == 2


def test_temperature_zero_is_argmax_and_draws_nothing():
    logits = torch.randn(8, 11)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(sample_from_logits(logits, 0.0, generator=g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)
    assert torch.equal(sample_from_logits(logits, 0.0, top_k=2, top_p=0.3), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_frequencies_match_tempered_distribution(temperature):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    ids = sample_from_logits(probs.log().expand(n, 4), temperature, generator=torch.Generator().manual_seed(0))
    target = probs ** (1 / temperature)
    target = target / target.sum()
    freq = torch.bincount(ids, minlength=4).double() / n
    assert ((freq - target).abs() <= 4 * (target * (1 - target) / n).sqrt()).all(), (freq, target)


def test_filtered_tokens_are_never_drawn():
    logits = torch.randn(1, 9).expand(5000, 9)
    ids = sample_from_logits(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=7), "top_k"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_invalid_settings_raise_naming_them(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        sample_from_logits(torch.randn(2, 6), **kwargs)
    with pytest.raises(ValueError, match=setting):
        sample_transformer(tiny_transformer(), 1, **kwargs)
    with pytest.raises(ValueError, match=setting):
        sample_pixelcnn(tiny_pixelcnn(), 1, **kwargs)


def test_invalid_labels_and_guidance_raise():
    with pytest.raises(ValueError, match="class id 3 out of range"):
        sample_transformer(tiny_transformer(num_classes=3), 2, labels=[0, 3])
    with pytest.raises(ValueError, match="cfg_scale.*num_classes=0"):
        sample_transformer(tiny_transformer(num_classes=0), 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="cfg_scale.*needs labels"):
        sample_transformer(tiny_transformer(num_classes=3), 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        sample_transformer(tiny_transformer(num_classes=0), 2, labels=1)
    with pytest.raises(ValueError, match="labels"):
        sample_pixelcnn(tiny_pixelcnn(num_classes=2), 2)
    with pytest.raises(ValueError, match="cfg_scale"):
        tiny_pixelcnn().sample(1, config=SamplingConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="labels"):
        tiny_pixelcnn(num_classes=2).sample(1, config=SamplingConfig())  # no null class: labels are required
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=2.0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
        tiny_transformer()(torch.full((1, 4, 4), 6))
    with pytest.raises(ValueError, match=r"tokens must be a \(B, 4, 4\)"):
        tiny_transformer()(torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 4"):
        TransformerConfig(dim=24, heads=4, positions="rope2d")


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(), r"labels=None samples from the null class"),
        (dict(labels=[0, 1], cfg_scale=2.0), r"cfg_scale=2\.0 uses the null class as the unconditional branch"),
    ],
    ids=["no-labels", "cfg"],
)
def test_untrained_null_class_is_refused(kwargs, why):
    """class_dropout=0 never trains the null class, so neither unconditional sampling nor CFG may use it."""
    model = tiny_transformer(num_classes=3, class_dropout=0.0)
    fix = r"train with transformer\.class_dropout > 0, e\.g\. 0\.1, or pass labels and cfg_scale=1"
    with pytest.raises(ValueError, match=rf"{why}.*class_dropout=0, so its null class never trained: {fix}"):
        sample_transformer(model, 2, **kwargs)
    with pytest.raises(ValueError, match=why):
        model.sample(2, kwargs.get("labels"), SamplingConfig(cfg_scale=kwargs.get("cfg_scale", 1.0)))
    assert sample_transformer(model, 2, labels=[0, 1]).shape == (2, 4, 4)  # labels, no guidance: fine
    trained = tiny_transformer(num_classes=3, class_dropout=0.1)
    assert sample_transformer(trained, 2, **kwargs).shape == (2, 4, 4)
    assert sample_transformer(tiny_transformer(num_classes=0), 2).shape == (2, 4, 4)  # its start token trains


def test_sample_tool_reports_the_untrained_null_class_in_one_line(tmp_path, capsys):
    tokenizer_dir = VQTokenizer.from_model(VQModel(preset("tiny"))).save_pretrained(tmp_path / "tokenizer")  # K=256
    prior_dir = save_prior(tiny_transformer(num_codes=256, num_classes=3), tmp_path / "prior",
                           {"tokenizer": str(tokenizer_dir)})
    from vqgan.cli import sample as tool
    assert tool.main([str(prior_dir), "--out", str(tmp_path / "out"), "--num-samples", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: labels=None samples from the null class")
    assert "transformer.class_dropout > 0" in err


def test_configs_are_frozen_and_load_from_dicts():
    cfg = from_dict(TransformerConfig, {"grid": [8, 4], "positions": "rope2d", "dim": 64, "heads": 4})
    assert cfg.grid == (8, 4) and cfg.seq_len == 32
    with pytest.raises(AttributeError):
        cfg.dim = 3
    assert from_dict(PixelCNNConfig, {"grid": [3, 5]}).grid == (3, 5)
    assert PixelCNNConfig(grid=6).grid == (6, 6)


def test_nll_bits_of_uniform_and_perfect_predictions():
    tokens = torch.randint(0, 16, (2, 3, 5))
    per_token, per_image = nll_bits(torch.zeros(2, 16, 3, 5), tokens)
    assert math.isclose(per_token.item(), 4.0, rel_tol=1e-6) and math.isclose(per_image.item(), 60.0, rel_tol=1e-6)
    perfect = F.one_hot(tokens, 16).permute(0, 3, 1, 2).float() * 100
    assert nll_bits(perfect, tokens)[0] < 1e-6


# --------------------------------------------------------------------------------- learning known data

TRANSITIONS = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.05, 0.05, 0.1, 0.8], [0.5, 0.2, 0.2, 0.1]])
INITIAL = torch.tensor([0.4, 0.3, 0.2, 0.1])


def markov_grids(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4, 4) grids whose raster sequence is a Markov chain: z_t ~ TRANSITIONS[z_{t-1}]."""
    z = torch.empty(n, 16, dtype=torch.long)
    z[:, 0] = torch.multinomial(INITIAL.expand(n, 4), 1, generator=generator)[:, 0]
    for t in range(1, 16):
        z[:, t] = torch.multinomial(TRANSITIONS[z[:, t - 1]], 1, generator=generator)[:, 0]
    return z.view(n, 4, 4)


def markov_entropy_bits_per_token() -> float:
    """Exact entropy rate of the 16-token chain: H(z_0) + sum_t E[H(z_t | z_{t-1})], over 16."""
    row_entropy = -(TRANSITIONS * TRANSITIONS.log2()).sum(1)
    marginal, total = INITIAL.clone(), -(INITIAL * INITIAL.log2()).sum()
    for _ in range(15):
        total += (marginal * row_entropy).sum()
        marginal = marginal @ TRANSITIONS
    return float(total) / 16


def train(model, batches, steps: int, lr: float = 3e-3):
    """AdamW with a one-cycle schedule; batches() -> (tokens, labels)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        tokens, labels = batches()
        loss = F.cross_entropy(model(tokens, labels), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.mark.parametrize(
    "make, steps",
    [
        (lambda: TransformerPrior(TransformerConfig(num_codes=4, grid=(4, 4), dim=32, depth=2, heads=2, mlp_ratio=2.0)), 200),
        # 4 layers of 3x3 reach 3 columns right in the row above: (r, 0) sees its predecessor (r-1, 3).
        (lambda: PixelCNNPrior(PixelCNNConfig(num_codes=4, grid=(4, 4), hidden=16, num_layers=4, kernel_size=3)), 200),
    ],
    ids=["transformer", "pixelcnn"],
)
def test_prior_learns_a_markov_chain(make, steps):
    data = torch.Generator().manual_seed(1)
    model = train(make(), lambda: (markov_grids(64, data), None), steps, lr=1e-2)

    held_out = markov_grids(4000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        bits, bits_per_image = nll_bits(model(held_out), held_out)
    entropy = markov_entropy_bits_per_token()
    assert math.isclose(bits_per_image.item(), 16 * bits.item(), rel_tol=1e-6)
    # Cross-entropy cannot beat the entropy (up to sampling noise of the held-out set) and should be near it;
    # the uniform prior would be log2 4 = 2 bits per token.
    assert entropy - 0.02 < bits.item() < entropy + 0.02, (bits.item(), entropy)

    # Sampled transition frequencies match the chain within 4 binomial sigmas per cell.
    z = model.sample(1000, generator=torch.Generator().manual_seed(3)).flatten(1)  # (1000, 16)
    counts = torch.zeros(4, 4)
    counts.index_put_((z[:, :-1].flatten(), z[:, 1:].flatten()), torch.ones(15 * 1000), accumulate=True)
    trials = counts.sum(1, keepdim=True)
    sigma = (TRANSITIONS * (1 - TRANSITIONS) / trials).sqrt()
    z_scores = (counts / trials - TRANSITIONS) / sigma
    assert z_scores.abs().max() < 4, z_scores
    first = torch.bincount(z[:, 0], minlength=4) / 1000.0
    assert ((first - INITIAL).abs() < 4 * (INITIAL * (1 - INITIAL) / 1000).sqrt()).all(), first


@pytest.mark.parametrize(
    "make",
    [
        lambda: TransformerPrior(TransformerConfig(num_codes=16, grid=(4, 4), num_classes=4, dim=32, depth=2,
                                                   heads=2, mlp_ratio=2.0, positions="rope2d")),
        lambda: PixelCNNPrior(PixelCNNConfig(num_codes=16, grid=(4, 4), hidden=32, num_layers=3, kernel_size=3,
                                             num_classes=4)),
    ],
    ids=["transformer", "pixelcnn"],
)
def test_class_conditional_prior_overfits_and_reproduces_grids(make):
    grids = torch.randint(0, 16, (4, 4, 4))
    labels = torch.arange(4)
    model = train(make(), lambda: (grids, labels), steps=150, lr=1e-2)
    with torch.no_grad():
        bits, _ = nll_bits(model(grids, labels), grids)
    assert bits < 0.05, bits  # vs log2 16 = 4 bits per token for the uniform prior
    greedy = SamplingConfig(num_samples=4, batch_size=3, temperature=0.0)
    assert torch.equal(sample_prior(model, greedy, labels=[3, 2, 1, 0]), grids.flip(0))


# ------------------------------------------------------------------------------------------ token datasets


def test_token_dataset_round_trip_and_overwrite(tmp_path):
    tokens, labels = torch.randint(0, 16, (5, 3, 4)), torch.tensor([0, 1, 2, 1, 0])
    meta = {"num_codes": 16, "grid": [3, 4], "tokenizer_hash": "abc123"}
    path = tmp_path / "tokens"
    save_token_dataset(path, tokens, labels, meta)
    dataset, loaded_meta = load_token_dataset(path)
    assert loaded_meta == meta and json.loads((path / "tokenizer.json").read_text()) == meta
    got_tokens, got_labels = token_dataset_tensors(dataset)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_labels, labels)
    check_token_dataset(loaded_meta, 16, (3, 4))

    save_token_dataset(path, tokens[:2], None, meta)  # replace in place, without labels
    dataset, _ = load_token_dataset(path)
    got_tokens, got_labels = token_dataset_tensors(dataset)
    assert torch.equal(got_tokens, tokens[:2]) and got_labels is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"], "temporary folders were left behind"


def test_token_dataset_mismatch_errors(tmp_path):
    meta = {"num_codes": 16, "grid": [3, 4], "tokenizer_hash": "abc123"}
    with pytest.raises(ValueError, match=r"num_codes: dataset has K=16, prior expects K=1024"):
        check_token_dataset(meta, 1024, (3, 4))
    with pytest.raises(ValueError, match=r"grid: dataset has \(3, 4\), prior expects \(4, 3\)"):
        check_token_dataset(meta, 16, (4, 3))
    with pytest.raises(ValueError, match="lacks.*tokenizer_hash"):
        check_token_dataset({"num_codes": 16, "grid": [3, 4]}, 16, (3, 4))
    with pytest.raises(ValueError, match="does not match tokens"):
        save_token_dataset(tmp_path / "a", torch.zeros(2, 4, 4, dtype=torch.long), None, meta)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        save_token_dataset(tmp_path / "b", torch.full((2, 3, 4), 16), None, meta)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_token_dataset(tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
