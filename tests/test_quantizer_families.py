"""Every quantizer kind (vq, fsq, lfq, ibq, simvq): its mathematics against brute force, the shared
interface (exact rebuild from indices, fp32 under autocast, state round trip), bad configs, rank
agreement, and a tiny end-to-end train + resume + export + ONNX per kind."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vqgan.config import ConfigError, from_dict, to_dict
from vqgan.quantize import KINDS, QuantizerConfig, QuantizerOutput, build_quantizer
from vqgan.quantizers.ibq import softmax_logits_gradient
from vqgan.quantizers.lfq import lfq_entropy_terms


# Every kind with its defaults, and beside them the settings README / the quickstart recommend where
# those differ (the entropy terms), and SEED-Voken's ibq without restarts.
CASES = {
    "vq": ("vq", {}),
    "simvq": ("simvq", {}),
    "ibq": ("ibq", {}),
    "ibq+entropy": ("ibq", {"entropy_weight": 0.05, "entropy_temperature": 0.01}),
    "ibq+entropy-restarts": ("ibq", {"entropy_weight": 0.05, "entropy_temperature": 0.01, "dead_code_threshold": 0}),
    "fsq": ("fsq", {}),
    "fsq+entropy": ("fsq", {"entropy_weight": 0.1, "entropy_temperature": 0.1}),
    "lfq": ("lfq", {}),
    "lfq+entropy": ("lfq", {"entropy_weight": 0.1, "entropy_temperature": 0.01}),
}


def small_config(case: str, **options) -> QuantizerConfig:
    kind, base = CASES[case]
    return QuantizerConfig(kind=kind, num_codes=64, dim=8, **{**base, **options})


def trained(case: str, steps: int = 3, **options):
    torch.manual_seed(0)
    q = build_quantizer(small_config(case, **options))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(steps):
        out = q(torch.randn(2, 8, 4, 4))
        opt.zero_grad()
        (out.loss + out.quantized.square().mean()).backward()
        opt.step()
    return q


# -- the shared interface ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_eval_output_is_rebuilt_exactly_from_indices_and_changes_no_state(case):
    q = trained(case).eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    for z in (torch.randn(2, 8, 5, 3, requires_grad=True), torch.randn(7, 8)):
        out = q(z)
        assert isinstance(out, QuantizerOutput)
        assert out.indices.shape == (z.shape[0], *z.shape[2:]) and out.indices.dtype == torch.long
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 64
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
        assert torch.equal(q.lookup(z), out.indices)
        assert out.quantized.shape == z.shape
        for name in ("loss", "codebook_loss", "commitment_loss", "entropy_loss", "perplexity", "usage"):
            assert getattr(out, name).dim() == 0, name
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key
    # the codebook property agrees with indices_to_codes in the lookup space
    ids = torch.arange(64)
    assert torch.equal(q.codebook.detach(), q.codes_for(ids).detach())


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_and_fp32_under_bf16_autocast(case):
    q = trained(case)
    fresh = build_quantizer(q.config)
    fresh.load_state_dict(q.state_dict())
    z = torch.randn(3, 8, 4, 4)
    q.eval(), fresh.eval()
    assert torch.equal(q(z).quantized, fresh(z).quantized)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fresh(z.bfloat16())
    assert torch.equal(out.indices, fresh(z.bfloat16().float()).indices)  # searched in fp32
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("case", CASES)
def test_training_counts_real_assignments_into_usage(case):
    q = build_quantizer(small_config(case, usage_window=10_000))
    out = q(torch.randn(4, 8, 4, 4))
    assert out.usage.item() == pytest.approx(out.indices.unique().numel() / 64)
    assert int(q.seen) == 64 and int(q.step) == 1


# -- fsq -------------------------------------------------------------------------------------------


def test_fsq_levels_default_to_a_power_of_two_product_and_explicit_levels_are_checked():
    for bits in range(1, 19):
        levels = QuantizerConfig(kind="fsq", num_codes=2**bits, dim=8).levels
        assert math.prod(levels) == 2**bits and all(level in (2, 4, 8) for level in levels)
    assert QuantizerConfig(kind="fsq", num_codes=2**14, dim=8).levels == (8, 8, 8, 8, 4)
    assert QuantizerConfig(kind="fsq", num_codes=1000, dim=8, fsq_levels=(8, 5, 5, 5)).lookup_dim == 4
    with pytest.raises(ValueError, match=r"product of fsq_levels \(8, 5, 5\) = 200"):
        QuantizerConfig(kind="fsq", num_codes=1000, dim=8, fsq_levels=(8, 5, 5))
    with pytest.raises(ValueError, match="power of two"):
        QuantizerConfig(kind="fsq", num_codes=1000, dim=8)


def test_fsq_bound_gives_exactly_each_channels_levels_and_indices_round_trip():
    q = build_quantizer(QuantizerConfig(kind="fsq", num_codes=8 * 5 * 4 * 3, dim=4, fsq_levels=(8, 5, 4, 3)))
    sweep = torch.linspace(-20, 20, 4001)[:, None].repeat(1, 4)  # every channel over a wide range
    rounded = torch.round(q.prepare_rows(sweep))
    for channel, level in enumerate((8, 5, 4, 3)):
        values = rounded[:, channel].unique()
        assert values.numel() == level
        assert values.min() == -(level // 2)  # the grid: -L//2 .. L//2 - (1 if L even)
    ids = torch.arange(q.config.num_codes)
    codes = q.codes_for(ids)  # (K, 4)
    assert codes.unique(dim=0).shape[0] == q.config.num_codes  # K distinct grid points
    assert torch.equal(q.search(codes * q.half_width), ids)  # code -> index -> code
    # index = mixed-radix number of the digits, first channel lowest
    digits = torch.tensor(list(itertools.product(range(3), range(4), range(5), range(8))))[:, [3, 2, 1, 0]]
    brute = digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 160 * digits[:, 3]
    assert torch.equal(q.search((digits - torch.tensor([4, 2, 2, 1])).float()), brute)


@pytest.mark.parametrize("group_bits", [9, 3])
def test_fsq_entropy_terms_equal_a_brute_force_over_the_whole_grid(group_bits):
    levels = (4, 3, 2, 5)
    q = build_quantizer(QuantizerConfig(kind="fsq", num_codes=120, dim=4, fsq_levels=levels, entropy_weight=0.1,
                                        entropy_temperature=0.7, entropy_group_bits=group_bits))
    torch.manual_seed(0)
    bounded = q.prepare_rows(torch.randn(30, 4))  # (N, 4) in level units
    entropy = q._entropy(bounded)
    grids = [[float(d - level // 2) for d in range(level)] for level in levels]
    groups = [range(0, 4)] if group_bits == 9 else [range(0, 1), range(1, 3), range(3, 4)]  # 4 | 3 x 2 | 5 codes
    per_sample, batch = brute_force_entropies(bounded, 0.7, groups, grids)
    assert entropy.item() == pytest.approx(per_sample - batch, rel=1e-5)


def test_fsq_entropy_penalty_spreads_the_batch_and_reaches_the_input():
    q = build_quantizer(QuantizerConfig(kind="fsq", num_codes=64, dim=3, fsq_levels=(4, 4, 4), entropy_weight=1.0,
                                        entropy_temperature=0.5))
    z = (torch.randn(256, 3) * 0.05).requires_grad_(True)  # every row near the grid's centre: low batch entropy
    out = q(z)
    out.loss.backward()
    assert out.entropy_loss.item() > -math.log(64) + 1.0 and torch.isfinite(z.grad).all()
    with torch.no_grad():
        spread = q(z - 0.5 * z.grad / z.grad.norm(dim=1, keepdim=True).clamp_min(1e-12))
    assert spread.entropy_loss.item() < out.entropy_loss.item()


def test_fsq_output_is_the_nearest_grid_point_with_an_identity_gradient():
    q = build_quantizer(QuantizerConfig(kind="fsq", num_codes=64, dim=3, fsq_levels=(4, 4, 4)))
    z = torch.randn(50, 3, requires_grad=True)
    out = q(z)
    bounded = q.prepare_rows(z.detach()) / q.half_width  # the bounded point, in code units
    grid = q.codebook  # (64, 3)
    brute = (bounded[:, None] - grid[None]).square().sum(-1).argmin(1)
    assert torch.equal(out.indices, brute)
    weight = torch.randn(50, 3)
    (out.quantized * weight).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (q.prepare_rows(z2) / q.half_width * weight).sum().backward()
    assert torch.allclose(z.grad, z2.grad)
    assert out.loss == 0


# -- lfq ---------------------------------------------------------------------------------------------


def test_lfq_bits_and_index_round_trip_first_channel_least_significant():
    q = build_quantizer(QuantizerConfig(kind="lfq", num_codes=2**5, dim=5))
    assert q.config.lookup_dim == 5 and q.project_in is None
    z = torch.tensor([[0.3, 1.0, -2.0, -0.1, 0.5]])  # signs + + - - +
    assert q.lookup(z).item() == 0b10011  # Open-MAGVIT2's order: channel i is bit i
    ids = torch.arange(32)
    assert torch.equal(q.search(q.codes_for(ids)), ids)
    assert set(q.codes_for(ids).unique().tolist()) == {-1.0, 1.0}


def brute_force_entropies(h: torch.Tensor, temperature: float, groups: list[range],
                          grids: list[list[float]] | None = None) -> tuple[float, float]:
    """Over every code of the grid (default: +-1 per channel) and of each group: softmax(-||h - c||^2 / T),
    per-sample and batch entropies."""
    grids = grids or [[1.0, -1.0]] * h.shape[1]
    full = torch.tensor(list(itertools.product(*grids)), dtype=torch.float64)  # (K, c)
    p = torch.softmax(-(h.double()[:, None] - full[None]).square().sum(-1) / temperature, dim=1)  # (N, K)
    per_sample = -(p * p.log()).sum(1).mean().item()
    batch = 0.0
    for group in groups:
        codes = torch.tensor(list(itertools.product(*[grids[i] for i in group])), dtype=torch.float64)
        pg = torch.softmax(-(h.double()[:, None, group] - codes[None]).square().sum(-1) / temperature, dim=1)
        avg = pg.mean(0)
        batch += -(avg * avg.log()).sum().item()
    return per_sample, batch


@pytest.mark.parametrize("group_bits", [9, 3])
def test_lfq_entropy_terms_equal_a_brute_force_over_all_codes(group_bits):
    torch.manual_seed(0)
    h = torch.randn(40, 6) * 0.7
    per_sample, batch = lfq_entropy_terms(h, 0.8, group_bits, chunk_size=7)
    groups = [range(s, min(6, s + group_bits)) for s in range(0, 6, group_bits)]
    ref_sample, ref_batch = brute_force_entropies(h, 0.8, groups)
    assert per_sample.item() == pytest.approx(ref_sample, rel=1e-5)
    assert batch.item() == pytest.approx(ref_batch, rel=1e-5)  # exact at one group; the sum of groups at 3


def test_lfq_at_2_to_18_codes_trains_without_a_codebook_table():
    q = build_quantizer(QuantizerConfig(kind="lfq", num_codes=2**18, dim=18, entropy_weight=0.1,
                                        entropy_temperature=0.01))
    assert sum(t.numel() for t in q.state_dict().values()) < 4 * 2**18  # usage counters only: no (K, 18) table
    z = torch.randn(256, 18, requires_grad=True)
    out = q(z)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert int(out.indices.max()) < 2**18


def test_entropy_weight_is_annealed_linearly_from_factor_times_weight():
    q = build_quantizer(QuantizerConfig(kind="lfq", num_codes=16, dim=4, entropy_weight=0.1,
                                        entropy_anneal_steps=10, entropy_anneal_factor=3.0))
    assert q._entropy_weight().item() == pytest.approx(0.3)
    q.step.fill_(5)
    assert q._entropy_weight().item() == pytest.approx(0.2)
    q.step.fill_(50)
    assert q._entropy_weight().item() == pytest.approx(0.1)


# -- ibq ---------------------------------------------------------------------------------------------


def test_ibq_picks_the_largest_inner_product_and_its_gradient_reaches_unselected_codes():
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="ibq", num_codes=64, dim=8, chunk_size=5))
    with torch.no_grad():
        q.weight.normal_()
    z = torch.randn(20, 8, requires_grad=True)
    out = q(z)
    assert torch.equal(out.indices, (z.detach() @ q.weight.detach().t()).argmax(1))
    assert torch.equal(out.quantized, q.weight.detach()[out.indices])  # value: the selected code, exactly
    (out.quantized.square().sum() + out.loss).backward()
    unselected = torch.ones(64, dtype=torch.bool)
    unselected[out.indices] = False
    assert unselected.sum() > 30 and (q.weight.grad[unselected].abs().sum(1) > 0).all()
    assert z.grad.abs().sum() > 0


def test_ibq_restarts_take_a_rows_direction_at_the_live_codes_mean_norm():
    q = build_quantizer(QuantizerConfig(kind="ibq", num_codes=4, dim=2, dead_code_threshold=1))
    with torch.no_grad():  # codes 0, 1 live (norms 2 and 4); codes 2, 3 lose every argmax
        q.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0], [-0.01, -0.01], [-0.02, -0.01]]))
    fitted = torch.tensor([[2.0, 0.0], [0.0, 4.0]]).repeat(30, 1)  # zero error rows
    long_row = torch.tensor([[30.0, 40.0]])  # the only error: the first restart's candidate
    q(torch.cat([fitted, long_row]))
    q(torch.cat([fitted, long_row]))  # restarted before this lookup
    restarted = q.weight.detach()[2]
    assert torch.allclose(restarted, torch.tensor([0.6, 0.8]) * 3.0)  # the row's direction, norm (2 + 4) / 2
    # a copy of the row itself (norm 50) would also take code 1's rows (50 * 0.8 > 4); at norm 3 it does not
    assert q.search(torch.tensor([[4.0, 3.0], [0.0, 4.0]])).tolist() == [2, 1]


def test_ibq_entropy_penalty_stays_finite_when_the_softmax_leaves_codes_exactly_empty():
    """N(0, 1) codes at T = 0.01 give logits of thousands: most codes get probability exactly 0, where
    xlogy's gradient would be NaN."""
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="ibq", num_codes=256, dim=32, entropy_weight=0.05,
                                        entropy_temperature=0.01, dead_code_threshold=0))
    z = (torch.randn(64, 32) * 3).requires_grad_(True)
    q(z).loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(q.weight.grad).all()


