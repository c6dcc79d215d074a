"""Properties of the vector quantizer: exact search, gradients, losses, codebook maintenance, stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vqgan.config import from_dict
from vqgan.quantizers import QuantizerConfig, QuantizerOutput, VectorQuantizer
from vqgan.quantizers.entropy import perplexity
from vqgan.quantizers.kmeans import kmeans
from vqgan.quantizers.search import chunk_rows, nearest_code


def brute_force_indices(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N, d), (K, d) -> (N,) nearest code by a float64 broadcast search, no tricks."""
    return (z.double()[:, None, :] - codes.double()[None, :, :]).square().sum(-1).argmin(1)


def hand_config(**options) -> QuantizerConfig:
    """A config without the default k-means init and restarts, for tests that set the codes by hand."""
    return QuantizerConfig(**{"kmeans_init": False, "dead_code_threshold": 0, **options})


def set_codes(q: VectorQuantizer, codes: torch.Tensor) -> None:
    """Overwrite the raw codebook (and the EMA state that must agree with it)."""
    with torch.no_grad():
        q.weight.copy_(codes)
        if q.config.use_ema:
            q.embed_avg.copy_(codes)
            q.cluster_size.fill_(1.0)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_codes", 0),
        ("dim", 0),
        ("code_dim", 0),
        ("code_dim", 300),
        ("beta", -0.1),
        ("ema_decay", 1.0),
        ("ema_decay", 0.0),
        ("ema_epsilon", 0.0),
        ("kmeans_iters", -1),
        ("dead_code_threshold", -1),
        ("entropy_weight", -1.0),
        ("entropy_temperature", 0.0),
        ("sync_nu", -0.5),
        ("usage_window", 0),
        ("chunk_size", 0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        QuantizerConfig(**{field: value})


def test_config_rejects_options_that_would_do_nothing_and_loads_from_dict():
    with pytest.raises(ValueError, match="affine_reparam"):
        QuantizerConfig(use_ema=True, affine_reparam=True)
    with pytest.raises(ValueError, match="sync_nu"):
        QuantizerConfig(use_ema=True, sync_nu=0.1)
    cfg = from_dict(QuantizerConfig, {"num_codes": 16, "code_dim": 8, "l2_normalize": True})
    assert cfg.lookup_dim == 8 and QuantizerConfig(dim=32).lookup_dim == 32


# -- nearest code ----------------------------------------------------------------------------------


def test_nearest_code_equals_brute_force_chunked_or_not():
    z, codes = torch.randn(300, 16), torch.randn(50, 16)
    expected = brute_force_indices(z, codes)
    for chunk in (1, 7, 64, 10_000):
        assert torch.equal(nearest_code(z, codes, chunk), expected)
    q = VectorQuantizer(hand_config(num_codes=50, dim=16, chunk_size=7)).eval()
    set_codes(q, codes)
    z4 = z.reshape(3, 10, 10, 16).permute(0, 3, 1, 2)  # (B, D, H, W)
    out = q(z4)
    assert out.indices.shape == (3, 10, 10)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.equal(q(z).indices, expected)


def test_cpu_chunk_stays_cache_sized_and_bounded_by_config():
    cpu = torch.device("cpu")
    assert chunk_rows(8192, 16384, 8, 4096, cpu) * 16384 <= 2**20 * torch.get_num_threads()
    assert chunk_rows(8192, 1024, 256, 4096, cpu) == 4096  # large d: the configured chunk
    assert chunk_rows(100, 1024, 256, 4096, cpu) == 100
    assert chunk_rows(8192, 16384, 8, 4096, torch.device("meta")) == 4096  # accelerators: as configured


def test_search_is_fp32_under_bf16_autocast():
    # Random codes in 64-d are near-equidistant from random z: bf16 distances get many of them wrong.
    z, codes = torch.randn(512, 64), torch.randn(1024, 64)
    expected = brute_force_indices(z, codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = torch.addmm(codes.square().sum(1), z, codes.t(), alpha=-2.0)  # what autocast would do
    assert naive.dtype == torch.bfloat16 and not torch.equal(naive.argmin(1), expected)  # the test has teeth
    q = VectorQuantizer(hand_config(num_codes=1024, dim=64)).eval()
    set_codes(q, codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        out_bf16 = q(z.bfloat16())
    assert torch.equal(out.indices, expected)
    assert torch.equal(out_bf16.indices, brute_force_indices(z.bfloat16().float(), codes))
    assert out.quantized.dtype == torch.float32 and out_bf16.quantized.dtype == torch.bfloat16


# -- gradients and losses -----------------------------------------------------------------------


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(hand_config(num_codes=32, dim=8))
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    grad = torch.randn_like(z)
    out.quantized.backward(grad)
    assert torch.equal(z.grad, grad)
    assert q.weight.grad is None  # the task gradient never reaches the codes through the STE
    assert torch.equal(out.quantized, q.indices_to_codes(out.indices))  # value is z_q exactly


def test_codebook_and_commitment_losses_values_gradients_and_beta():
    beta = 0.3
    q = VectorQuantizer(hand_config(num_codes=16, dim=4, beta=beta))
    z = torch.randn(40, 4, requires_grad=True)
    out = q(z)
    e = q.weight.detach()[out.indices]  # (N, d)
    mse = (z.detach() - e).square().mean()
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.commitment_loss, mse)
    torch.testing.assert_close(out.loss, mse * (1 + beta))
    assert out.entropy_loss == 0

    # Codebook term moves only the codes, toward sg[z]; commitment term moves only z.
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None
    expected = torch.zeros(16, 4).index_add_(0, out.indices, 2 * (e - z.detach()) / z.numel())
    torch.testing.assert_close(q.weight.grad, expected)
    q.weight.grad = None
    out.commitment_loss.backward(retain_graph=True)
    assert q.weight.grad is None
    torch.testing.assert_close(z.grad, 2 * (z.detach() - e) / z.numel())
    z.grad = None
    out.loss.backward()  # beta multiplies the COMMITMENT term: d loss / dz = beta * d commit / dz
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - e) / z.numel())
    torch.testing.assert_close(q.weight.grad, expected)


