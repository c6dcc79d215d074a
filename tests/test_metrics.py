"""FID against torch-fidelity and scipy, streaming statistics, PSNR/SSIM against hand values and skimage, plots.

No network: the InceptionV3 weights are a random-valued file in the real file's format, loaded through the real
loading path. FIDs from it mean nothing, but ours and torch-fidelity's must agree on them. Pipeline tests use
the port's early feature layers (torch-fidelity's `feature_layer_fid`) to stay fast on a 2-core CPU: layers
only change where the shared forward stops, and the 2048-d comparison is printed by benchmarks/fid.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from vqgan.metrics.fid import FeatureStatistics, FIDStats, frechet_distance, load_stats, save_stats
from vqgan.metrics.image_metrics import psnr, ssim
from vqgan.metrics.inception import (
    URL_INCEPTION_V3,
    ExtractorIdentity,
    InceptionFeatures,
    resolve_weights_path,
    write_random_inception_weights,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*not the official TF-FID")  # the random test weights, on purpose
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_tool():
    """The vqgan-fid command (`main` = its body, which raises) and its library half, vqgan.metrics.sources."""
    from vqgan.cli import fid
    from vqgan.metrics import sources

    return types.SimpleNamespace(main=fid.run, collate_runs=sources.collate_runs,
                                 float_to_uint8=sources.float_to_uint8)


def random_weights(tmp_path_factory) -> Path:
    """One random-weights file per pytest session, shared by the test files that need it."""
    path = tmp_path_factory.getbasetemp() / "inception-random-seed0.pth"
    if not path.exists():
        write_random_inception_weights(path, seed=0)
    return path


def write_images(folder: Path, count: int, shift: float, seed: int, size: int = 32) -> list[np.ndarray]:
    """Blocky noise PNGs; `shift` moves the colour distribution so that two folders differ."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        blocks = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
        image = np.clip(blocks + rng.normal(shift, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        images.append(image)
    return images


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_images")
    images_a = write_images(root / "a", 8, shift=0.0, seed=0)
    write_images(root / "b", 8, shift=40.0, seed=1)
    return root / "a", root / "b", images_a


def run_tool(argv: list[str]) -> dict:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = load_tool().main(argv)
    last_line = stdout.getvalue().strip().splitlines()[-1]
    assert json.loads(last_line) == result  # the final stdout line is the machine-readable result
    return result


@pytest.fixture(scope="module")
def fid_ab(weights, folders, tmp_path_factory):
    """Our tool on folders a, b at feature layer 192, keeping a's statistics."""
    folder_a, folder_b, _ = folders
    stats_path = tmp_path_factory.mktemp("stats") / "a_192.npz"
    result = run_tool([str(folder_a), str(folder_b), "--save-stats", str(stats_path), "--inception-weights",
                       str(weights), "--feature-layer", "192", "--num-workers", "0", "--batch-size", "3"])
    return result, stats_path


# ----------------------------------------------------------------------------------------------- Frechet distance
def random_covariance(rng, dim: int, samples: int) -> np.ndarray:
    x = rng.standard_normal((samples, dim)) @ rng.standard_normal((dim, dim))
    return np.cov(x, rowvar=False)


def test_frechet_distance_matches_direct_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    s1, s2 = random_covariance(rng, 24, 200), random_covariance(rng, 24, 300)
    direct = mu1 - mu2
    direct = direct @ direct + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-10)
    # symmetric form tr((S1^1/2 S2 S1^1/2)^1/2): same quantity, independent computation
    root1 = linalg.sqrtm(s1).real
    symmetric = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
    symmetric -= 2 * np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(symmetric, rel=1e-8)
    # commuting (diagonal) covariances: W2^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    closed = ((mu1[:10] - mu2[:10]) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1[:10], np.diag(a), mu2[:10], np.diag(b)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_of_identical_gaussians_is_zero_and_singular_inputs_stay_finite():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(16), random_covariance(rng, 16, 100)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    low_rank = random_covariance(rng, 16, 5)  # rank 4: the product of covariances is singular
    value = frechet_distance(mu, low_rank, mu + 1, low_rank)
    assert np.isfinite(value) and value == pytest.approx(16.0, rel=1e-3)  # only the mean moved, by 1 per dim


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected mu \(D,\) and sigma \(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------- statistics
def test_streaming_statistics_equal_one_shot_numpy():
    torch.manual_seed(0)
    features = torch.rand(103, 16) * 3 + 5  # offset mean: the sums must not lose the covariance to cancellation
    stats = FeatureStatistics(16)
    for chunk in torch.split(features, [1, 40, 7, 55]):
        stats.update(chunk)
    reference = features.double().numpy()
    np.testing.assert_allclose(stats.mean(), reference.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-12)
    halves = FeatureStatistics(16)
    halves.update(features[:50])
    other = FeatureStatistics(16)
    other.update(features[50:])
    halves.merge(other).all_reduce()  # all_reduce is a no-op outside torch.distributed
    np.testing.assert_allclose(halves.covariance(), stats.covariance(), rtol=1e-9, atol=1e-12)
    assert int(halves.count.item()) == 103


def test_statistics_errors_name_what_came():
    stats = FeatureStatistics(8)
    with pytest.raises(ValueError, match=r"expected features \(B, 8\), got \(2, 9\)"):
        stats.update(torch.zeros(2, 9))
    stats.update(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        stats.covariance()


def test_stats_file_round_trip_and_identity_checks(tmp_path):
    rng = np.random.default_rng(0)
    identity = ExtractorIdentity("inception-v3-compat", "2048", "ab" * 32)
    stats = FIDStats(rng.standard_normal(4), random_covariance(rng, 4, 10), 10, identity)
    path = save_stats(tmp_path / "ref.npz", stats)
    loaded = load_stats(path, expected=identity)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.extractor) == (10, identity)
    other = ExtractorIdentity("inception-v3-compat", "2048", "cd" * 32)
    with pytest.raises(ValueError, match="another feature extractor"):
        load_stats(path, expected=other)
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # no identity recorded
    with pytest.raises(ValueError, match="lacks"):
        load_stats(tmp_path / "pytorch_fid.npz", expected=identity)


# ----------------------------------------------------------------------------------------------- extractor
def test_missing_weights_error_says_where_and_url(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Download https://"):
        resolve_weights_path(tmp_path / "nope.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_weights_path(None, download=False)
    message = str(info.value)
    assert URL_INCEPTION_V3 in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message


def test_weights_file_that_is_not_inception_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="InceptionV3 state dict"):
        InceptionFeatures(tmp_path / "other.pth")


def test_extractor_equals_torch_fidelity_port_and_is_per_image(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 24, 40), dtype=torch.uint8, generator=generator)
    with pytest.warns(UserWarning, match="not the official"):
        ours = InceptionFeatures(weights, layer="64").eval()
    port = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(weights))
    with torch.inference_mode():
        features = ours(images)  # (3, 64)
        torch.testing.assert_close(features, port(images)[0], rtol=0, atol=0)
        alone = torch.cat([ours(image[None]) for image in images])  # batching changes nothing: grouping is exact
        torch.testing.assert_close(features, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected uint8 images \(B, 3, H, W\)"):
        ours(images.float())


def test_inception_file_is_read_once_and_never_unpickled_unsafely(weights, monkeypatch):
    """One read gives the hash and the tensors (no swap window), and torch-fidelity's port loads nothing itself."""
    import builtins

    opened, loads = [], []
    real_open, real_load = builtins.open, torch.load

    def counting_open(file, *args, **kwargs):  # builtins.open (torch.load of a path) and io.open (pathlib)
        if isinstance(file, (str, Path)) and Path(file) == weights:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(torch, "load", recording_load)
    ours = InceptionFeatures(weights, layer="64", extra_layers=("logits_unbiased",))
    monkeypatch.undo()
    assert len(opened) == 1, opened
    assert loads == [True]  # the safe load only: no weights_only=False (or default) unpickling
    from vqgan.metrics.inception import extractor_identity

    assert ours.identity == extractor_identity(weights, "64")  # the hash of the bytes that were loaded
    port_state = torch.load(weights, weights_only=True)
    assert all(torch.equal(ours.net.state_dict()[k], v) for k, v in port_state.items())


def test_collate_runs_groups_equal_sizes_in_order():
    tool = load_tool()
    items = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.zeros(3, 5, 4), torch.ones(3, 4, 4)]
    groups = tool.collate_runs(items)
    assert [tuple(g.shape) for g in groups] == [(2, 3, 4, 4), (1, 3, 5, 4), (1, 3, 4, 4)]
    assert tool.float_to_uint8(torch.tensor([0.0, 0.5 / 255, 1.0, 1.5])).tolist() == [0, 1, 255, 255]


def test_tokenizer_reconstructions_of_mixed_sizes_equal_the_real_tokenizer_per_image():
    from vqgan.autoencoder import VQModel, preset
    from vqgan.metrics.sources import tokenizer_reconstructions
    from vqgan.tokenizer import VQTokenizer

    torch.manual_seed(0)
    tokenizer = VQTokenizer.from_model(VQModel(preset("tiny")))  # f = 4
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=generator),
               torch.randint(0, 256, (1, 3, 18, 23), dtype=torch.uint8, generator=generator)]  # not multiples of f
    out = list(tokenizer_reconstructions(tokenizer, batches))
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16), (1, 3, 16, 20)]  # centre-cropped to multiples of 4
    cropped = batches[1][..., 1:17, 1:21]
    expected = (tokenizer.decode(tokenizer.encode(cropped.float() / 255)) * 255 + 0.5).floor().to(torch.uint8)
    assert torch.equal(out[1], expected) and out[0].dtype == torch.uint8