def test_ibq_chunked_softmax_gradient_is_zero_valued_and_equals_the_unchunked_one():
    h = torch.randn(23, 6, requires_grad=True)
    codes = torch.randn(40, 6, requires_grad=True)
    chunked = softmax_logits_gradient(h, codes, chunk_size=4)
    assert torch.equal(chunked, torch.zeros(23, 6))
    g = torch.randn(23, 6)
    grads = torch.autograd.grad((chunked * g).sum(), (h, codes))
    p = torch.softmax(h @ codes.t(), dim=1)
    ref = torch.autograd.grad((((p - p.detach()) @ codes) * g).sum(), (h, codes))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_ibq_gradients_are_the_same_under_torch_compile():
    torch.manual_seed(0)
    eager = build_quantizer(QuantizerConfig(kind="ibq", num_codes=40, dim=6, chunk_size=7, dead_code_threshold=0))
    compiled = build_quantizer(eager.config)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="aot_eager")
    z = torch.randn(25, 6)
    grads = []
    for q in (eager, compiled):
        zr = z.clone().requires_grad_(True)
        out = q(zr)
        grads.append(torch.autograd.grad(out.quantized.square().sum() + out.loss, (zr, q.weight)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_ibq_loss_and_gradients_equal_seed_vokens_dense_one_hot_formulation():
    """SEED-Voken's IndexPropagationQuantize, written densely: our chunked layer gives the same values
    and the same gradients to z and to every code, for a task loss on the output plus the quantizer loss."""
    torch.manual_seed(0)
    beta = 0.25
    q = build_quantizer(QuantizerConfig(kind="ibq", num_codes=50, dim=6, beta=beta, chunk_size=7,
                                        dead_code_threshold=0))
    z = torch.randn(30, 6, requires_grad=True)
    target = torch.randn(30, 6)
    out = q(z)
    ours = torch.autograd.grad(F.mse_loss(out.quantized, target) + out.loss, (z, q.weight))

    embedding = q.weight.detach().clone().requires_grad_(True)
    zr = z.detach().clone().requires_grad_(True)
    soft = torch.softmax(zr @ embedding.t(), dim=1)
    hard = F.one_hot(soft.argmax(dim=1), 50).float()
    z_q = (hard - soft.detach() + soft) @ embedding
    z_q2 = hard @ embedding
    quant_loss = F.mse_loss(z_q, zr) + F.mse_loss(z_q2.detach(), zr) + beta * F.mse_loss(z_q2, zr.detach())
    ref = torch.autograd.grad(F.mse_loss(z_q, target) + quant_loss, (zr, embedding))
    assert torch.equal(out.indices, hard.argmax(dim=1))
    assert torch.allclose(out.quantized, z_q, atol=1e-6)
    assert out.loss.item() == pytest.approx(quant_loss.item(), rel=1e-5)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


# -- simvq -------------------------------------------------------------------------------------------


def test_simvq_codebook_is_frozen_and_only_its_linear_map_learns():
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="simvq", num_codes=32, dim=8))
    names = {name for name, _ in q.named_parameters()}
    assert names == {"code_map.weight", "code_map.bias"}  # the random codes are a buffer
    frozen, map_before = q.weight.clone(), q.code_map.weight.detach().clone()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(3):
        out = q(torch.randn(64, 8))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert torch.equal(q.weight, frozen)
    assert not torch.equal(q.code_map.weight, map_before)
    expected = frozen @ q.code_map.weight.t() + q.code_map.bias
    assert torch.allclose(q.codebook, expected)