def test_entropy_penalty_matches_reference_on_a_bounded_subsample():
    cfg = hand_config(num_codes=12, dim=3, entropy_weight=0.2, entropy_temperature=0.5, chunk_size=10)
    q = VectorQuantizer(cfg)
    set_codes(q, torch.randn(12, 3))
    z = torch.randn(25, 3, requires_grad=True)
    out = q(z)
    rows = z.detach().double()[torch.arange(10) * 25 // 10]  # 10 evenly spaced rows: never > chunk x K
    p = F.softmax(-torch.cdist(rows, q.weight.detach().double()).square() / 0.5, dim=1)
    avg = p.mean(0)
    reference = -(p * p.log()).sum(1).mean() + (avg * avg.log()).sum()
    torch.testing.assert_close(out.entropy_loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.codebook_loss + 0.25 * out.commitment_loss + 0.2 * out.entropy_loss)
    out.entropy_loss.backward()
    assert z.grad.abs().sum() > 0 and (q.weight.grad.abs().sum(1) > 0).all()  # reaches every code


def test_rotation_trick_value_and_gradient():
    q = VectorQuantizer(hand_config(num_codes=16, dim=6, rotation_trick=True))
    ste = VectorQuantizer(hand_config(num_codes=16, dim=6))
    ste.load_state_dict(q.state_dict())
    set_codes(q, torch.randn(16, 6))
    set_codes(ste, q.weight.detach())
    z = torch.randn(20, 6, requires_grad=True)
    z_ste = z.detach().clone().requires_grad_()
    out, out_ste = q(z), ste(z_ste)
    assert torch.equal(out.quantized, out_ste.quantized)  # forward value is z_q, exactly
    grad = torch.randn(20, 6)
    out.quantized.backward(grad)
    out_ste.quantized.backward(grad)
    assert not torch.allclose(z.grad, z_ste.grad)

    e = q.weight.detach()[out.indices].double()  # (N, d)
    zd, g = z.detach().double(), grad.double()
    # R is orthogonal, so |grad_z| = (|e| / |z|) |g| row by row.
    ratio = e.norm(dim=1) / zd.norm(dim=1)
    torch.testing.assert_close(z.grad.double().norm(dim=1), ratio * g.norm(dim=1), rtol=1e-5, atol=1e-6)
    # Reference with explicit (d, d) matrices: grad = lambda R^T g, and lambda R z = e.
    z_hat, e_hat = F.normalize(zd, dim=1), F.normalize(e, dim=1)
    r = F.normalize(z_hat + e_hat, dim=1)
    eye = torch.eye(6, dtype=torch.float64)
    rot = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * e_hat[:, :, None] * z_hat[:, None, :]  # (N, d, d)
    torch.testing.assert_close(ratio[:, None] * torch.einsum("nij,nj->ni", rot, zd), e)
    expected = ratio[:, None] * torch.einsum("nji,nj->ni", rot, g)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_affine_reparam_moves_codebook_through_scale_and_shift():
    q = VectorQuantizer(hand_config(num_codes=8, dim=4, affine_reparam=True))
    with torch.no_grad():
        q.affine_scale.copy_(torch.randn(4))
        q.affine_shift.copy_(torch.randn(4))
    torch.testing.assert_close(q.codebook, (1 + q.affine_scale) * q.weight + q.affine_shift)
    weight_before, codebook_before = q.weight.detach().clone(), q.codebook.detach().clone()
    opt = torch.optim.SGD([q.affine_scale, q.affine_shift], lr=0.1)
    out = q(torch.randn(64, 4) + 3)
    out.loss.backward()
    assert q.affine_scale.grad.abs().sum() > 0 and q.affine_shift.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(q.weight, weight_before)  # shared affine map changed every code, all at once
    assert (q.codebook - codebook_before).abs().min() > 0


def test_sync_update_sends_nu_times_task_gradient_to_the_codes():
    nu = 0.5
    q = VectorQuantizer(hand_config(num_codes=8, dim=4, sync_nu=nu))
    z = torch.randn(30, 4, requires_grad=True)
    out = q(z)
    grad = torch.randn(30, 4)
    out.quantized.backward(grad)
    assert torch.equal(z.grad, grad)
    torch.testing.assert_close(q.weight.grad, nu * torch.zeros(8, 4).index_add_(0, out.indices, grad))
    assert torch.equal(out.quantized, q.eval().indices_to_codes(out.indices))


# -- codebook maintenance -----------------------------------------------------------------------


def test_ema_codebook_converges_to_cluster_means():
    means = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])
    q = VectorQuantizer(hand_config(num_codes=4, dim=2, use_ema=True, ema_decay=0.8))
    assert "weight" in dict(q.named_buffers()) and not list(q.parameters())
    set_codes(q, means + torch.tensor([1.5, -1.0]))  # off-centre but on the right clusters
    for _ in range(60):
        z = (means[:, None, :] + 0.5 * torch.randn(4, 100, 2)).reshape(-1, 2)
        out = q(z)
    assert out.codebook_loss == 0 and out.commitment_loss > 0
    torch.testing.assert_close(q.codebook, means, atol=0.08, rtol=0)