# ----------------------------------------------------------------------------------------------- the tool
def test_tool_fid_equals_torch_fidelity(weights, folders, fid_ab):
    import torch_fidelity

    folder_a, folder_b, _ = folders
    ours, stats_path = fid_ab
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folder_a), input2=str(folder_b), fid=True, cuda=False, feature_extractor_weights_path=str(weights),
        feature_layer_fid="192", cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert (ours["count1"], ours["count2"]) == (8, 8)
    assert ours["fid"] > 1.0  # the folders differ: a real distance, not noise
    assert ours["fid"] == pytest.approx(theirs, rel=1e-3)
    assert load_stats(stats_path).count == 8


def test_tool_identical_images_from_a_dataset_against_saved_stats_give_zero(weights, folders, fid_ab, tmp_path):
    import datasets

    _, _, images_a = folders
    _, stats_path = fid_ab
    shuffled = [Image.fromarray(images_a[i]) for i in (5, 2, 7, 0, 1, 6, 3, 4)]  # order must not matter
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": shuffled, "label": list(range(8))}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    result = run_tool(
        [f"hf:{tmp_path / 'ds'}", str(stats_path), "--inception-weights", str(weights), "--feature-layer", "192",
         "--num-workers", "0"]
    )
    trace = np.trace(load_stats(stats_path).sigma)
    assert (result["count1"], result["count2"]) == (8, 8)
    assert abs(result["fid"]) < 1e-5 * trace  # 8 samples in 192-d: sqrtm of a singular product is this coarse