# -- configs -----------------------------------------------------------------------------------------


def test_unknown_kind_and_options_a_kind_does_not_read_are_refused_with_the_valid_values():
    with pytest.raises(ValueError, match=r"kind must be one of \['vq', 'fsq', 'lfq', 'ibq', 'simvq', 'msvq'\]"):
        QuantizerConfig(kind="rvq")
    with pytest.raises(ConfigError, match=r"'rvq' is not one of \['vq', 'fsq', 'lfq', 'ibq', 'simvq', 'msvq'\]"):
        from_dict(QuantizerConfig, {"kind": "rvq"})
    with pytest.raises(ValueError, match=r"kind='lfq' needs num_codes = 2\^bits"):
        QuantizerConfig(kind="lfq", num_codes=1000)
    with pytest.raises(ValueError, match=r"kind='fsq' does not read \['use_ema'\]"):
        QuantizerConfig(kind="fsq", num_codes=256, use_ema=True)
    with pytest.raises(ValueError, match=r"kind='simvq' does not read \['affine_reparam'\]"):
        QuantizerConfig(kind="simvq", affine_reparam=True)
    with pytest.raises(ValueError, match=r"kind='lfq' does not read \['code_dim'\]"):
        QuantizerConfig(kind="lfq", num_codes=256, code_dim=8)
    for case in CASES:  # and each case's config survives the to_dict / from_dict round trip
        config = small_config(case)
        assert from_dict(QuantizerConfig, to_dict(config)) == config