def test_kmeans_init_places_codes_at_cluster_centres_once_and_survives_state_dict():
    centres = torch.randn(8, 4) * 5
    cfg = QuantizerConfig(num_codes=8, dim=4, kmeans_init=True, kmeans_iters=5)
    q = VectorQuantizer(cfg)
    assert not q.initialized
    z = (centres[:, None, :] + 0.01 * torch.randn(8, 50, 4)).reshape(-1, 4)
    q(z[torch.randperm(400)])
    dist = torch.cdist(q.codebook.detach(), centres)
    assert dist.min(1).values.max() < 0.01 and dist.min(0).values.max() < 0.01  # one code per centre
    assert bool(q.initialized)

    fresh = VectorQuantizer(cfg)
    fresh.load_state_dict(q.state_dict())
    fresh(torch.randn(100, 4))  # a second "first batch" must not re-run k-means
    assert torch.equal(fresh.weight, q.weight)


def test_spherical_kmeans_returns_unit_centres():
    x = F.normalize(torch.randn(200, 5), dim=1)
    assert torch.allclose(kmeans(x, 10, 3, 64, spherical=True).norm(dim=1), torch.ones(10))


def test_dead_codes_are_restarted_after_the_lookup_from_rows_they_are_not_scored_on():
    q = VectorQuantizer(hand_config(num_codes=8, dim=4, dead_code_threshold=2, restart_from="random"))
    set_codes(q, torch.cat([torch.randn(4, 4) * 0.1, torch.full((4, 4), 100.0)]))  # codes 4..7 unreachable
    batches = [torch.randn(64, 4) for _ in range(3)]
    for z in batches[:2]:
        out = q(z)
        assert (out.indices < 4).all()
    assert (q.weight.detach()[4:] == 100.0).all()  # dead for 2 steps, not yet rewritten
    out = q(batches[2])  # restarted before this lookup, from rows of the PREVIOUS batch
    revived = q.weight.detach()[4:]
    assert (revived[:, None, :] == batches[1][None, :, :]).all(-1).any(1).all()
    assert not (revived[:, None, :] == batches[2][None, :, :]).all(-1).any()
    # usage counts the codes real assignments reached, not the restart itself
    used = set(out.indices.tolist()) | set(range(4))
    assert out.usage.item() == pytest.approx(len(used) / 8)


