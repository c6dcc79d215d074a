"""kind="msvq", VAR's multi-scale residual quantizer: its mathematics against a brute-force reference written
here with loops and explicit distances (area pooling, bicubic upsampling, phi, nearest codes, residuals, the
loss), the exact rebuild from ids, the next-scale prior's inputs, the codebook remedies, bad input, a
tokenizer folder round trip and two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from vqgan.autoencoder import AutoencoderConfig, VQModelConfig
from vqgan.config import ConfigError, from_dict, to_dict
from vqgan.quantizers import QuantizerConfig, build_quantizer
from vqgan.quantizers.msvq import MultiScaleResidualQuantizer, phi_assignment

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "var_tiny.safetensors"


# -- the brute-force reference -------------------------------------------------------------------------


def area_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) weights of adaptive average pooling: output i averages inputs floor(i n/m) .. ceil((i+1) n/m) - 1."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        for j in range(start, end):
            m[i, j] = 1.0 / (end - start)
    return m


def cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with a = -0.75 (PyTorch's and OpenCV's bicubic)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) weights of bicubic resampling, align_corners=False, border samples repeated."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for offset, weight in zip((-1, 0, 1, 2), (cubic(1 + t), cubic(t), cubic(1 - t), cubic(2 - t))):
            m[i, min(max(base + offset, 0), size_in - 1)] += weight
    return m


def resample(x: torch.Tensor, matrix_fn, size: int) -> torch.Tensor:
    """(B, C, n, n) -> (B, C, size, size), rows then columns (both resamplings are separable)."""
    m = matrix_fn(x.shape[-1], size)
    return torch.einsum("ij,bcjk,lk->bcil", m, x, m)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 convolution as nine shifted channel mixes."""
    b, c, h, w = x.shape
    padded = torch.zeros(b, c, h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = bias.view(1, -1, 1, 1).expand(b, -1, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            out += torch.einsum("oc,bchw->bohw", weight[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + w])
    return out


def reference(q: MultiScaleResidualQuantizer, f: torch.Tensor) -> dict:
    """VAR's VectorQuantizer2 written out: ids, residuals and f̂ after each scale, mean_vq_loss; float64."""
    cfg = q.config
    f = f.double()
    codes = q.weight.detach().double()
    side, count = f.shape[-1], len(cfg.scales)
    f_rest, f_hat = f.clone(), torch.zeros_like(f)
    ids_per_scale, residuals, f_hats = [], [], []
    for k, s in enumerate(cfg.scales):
        down = f_rest if k == count - 1 else resample(f_rest, area_matrix, s)
        ids = torch.empty(f.shape[0], s, s, dtype=torch.long)
        for b in range(f.shape[0]):
            for y in range(s):
                for x in range(s):
                    distances = [float(((down[b, :, y, x] - codes[j]) ** 2).sum()) for j in range(codes.shape[0])]
                    ids[b, y, x] = min(range(len(distances)), key=distances.__getitem__)
        h = codes[ids].permute(0, 3, 1, 2)  # (B, C, s, s)
        if k != count - 1:
            h = resample(h, bicubic_matrix, side)
        if cfg.phi_ratio > 0:
            conv = q.phi[q.phi_of_scale[k]]
            h = (1 - cfg.phi_ratio) * h + cfg.phi_ratio * conv3x3(h, conv.weight.detach().double(),
                                                                  conv.bias.detach().double())
        f_hat = f_hat + h
        f_rest = f_rest - h
        ids_per_scale.append(ids)
        residuals.append(f_rest.clone())
        f_hats.append(f_hat.clone())
    loss = sum((1 + cfg.beta) * ((f_k - f) ** 2).mean() for f_k in f_hats) / count
    return {"ids": ids_per_scale, "residuals": residuals, "f_hats": f_hats, "loss": loss}


def seeded_quantizer(dim: int = 4, num_codes: int = 24, **options) -> MultiScaleResidualQuantizer:
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="msvq", num_codes=num_codes, dim=dim, **options))
    with torch.no_grad():
        q.weight.normal_()  # codes at the data's scale: distinct nearest codes, no near ties
        for conv in q.phi:
            conv.weight.mul_(3.0)
    return q.double().eval()


# -- mathematics ----------------------------------------------------------------------------------------