@pytest.mark.parametrize("kind", KINDS)
def test_configs_written_before_the_entropy_group_default_changed_still_load(kind):
    """Every config.json of the previous version holds entropy_group_bits = 9 (then the default), for
    every kind; vq, simvq and ibq do not read it, and 9 must not be refused there."""
    old = {**to_dict(QuantizerConfig(kind=kind, num_codes=256)), "entropy_group_bits": 9}
    assert from_dict(QuantizerConfig, old).entropy_group_bits == 9
    if kind in ("vq", "simvq", "ibq"):
        with pytest.raises(ValueError, match=rf"kind='{kind}' does not read \['entropy_group_bits'\]"):
            QuantizerConfig(kind=kind, entropy_group_bits=12)


def quickstart_kind_overrides() -> dict[str, list[str]]:
    """kind -> the overrides the quickstart recipe's comment documents for it (vq: the recipe as it is)."""
    out = {"vq": []}
    for line in open("recipes/quickstart.yaml").read().splitlines():
        words = line.lstrip("# ").split()
        if words and words[0].startswith("model.quantizer.kind="):
            out[words[0].split("=", 1)[1]] = [word for word in words[1:] if "=" in word]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_quickstart_recipe_takes_every_kind_on_the_command_line(kind):
    from vqgan.train import load_train_config

    overrides = quickstart_kind_overrides()
    assert set(overrides) == set(KINDS)  # the comment documents every kind
    config = load_train_config("recipes/quickstart.yaml", [f"model.quantizer.kind={kind}", *overrides[kind]])
    assert config.model.quantizer.kind == kind and config.model.quantizer.num_codes == 256