def test_error_weighted_restarts_draw_only_rows_the_codebook_does_not_fit():
    q = VectorQuantizer(hand_config(num_codes=4, dim=2, dead_code_threshold=1))
    set_codes(q, torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0], [60.0, 60.0]]))
    fitted = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).repeat(30, 1)  # zero error rows
    outlier = torch.tensor([[-7.0, 3.0]])
    q(torch.cat([fitted, outlier]))  # codes 2, 3 unused: candidates drawn after the lookup
    q(torch.cat([fitted, outlier]))  # restarted: the first dead code from the only row with an error
    assert torch.equal(q.weight.detach()[2], outlier[0])
    assert (q.weight.detach()[3] == fitted).all(1).any()  # the next draw: any other row of the batch


def test_affine_parameters_get_their_own_learning_rate_group_and_keep_it_on_resume():
    from vqgan.optim import OptimConfig, apply_config_after_resume, build_optimizer, build_scheduler

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), VectorQuantizer(QuantizerConfig(
        num_codes=8, dim=4, affine_reparam=True, affine_lr=10.0)))
    config = OptimConfig(lr=1e-3, weight_decay=0.1)
    opt = build_optimizer(model, config)
    quantizer = model[1]
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(opt.param_groups) == 3
    for p in (quantizer.affine_scale, quantizer.affine_shift):
        assert groups[id(p)]["lr"] == pytest.approx(1e-2) and groups[id(p)]["weight_decay"] == 0.0
    assert groups[id(quantizer.weight)]["lr"] == pytest.approx(1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, warmup_steps=4), 10)
    assert groups[id(quantizer.affine_scale)]["lr"] == pytest.approx(1e-2 / 4)  # the schedule scales it too
    apply_config_after_resume(opt, sched, OptimConfig(lr=2e-3, warmup_steps=4))
    assert groups[id(quantizer.affine_scale)]["lr"] == pytest.approx(2e-2 / 4)
    assert groups[id(quantizer.weight)]["lr"] == pytest.approx(2e-3 / 4)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"l2_normalize": True},
        {"code_dim": 3},
        {"code_dim": 3, "l2_normalize": True},
        {"affine_reparam": True, "sync_nu": 0.2},
        {"rotation_trick": True},
        {"use_ema": True, "kmeans_init": True, "dead_code_threshold": 1},
    ],
)
def test_eval_round_trip_through_indices_and_no_state_updates(options):
    q = VectorQuantizer(hand_config(num_codes=16, dim=8, **options))
    opt = torch.optim.SGD(q.parameters(), lr=0.1) if list(q.parameters()) else None
    for _ in range(3):  # a few training steps so the codebook and projections are not at init
        out = q(torch.randn(2, 8, 4, 4))
        if opt:
            opt.zero_grad()
            (out.loss + out.quantized.square().mean()).backward()
            opt.step()
    q.eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    for z in (torch.randn(2, 8, 5, 3, requires_grad=True), torch.randn(7, 8)):
        out = q(z)
        assert isinstance(out, QuantizerOutput) and out.quantized.shape == z.shape
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    if options.get("l2_normalize"):
        torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(16))
    assert q.codebook.shape == (16, q.config.lookup_dim)
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key  # eval: no EMA, restart or usage updates


# -- statistics ------------------------------------------------------------------------------------


def test_perplexity_of_hand_made_histograms():
    assert perplexity(torch.ones(64)).item() == pytest.approx(64)
    assert perplexity(torch.tensor([5, 0, 0, 0])).item() == pytest.approx(1)
    assert perplexity(torch.tensor([3, 3, 0, 0])).item() == pytest.approx(2)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity(p * 4).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_usage_over_a_rolling_window_of_indices():
    codes = torch.arange(8.0)[:, None] * torch.ones(1, 3) * 10  # well separated
    q = VectorQuantizer(hand_config(num_codes=8, dim=3, usage_window=64))
    set_codes(q, codes)
    out = q(codes.repeat(4, 1))  # 32 indices, every code 4 times
    assert out.perplexity.item() == pytest.approx(8) and out.usage == 1.0
    usages = []
    for _ in range(4):  # 16 indices per batch, codes 0..3 only
        out = q(codes[:4].repeat(4, 1))
        usages.append(out.usage.item())
    assert out.perplexity.item() == pytest.approx(4)
    # Codes 4..7 were last seen at index 32; they leave the window once 64 more indices have come.
    assert usages == [1.0, 1.0, 1.0, 0.5]
    q.eval()
    assert q(codes.repeat(4, 1)).usage == 0.5  # eval forwards do not count