def test_tool_refuses_stats_of_another_extractor(weights, folders, tmp_path):
    identity = ExtractorIdentity("inception-v3-compat", "192", "0" * 64)
    save_stats(tmp_path / "other.npz", FIDStats(np.zeros(192), np.eye(192), 5, identity))
    with pytest.raises(ValueError, match="another feature extractor"):
        load_tool().main([str(folders[0]), str(tmp_path / "other.npz"), "--inception-weights", str(weights),
                          "--feature-layer", "192"])
    with pytest.raises(SystemExit):  # one source and nothing to save: argparse error
        load_tool().main([str(folders[0])])


# ----------------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_hand_values():
    target = torch.zeros(2, 3, 4, 4)
    preds = torch.full((2, 3, 4, 4), 0.1)
    preds[1] = 0.0  # exact reproduction
    values = psnr(preds, target, data_range=1.0)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(20.0, abs=1e-5)  # 10 log10(1 / 0.01)
    assert torch.isinf(values[1])
    target8 = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    preds8 = target8.clone()
    preds8[0, 0, 0, 0] = 16  # mse = 16^2 / 48
    assert psnr(preds8, target8, data_range=255).item() == pytest.approx(10 * np.log10(255**2 * 48 / 256), abs=1e-4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        psnr(preds8.float(), target8.float(), data_range=1)
    with pytest.raises(ValueError, match="data_range must be 1"):
        psnr(preds, target, data_range=2)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 40, 33, generator=generator)
    preds = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0)
    reference = [
        structural_similarity(p.double().numpy(), t.double().numpy(), data_range=1, **kwargs)
        for p, t in zip(preds, target)
    ]
    np.testing.assert_allclose(ssim(preds, target, data_range=1.0).numpy(), reference, atol=1e-4)
    preds8, target8 = (preds * 255).round().to(torch.uint8), (target * 255).round().to(torch.uint8)
    reference8 = [structural_similarity(p.numpy(), t.numpy(), data_range=255, **kwargs) for p, t in zip(preds8, target8)]
    np.testing.assert_allclose(ssim(preds8, target8, data_range=255).numpy(), reference8, atol=1e-4)
    assert torch.allclose(ssim(target, target, data_range=1.0), torch.ones(3))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(target[..., :10, :], target[..., :10, :], data_range=1.0)