def test_lfq_and_ibq_recipes_follow_their_sources():
    from vqgan.train import load_train_config

    lfq = load_train_config("recipes/imagenet256_f16_lfq.yaml", [])
    q = lfq.model.quantizer
    assert (q.kind, q.num_codes, q.bits, q.lookup_dim, q.entropy_weight) == ("lfq", 2**18, 18, 18, 0.1)
    assert q.entropy_temperature == 0.01 and q.entropy_anneal_factor == 4.0 and lfq.loss.lecam_weight == 0.05
    assert lfq.model.autoencoder.z_channels == 18  # Open-MAGVIT2: no projection around the quantizer
    ibq = load_train_config("recipes/imagenet256_f16_ibq.yaml", [])
    q = ibq.model.quantizer
    assert (q.kind, q.num_codes, q.lookup_dim, q.entropy_weight) == ("ibq", 16384, 256, 0.05)
    assert q.dead_code_threshold == 10  # SEED-Voken has no restarts; ours keep the codes' norm and measure better


# -- ranks -------------------------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case in CASES:
            torch.manual_seed(100 + rank)  # different initial codebooks and data on each rank
            q = build_quantizer(small_config(case, chunk_size=16))
            for _ in range(4):
                out = q(torch.randn(2 + rank, 8, 3, 3) * (1 + rank) + rank)
            results[case] = {"state": q.state_dict(), "usage": out.usage}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_kind_keeps_identical_state_on_two_processes(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for case in CASES:
        a, b = rank0[case], rank1[case]
        for key in a["state"]:
            if key.startswith("project_"):
                continue  # projections are ordinary parameters: DDP's job, not the quantizer's
            assert torch.equal(a["state"][key], b["state"][key]), (case, key)
        assert torch.equal(a["usage"], b["usage"])
        assert int(a["state"]["seen"]) == 4 * (2 + 3) * 9, case  # indices of both ranks counted


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "documented"),
                         [(kind, False) for kind in KINDS if kind != "msvq"]
                         + [(kind, True) for kind in ("ibq", "fsq", "lfq", "msvq")])