def test_the_resampling_matrices_are_torchs_area_and_bicubic():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for s in (1, 2, 3, 5, 13):
        assert torch.allclose(resample(x, area_matrix, s), torch.nn.functional.interpolate(x, size=(s, s), mode="area"))
        y = x[..., :s, :s]
        assert torch.allclose(resample(y, bicubic_matrix, 16),
                              torch.nn.functional.interpolate(y, size=(16, 16), mode="bicubic"))


@pytest.mark.parametrize(("sharing", "ratio"), [("partial", 0.5), ("shared", 0.5), ("per_scale", 0.3),
                                                 ("partial", 0.0)])
def test_ids_residuals_phi_and_loss_equal_the_brute_force_reference(sharing, ratio):
    scales = (1, 2, 3, 5, 6)
    q = seeded_quantizer(scales=scales, phi_sharing=sharing, phi_ratio=ratio, phi_count=2)
    assert len(q.phi) == {"partial": 2, "shared": 1, "per_scale": 5}[sharing] * (ratio > 0)
    f = torch.randn(2, 4, 6, 6, dtype=torch.float64) * 2
    ref = reference(q, f)
    out = q(f)
    assert out.indices.shape == (2, sum(s * s for s in scales))
    for k, grid in enumerate(q.split_scales(out.indices)):
        assert torch.equal(grid, ref["ids"][k]), f"scale {k}"
    f_hats = q.partial_reconstructions(f)
    for k, f_k in enumerate(f_hats):
        assert (f - f_k - ref["residuals"][k]).abs().max() < 1e-10, f"residual after scale {k}"
    assert (out.quantized - ref["f_hats"][-1]).abs().max() < 1e-10
    assert out.loss.item() == pytest.approx(float(ref["loss"]), rel=1e-6)  # losses are reported in fp32
    # the residual shrinks: f̂ explains more of f at every scale (codes at the data's scale, phi near identity)
    if ratio == 0.0:
        norms = [float(r.square().sum()) for r in ref["residuals"]]
        assert norms[-1] < float(f.square().sum())


def test_phi_assignment_is_vars_own_for_every_sharing_mode():
    recorded = json.loads(safe_open(str(FIXTURE), "pt").metadata()["phi_of_scale"])  # VAR's modules, per scale
    assert list(phi_assignment(10, "partial", 4)) == recorded["partial4"]
    assert list(phi_assignment(10, "shared", 4)) == recorded["shared"]
    assert list(phi_assignment(10, "per_scale", 4)) == recorded["non_shared"]
    assert phi_assignment(1, "partial", 4) == (0,)


def test_indices_rebuild_the_quantized_latent_bit_for_bit_and_lookup_changes_nothing():
    for dtype in (torch.float32, torch.float64):
        q = seeded_quantizer(scales=(1, 2, 4, 7)).to(dtype)
        f = torch.randn(3, 4, 7, 7, dtype=dtype)
        state = {k: v.clone() for k, v in q.state_dict().items()}
        out = q(f)
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
        assert torch.equal(q.lookup(f), out.indices)
        q.train()
        assert torch.equal(q.lookup(f), out.indices)  # lookup in train mode: no k-means, no counters
        for key, value in q.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert torch.equal(q.join_scales(q.split_scales(out.indices)), out.indices)


def test_straight_through_gradient_and_where_each_loss_term_sends_its_gradient():
    q = seeded_quantizer(scales=(1, 2, 4)).float().train()
    q.initialized.fill_(True), q.refresh_flags()  # keep the seeded codes (no k-means)
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = q(f)
    upstream = torch.randn_like(f)
    (grad,) = torch.autograd.grad(out.quantized, f, upstream, retain_graph=True)
    assert torch.equal(grad, upstream)  # the identity
    # commitment term: beta * mean_k 2 (f - sg[f̂_k]) / n reaches f; codebook term reaches codes and phi only
    f_hats, _, _ = q._quantize(f.detach(), q.weight)
    expected = sum(2 * (f.detach() - f_k.detach()) / f.numel() for f_k in f_hats) / len(f_hats) * q.config.beta
    grads = torch.autograd.grad(out.loss, [f, q.weight, q.phi[0].weight])
    assert torch.allclose(grads[0], expected, atol=1e-7)
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert torch.allclose(out.loss, out.codebook_loss + q.config.beta * out.commitment_loss)