# ----------------------------------------------------------------------------------------------- plots
def assert_png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    return image


def test_plots_write_valid_pngs(tmp_path):
    from vqgan.metrics.plots import plot_code_usage, plot_codebook_tsne

    rng = np.random.default_rng(0)
    codebook, counts = rng.standard_normal((60, 8)), rng.poisson(4, 60)
    counts[:7] = 0  # dead codes
    assert_png(plot_codebook_tsne(codebook, counts, tmp_path / "tsne.png", max_codes=40, iterations=250))
    assert_png(plot_code_usage(counts, tmp_path / "usage.png"))
    with pytest.raises(ValueError, match=r"expected counts \(60,\)"):
        plot_codebook_tsne(codebook, counts[:10], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="all zero"):
        plot_code_usage(np.zeros(5), tmp_path / "bad.png")


def test_image_grid_layout_and_pixels(tmp_path):
    from vqgan.image_io import save_image_grid

    images = torch.zeros(5, 3, 32, 32)
    images[1, 0] = 1.0  # the second tile is pure red
    grid = assert_png(save_image_grid(images, tmp_path / "grid.png", nrow=3, captions=list("abcde"), min_cell=64))
    scale, pad, caption_h = 2, 2, 14  # 32 px enlarged x2 to reach 64
    cell_w, cell_h = 32 * scale + pad, 32 * scale + caption_h + pad
    assert grid.size == (3 * cell_w + pad, 2 * cell_h + pad)
    assert grid.convert("RGB").getpixel((pad + cell_w + 32, pad + 32)) == (255, 0, 0)
    with pytest.raises(ValueError, match="got 2 captions for 5 images"):
        save_image_grid(images, tmp_path / "bad.png", captions=["a", "b"])


@pytest.mark.slow
def test_tool_fid_equals_torch_fidelity_at_pool3(weights, folders):
    """The literature's 2048-d pool3 features end to end (8 images per side: rank-deficient covariances,
    which both implementations must still agree on)."""
    import torch_fidelity

    folder_a, folder_b, _ = folders
    ours = run_tool([str(folder_a), str(folder_b), "--inception-weights", str(weights), "--num-workers", "0",
                     "--batch-size", "8"])
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folder_a), input2=str(folder_b), fid=True, cuda=False, feature_extractor_weights_path=str(weights),
        cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours["fid"] == pytest.approx(theirs, rel=1e-3)