def test_every_kind_trains_resumes_exactly_exports_and_runs_in_onnx(kind, documented, tmp_path):
    """The quickstart's tiny model with `model.quantizer.kind=<kind>` on the command line, with the kind's
    defaults and (documented) with the settings the quickstart's comment gives for it: 4 steps straight
    == 2 steps, a lost checkpoint, a resume; the exported tokenizer loads and its ONNX graphs give the
    same ids and images."""
    import shutil

    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    import yaml

    from vqgan.tokenizer import VQTokenizer
    from vqgan.train import main

    def run(path, *overrides):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        documented_overrides = quickstart_kind_overrides()[kind] if documented else []
        return main([str(path), f"model.quantizer.kind={kind}", *documented_overrides, *overrides])

    def recipe(name: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / name),
            "model": {"preset": "tiny", "quantizer": {"num_codes": 64}},
            "discriminator": {"base_channels": 16, "num_layers": 2, "norm": "group"},
            "loss": {"perceptual_weight": 0.0, "disc_start": 1},
            "data": {"image_size": 32, "resize": 64, "embedded_repeats": 2, "num_eval_images": 1},
            "optim": {"schedule": "cosine", "warmup_steps": 1},
            "train": {"steps": 4, "batch_size": 4, "log_every": 1, "image_every": 2, "eval_every": 2,
                      "checkpoint_every": 2, "keep_checkpoints": 5, "tracker": "none", "progress_bar": False,
                      "mixed_precision": "no", "export_with_checkpoint": False},
        }))
        return path

    straight, resumed = recipe("straight"), recipe("resumed")
    try:
        summary = run(straight)
        assert summary["step"] == 4 and summary["nonfinite_steps"] == 0
        run(resumed)
        final = tmp_path / "resumed" / "checkpoints" / "checkpoint-0000004"
        shutil.rmtree(final)
        run(resumed)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    a = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-0000004" / "generator.safetensors")
    b = load_file(final / "generator.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"

    tokenizer = VQTokenizer.from_pretrained(tmp_path / "straight" / "tokenizer")
    assert tokenizer.config.quantizer.kind == kind
    images = torch.rand(3, 3, 32, 32)
    ids = tokenizer.encode(images)
    # msvq (its default scales end at 16, the quickstart's latent is 8: only with the documented scales)
    expected = (3, 1 + 4 + 9 + 16 + 36 + 64) if kind == "msvq" else (3, 8, 8)
    assert ids.shape == expected and int(ids.max()) < tokenizer.num_codes
    decoded = tokenizer.decode(ids)
    assert decoded.shape == (3, 3, 32, 32)
    ort = pytest.importorskip("onnxruntime")
    from vqgan.onnx_export import export_onnx

    (tmp_path / "onnx").mkdir()
    encoder_path, decoder_path = export_onnx(tokenizer, tmp_path / "onnx", (32, 32))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    encoder = ort.InferenceSession(str(encoder_path), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
    assert (encoder.run(None, {"images": images.numpy()})[0] == ids.numpy()).all()
    assert abs(decoder.run(None, {"ids": ids.numpy()})[0] - decoded.numpy()).max() <= 1e-4