def test_next_scale_inputs_are_the_area_averaged_partial_sums():
    q = seeded_quantizer(scales=(1, 2, 3, 5, 6))
    f = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = q(f)
    ref = reference(q, f)
    grids = q.split_scales(out.indices)
    for k in range(1, 5):
        expected = resample(ref["f_hats"][k - 1], area_matrix, q.scales[k]).flatten(2).transpose(1, 2)
        got = q.next_scale_input(grids[:k], k)
        assert got.shape == (2, q.scales[k] ** 2, 4)
        assert (got - expected).abs().max() < 1e-10
    whole = q.teacher_forcing_input(out.indices)
    assert torch.equal(whole, torch.cat([q.next_scale_input(grids, k) for k in range(1, 5)], dim=1))
    assert torch.equal(q.next_scale_input(grids, 0), torch.zeros(2, 1, 4))


# -- training-time codebook remedies ---------------------------------------------------------------------


def test_kmeans_runs_once_on_the_ideal_residuals_and_dead_codes_restart_from_the_last_batchs_residuals():
    from vqgan.quantizers.kmeans import kmeans

    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind="msvq", num_codes=16, dim=4, scales=(1, 2, 4), kmeans_iters=5,
                                        dead_code_threshold=1, usage_window=10_000))
    f = torch.randn(8, 4, 4, 4)
    torch.manual_seed(1)
    out = q(f)
    rows = q._ideal_residual_rows(f)  # (8 * 21, 4): what each scale would quantize with exact codes
    torch.manual_seed(1)
    assert torch.equal(q.weight.detach(), kmeans(rows, 16, 5, q.config.chunk_size))
    assert bool(q.initialized) and int(q.seen) == 8 * 21
    assert out.usage.item() == pytest.approx(out.indices.unique().numel() / 16)
    q(f)  # k-means does not run again: only restarts may move codes, and they come from residual rows
    with torch.no_grad():
        q.weight[3] = 1e6  # far from everything: unused from now on
    g = torch.randn(8, 4, 4, 4)
    q(g)
    used_weights, candidates = q.weight.detach().clone(), q.restart_rows.clone()
    residual_rows = q._quantize(g, used_weights)[1]  # the rows this forward searched
    assert all(((residual_rows - row).abs().sum(1) == 0).any() for row in candidates)
    q(torch.randn(8, 4, 4, 4))  # code 3 was dead for one forward: it takes a candidate drawn from g's residuals
    assert ((candidates - q.weight[3].detach()).abs().sum(1) == 0).any()


def test_the_onnx_paths_give_lookups_ids_and_indices_to_codes_latent():
    q = seeded_quantizer().float()  # VAR's ten scales on a 16 x 16 latent: pooling to 13, 10, 6, 5, 3 does not divide
    f = torch.randn(2, 4, 16, 16)
    ids = q.lookup(f)
    assert torch.equal(q.export_lookup(f), ids)
    assert (q.export_codes(ids) - q.indices_to_codes(ids)).abs().max() < 1e-5


def test_bf16_autocast_searches_in_fp32():
    q = seeded_quantizer(scales=(1, 2, 4)).float()
    f = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(f.bfloat16())
    assert torch.equal(out.indices, q(f.bfloat16().float()).indices)
    assert out.loss.dtype == torch.float32


# -- configuration and bad input ------------------------------------------------------------------------


def test_bad_configs_and_inputs_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="scales must be strictly increasing"):
        QuantizerConfig(kind="msvq", scales=(1, 3, 2))
    with pytest.raises(ValueError, match=r"phi_ratio must be in \[0, 1\]"):
        QuantizerConfig(kind="msvq", phi_ratio=1.5)
    with pytest.raises(ValueError, match=r"kind='vq' does not read \['scales'\]"):
        QuantizerConfig(kind="vq", scales=(1, 2))
    with pytest.raises(ValueError, match=r"kind='msvq' does not read \['code_dim'\]"):
        QuantizerConfig(kind="msvq", code_dim=8)
    with pytest.raises(ConfigError, match="phi_sharing"):
        from_dict(QuantizerConfig, {"kind": "msvq", "phi_sharing": "some"})
    config = QuantizerConfig(kind="msvq", scales=(1, 2, 4), phi_sharing="shared")
    assert from_dict(QuantizerConfig, to_dict(config)) == config
    q = build_quantizer(QuantizerConfig(kind="msvq", num_codes=8, dim=4, scales=(1, 2, 4))).eval()
    with pytest.raises(ValueError, match=r"latent is 8x8, but the last scale is 4x4"):
        q(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 4\)"):
        q(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"shape \(B, 21\)"):
        q.indices_to_codes(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
        q.indices_to_codes(torch.full((1, 21), 8))


# -- the tokenizer ----------------------------------------------------------------------------------------


def tiny_msvq_config() -> VQModelConfig:
    return VQModelConfig(
        AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
                          num_groups=8, resolution=16, quant_conv_kernel=3),
        QuantizerConfig(kind="msvq", num_codes=32, dim=8, scales=(1, 2, 3, 5, 8)),
    )