def test_large_codebook_reaches_high_usage_with_kmeans_and_restarts():
    # K = 16384 cosine codes in 8-d; the data fill a small cap of the sphere, where a random
    # codebook leaves almost every code unused.
    centre = F.normalize(torch.randn(8), dim=0)

    def batch(n=16384):
        return F.normalize(centre + 0.25 * torch.randn(n, 8), dim=1)

    # The window covers the last 3 batches: fresh data only, not the k-means batch.
    base = dict(num_codes=16384, dim=8, l2_normalize=True, usage_window=3 * 16384)
    plain = VectorQuantizer(hand_config(**base))
    assert plain(batch()).usage < 0.2
    q = VectorQuantizer(QuantizerConfig(**base, kmeans_iters=1))  # the defaults: k-means init, restarts
    q(batch(24576))  # k-means on the first batch
    for _ in range(3):
        out = q(batch())
    assert out.usage > 0.9, out.usage


# -- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q = VectorQuantizer(hand_config(num_codes=8, dim=4))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\) or \(N, 4\), got \(2, 4, 3\)"):
        q(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="4 channels in dim 1, got 5"):
        q(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="4 channels in dim 1, got 3"):
        q(torch.randn(10, 3))
    for bad in (float("nan"), float("inf")):
        z = torch.randn(10, 4)
        z[3, 1] = bad
        with pytest.raises(ValueError, match="finite, got 1 NaN/inf"):
            q.eval()(z)
    q.train()
    with pytest.raises(ValueError, match="floating point"):
        q(torch.ones(10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 8\), got values in \[0, 8\]"):
        q.indices_to_codes(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"\[0, 8\), got values in \[-1, 2\]"):
        q.indices_to_codes(torch.tensor([[[-1, 2]]]))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_codes(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(N,\), got \(2, 2\)"):
        q.indices_to_codes(torch.zeros(2, 2, dtype=torch.long))
    assert q.indices_to_codes(torch.zeros(2, 3, 5, dtype=torch.long)).shape == (2, 4, 3, 5)


# -- distributed ------------------------------------------------------------------------------------

DISTRIBUTED_CONFIGS = {
    "ema_kmeans_restart": QuantizerConfig(
        num_codes=32, dim=8, use_ema=True, ema_decay=0.9, kmeans_init=True, kmeans_iters=3,
        dead_code_threshold=1, chunk_size=16,
    ),
    "learned_affine_restart": QuantizerConfig(
        num_codes=32, dim=8, l2_normalize=True, affine_reparam=True, dead_code_threshold=2, code_dim=4,
    ),
}


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, cfg in DISTRIBUTED_CONFIGS.items():
            torch.manual_seed(100 + rank)  # different initial codebooks and data on each rank
            q = VectorQuantizer(cfg)
            initial = q.weight.detach().clone()
            for _ in range(4):
                out = q(torch.randn(2 + rank, 8, 3, 3) * (1 + rank) + rank)  # different sizes too
            results[name] = {"state": q.state_dict(), "initial": initial, "usage": out.usage}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_keep_bitwise_identical_codebooks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in DISTRIBUTED_CONFIGS:
        a, b = rank0[name], rank1[name]
        assert not torch.equal(a["initial"], b["initial"])  # ranks started apart
        for key in a["state"]:
            if key.startswith("project_"):
                continue  # projections are ordinary parameters: DDP's job, not the quantizer's
            assert torch.equal(a["state"][key], b["state"][key]), (name, key)
        assert torch.equal(a["usage"], b["usage"])
        assert not torch.equal(a["state"]["weight"], b["initial"])
        assert int(a["state"]["seen"]) == 4 * (2 + 3) * 9  # indices of both ranks counted


def test_nonfinite_rows_in_training_reach_the_loss_but_not_the_codebook():
    """An fp16 overflow in the encoder must make the loss non-finite (the loop skips the step on every
    process) without poisoning the EMA codebook, the usage counters or a restart."""
    q = VectorQuantizer(QuantizerConfig(num_codes=8, dim=4, use_ema=True, dead_code_threshold=1))
    q(torch.randn(64, 4))  # first call: initialise
    z = torch.randn(64, 4)
    z[5] = float("inf")
    z[9, 2] = float("nan")
    before_seen = int(q.seen)
    out = q(z)
    assert not torch.isfinite(out.loss)
    for name in ("weight", "cluster_size", "embed_avg"):
        assert torch.isfinite(getattr(q, name)).all(), name
    assert int(q.seen) - before_seen == 62  # the two bad rows are not counted