def test_tokenizer_folder_round_trip_encodes_sequences_and_decodes_them(tmp_path):
    from vqgan.tokenizer import VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(tiny_msvq_config())
    assert tok.model.quant_conv.weight.shape == (8, 8, 3, 3)
    images = torch.rand(2, 3, 16, 16)
    ids = tok.encode(images)
    assert ids.shape == (2, 1 + 4 + 9 + 25 + 64)
    decoded = tok.decode(ids)
    assert decoded.shape == (2, 3, 16, 16)
    with torch.no_grad():  # decode(encode(x)) is the eval forward's reconstruction
        forward, quant = tok.model(images * 2 - 1)
        assert torch.equal(quant.indices, ids)
        assert torch.allclose(decoded, (tok.model.to_images(forward) + 1) / 2, atol=1e-6)
    tok.save_pretrained(tmp_path / "tok")
    from vqgan.folder_format import CARD_NAME

    assert "one sequence of 103 ids an image over scales [1, 2, 3, 5, 8]" in (tmp_path / "tok" / CARD_NAME).read_text()
    assert "103 ids over scales" in tok.model.summary()
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode(images), ids) and torch.equal(loaded.decode(ids), decoded)


# -- ranks --------------------------------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different initial codebooks and data on each rank
        q = build_quantizer(QuantizerConfig(kind="msvq", num_codes=16, dim=8, scales=(1, 2, 3), chunk_size=16,
                                            dead_code_threshold=1))
        for _ in range(4):
            out = q(torch.randn(2 + rank, 8, 3, 3) * (1 + rank) + rank)
        torch.save({"state": q.state_dict(), "usage": out.usage}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_codebook_state_is_identical_on_two_processes(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a["state"]:
        if key.startswith("phi."):
            continue  # ordinary parameters: DDP broadcasts them, not the quantizer
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert torch.equal(a["usage"], b["usage"])
    assert int(a["state"]["seen"]) == 4 * (2 + 3) * (1 + 4 + 9)  # ids of both ranks counted


@pytest.mark.slow
def test_two_process_accelerate_training_keeps_every_weight_identical(tmp_path):
    """The user's path: `accelerate launch --multi_gpu --num_processes 2` on the quickstart's tiny model with
    the documented msvq scales; k-means on gathered residuals, restarts, DDP: both ranks end bit-identical."""
    from safetensors.torch import load_file

    from test_train import assert_ranks_identical, tiny_recipe, train_on_two_ranks

    recipe = tiny_recipe(tmp_path / "run", train={"steps": 3, "checkpoint_every": 3},
                         model={"preset": "tiny", "quantizer": {"kind": "msvq", "num_codes": 64,
                                                                "scales": [1, 2, 3, 4, 6, 8], "dead_code_threshold": 1}})
    train_on_two_ranks(tmp_path, recipe)
    root = tmp_path / "run" / "checkpoints"
    assert_ranks_identical(root, step=3)  # generator (codebook, phi convs), discriminator
    generator = load_file(root / "rank0_model0_step3.safetensors")
    assert bool(generator["quantizer.initialized"]) and int(generator["quantizer.step"]) == 3
    assert int(generator["quantizer.seen"]) == 3 * 2 * 4 * (1 + 4 + 9 + 16 + 36 + 64)  # both ranks' ids counted


def test_training_forward_has_no_host_sync_after_init():
    from test_engine import HostSyncCounter

    q = build_quantizer(QuantizerConfig(kind="msvq", num_codes=32, dim=8, scales=(1, 2, 3, 5), dead_code_threshold=1))
    z = torch.randn(4, 8, 5, 5)
    q(z)  # the first call initialises (k-means may read back; once per run)
    z = z.clone().requires_grad_(True)
    z.data[1, 0, 2, 2] = float("nan")  # a non-finite latent too: handled with masks, not branches
    with HostSyncCounter() as counter:
        out = q(z)
        out.loss.backward()
    assert counter.seen == [], f"host syncs in msvq's training step: {counter.seen}"


def test_training_start_and_end_lines_give_the_sum_of_squared_scales_not_the_latent_grid(tmp_path, capsys):
    """vqgan-train's start-up line and its held-out usage line count msvq's ids (Σ s² = 103 for scales 1, 2, 3,
    5, 8), not the 8x8 latent's 64."""
    from accelerate.state import AcceleratorState, GradientState

    from test_train import tiny_recipe, write_recipe
    from vqgan.train import main

    recipe = tiny_recipe(tmp_path / "run", train={"steps": 1, "eval_every": 1, "checkpoint_every": 1},
                         model={"preset": "tiny", "quantizer": {"kind": "msvq", "num_codes": 64,
                                                                "scales": [1, 2, 3, 5, 8]}})
    try:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        main([str(write_recipe(tmp_path, recipe))])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    printed = capsys.readouterr().out
    assert "32px images -> 8x8 latent -> 103 tokens (Σ s² over scales [1, 2, 3, 5, 8]) of K=64" in printed
    assert "by the 103 held-out tokens" in printed
    assert "64 tokens" not in printed


def test_a_trained_msvq_folder_holds_the_codebook_and_phi_convs_and_no_training_state(tmp_path):
    """msvq declares the lookup kinds' training state (usage counters, restart candidates, the k-means flag):
    a tokenizer folder leaves it out, keeps the codebook and every phi conv, and encodes / decodes the same."""
    from safetensors.torch import load_file

    from vqgan.folder_format import WEIGHTS_NAME
    from vqgan.tokenizer import VQTokenizer
    from vqgan.training_state import training_state_keys

    torch.manual_seed(0)
    tok = VQTokenizer(tiny_msvq_config())
    quantizer = tok.model.quantizer
    quantizer.train()
    for _ in range(3):  # k-means, counters and restart candidates: state a run holds
        quantizer(torch.randn(4, 8, 8, 8))
    quantizer.eval()
    assert int(quantizer.step) == 3 and bool(quantizer.initialized) and quantizer.restart_rows.abs().sum() > 0
    declared = training_state_keys(tok.model)
    assert declared == {f"quantizer.{name}" for name in ("step", "seen", "last_used_step", "last_seen",
                                                         "restart_rows", "initialized")}
    tok.save_pretrained(tmp_path / "tok")
    saved = load_file(str(tmp_path / "tok" / WEIGHTS_NAME))
    assert set(saved) == set(tok.model.state_dict()) - declared
    assert "quantizer.weight" in saved and {k for k in tok.model.state_dict() if k.startswith("quantizer.phi.")} <= set(saved)
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    images = torch.rand(2, 3, 16, 16)
    ids = tok.encode(images)
    assert torch.equal(loaded.encode(images), ids) and torch.equal(loaded.decode(ids), tok.decode(ids))
    assert int(loaded.model.quantizer.step) == 0 and not bool(loaded.model.quantizer.initialized)


def test_msvq_is_composed_from_the_shared_parts_and_subclasses_no_other_kind():
    from vqgan.quantizers import KIND_CONFIGS, MSVQConfig, VectorQuantizer
    from vqgan.quantizers.codebooks import LearnedCodebook
    from vqgan.quantizers.estimators import VQEstimator, straight_through
    from vqgan.quantizers.maintenance import DeadCodeRestart, KMeansInit, SyncInit
    from vqgan.quantizers.search import EuclideanSearch

    assert not issubclass(MultiScaleResidualQuantizer, VectorQuantizer)
    assert KIND_CONFIGS["msvq"] is MSVQConfig
    config = QuantizerConfig(kind="msvq", num_codes=16, dim=4, scales=(1, 2, 4), phi_count=2, kmeans_iters=3)
    q = build_quantizer(config)
    assert q.config == config.kind_config == MSVQConfig(num_codes=16, dim=4, scales=(1, 2, 4), phi_count=2,
                                                        kmeans_iters=3)
    assert isinstance(q.codebook_store, LearnedCodebook) and isinstance(q.code_search, EuclideanSearch)
    assert q.estimator == VQEstimator(0.25, straight_through)
    assert q.init == KMeansInit(3) and q.restart == DeadCodeRestart(10, "error")
    off = build_quantizer(MSVQConfig(num_codes=16, dim=4, scales=(1, 2, 4), kmeans_init=False, dead_code_threshold=0))
    assert off.init == SyncInit() and off.restart is None and "restart_rows" not in off.state_dict()
