"""The user-facing surface: the lazy top-level API, the range convention, console commands and their one-line
errors, Hub push/pull round trips (offline: a fake HfApi, a local fake hub cache), evaluation protocols,
process-count-independent gFID samples, readable grids and the AR probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqgan
from vqgan.autoencoder import VQModel, preset
from vqgan import errors
from vqgan.cli import export, fid, reconstruct, sample, train
from vqgan.folder_format import ExportError, tokenizer_config
from vqgan.metrics.fid import load_stats
from vqgan.metrics.inception import write_random_inception_weights
from vqgan.metrics.protocols import PROTOCOLS, preprocess
from vqgan.metrics.sources import SourceOptions, prior_samples
from vqgan.prior.io import save_prior
from vqgan.prior.transformer import TransformerConfig, TransformerPrior
from vqgan.tokenizer import VQTokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VQGAN_DEBUG": ""}
pytestmark = pytest.mark.filterwarnings("ignore:.*not the official TF-FID")  # the random test weights, on purpose


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_assets")
    torch.manual_seed(0)
    tokenizer = VQTokenizer.from_model(VQModel(preset("tiny"))).save_pretrained(folder / "tokenizer")  # K=256, f=4
    prior = TransformerPrior(TransformerConfig(num_codes=256, grid=(8, 8), dim=32, depth=1, heads=2))
    save_prior(prior, folder / "prior", extra={"tokenizer": str(tokenizer)})
    images = folder / "images"
    images.mkdir()
    generator = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (32, 32), (36, 44), (30, 41)]):  # mixed sizes, two not multiples of f
        Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return {"tokenizer": tokenizer, "prior": folder / "prior", "images": images,
            "inception": write_random_inception_weights(folder / "inception.pth", seed=0)}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ top-level API, ranges


def test_import_vqgan_is_lazy_and_every_public_name_resolves():
    code = ("import sys, vqgan; assert 'torch' not in sys.modules, 'import vqgan pulled in torch'; "
            "from vqgan import VQTokenizer; import vqgan.tokenizer as t; assert VQTokenizer is t.VQTokenizer; "
            "[getattr(vqgan, n) for n in vqgan.__all__]; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    with pytest.raises(AttributeError, match="public names: .*VQTokenizer"):
        vqgan.VQTokenizr  # noqa: B018
    assert vqgan.VQModel is VQModel and vqgan.load_tokenizer


def test_model_range_names_and_the_deprecated_aliases_agree():
    torch.manual_seed(0)
    model = VQModel(preset("tiny")).eval()
    tok = VQTokenizer.from_model(model)
    x01 = torch.rand(2, 3, 16, 16)
    ids = model.encode_model_range(x01 * 2 - 1)
    assert torch.equal(ids, tok.encode(x01))  # [-1, 1] at the model, [0, 1] at the tokenizer: same ids
    torch.testing.assert_close(model.decode_model_range(ids), tok.decode(ids) * 2 - 1, rtol=0, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="encode_model_range"):
        assert torch.equal(model.encode(x01 * 2 - 1), ids)
    with pytest.warns(DeprecationWarning, match="decode_model_range"):
        assert torch.equal(model.decode_indices(ids), model.decode_model_range(ids))


def test_console_scripts_point_at_cli_mains():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expected = {"vqgan-train", "vqgan-train-prior", "vqgan-tokenize", "vqgan-sample", "vqgan-export",
                "vqgan-reconstruct", "vqgan-fid", "vqgan-evaluate", "vqgan-probe", "vqgan-convert"}
    assert expected <= set(scripts)
    import importlib

    for name in expected:
        module, attribute = scripts[name].split(":")
        assert module.startswith("vqgan.cli.") and callable(getattr(importlib.import_module(module), attribute))


# ------------------------------------------------------------------------------ Hub push / pull


class FakeHfApi:
    """Records what HfApi.create_repo / upload_folder would send: the repo and the exact file bytes."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, revision=None, **kwargs):
        files = {name: (Path(folder_path) / name).read_bytes() for name in allow_patterns}
        self.commits.append({"repo_id": repo_id, "revision": revision, "files": files,
                             "on_disk": sorted(p.name for p in Path(folder_path).iterdir())})
        return f"https://huggingface.co/{repo_id}/commit/fake"


def fake_cache(cache: Path, repo_id: str, revisions: dict[str, dict[str, bytes]]) -> Path:
    """huggingface_hub's cache layout: models--owner--name/refs/REV -> snapshots/COMMIT/files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for i, (revision, files) in enumerate(revisions.items()):
        commit = f"{i:040d}"
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in files.items():
            (snapshot / name).write_bytes(data)
    return cache


def test_tokenizer_push_sends_exactly_the_folder_files_and_pulls_back_by_revision(assets, tmp_path):
    tok = VQTokenizer.from_pretrained(assets["tokenizer"])
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "white").save(grid)
    api = FakeHfApi()
    evaluation = {"psnr": 21.5, "rfid": 3.25, "notes": ["rFID on 2 images"]}
    commit = tok.push_to_hub("someone/tok", evaluation=evaluation, reconstruction_grid=grid, api=api)
    assert commit.endswith("/commit/fake") and api.repos[0][0] == "someone/tok"
    sent = api.commits[0]["files"]
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors", "reconstructions.png"]
    assert json.loads(sent["config.json"]) == json.loads(json.dumps(tokenizer_config(tok.config, tok.train_summary)))
    card = sent["README.md"].decode()
    assert "| psnr | 21.5 |" in card and "(reconstructions.png)" in card
    assert "| rfid (protocol not recorded) | 3.25 |" in card  # an rFID is never published without its protocol
    assert sent["reconstructions.png"] == grid.read_bytes()

    other = VQTokenizer.from_model(VQModel(preset("tiny")))  # another revision holds other weights
    other_files = {"config.json": sent["config.json"], "README.md": b"",
                   "model.safetensors": _saved_weights(other, tmp_path / "other")}
    cache = fake_cache(tmp_path / "cache", "someone/tok", {"main": sent, "v0": other_files})
    pulled = vqgan.load_tokenizer("someone/tok", cache_dir=cache, local_files_only=True)
    older = VQTokenizer.from_pretrained("someone/tok", revision="v0", cache_dir=cache, local_files_only=True)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(pulled.encode(x), tok.encode(x)) and torch.equal(older.encode(x), other.encode(x))
    with pytest.raises(ExportError, match="at revision 'v9' .* could not be fetched"):
        VQTokenizer.from_pretrained("someone/tok", revision="v9", cache_dir=cache, local_files_only=True)


def _saved_weights(tokenizer: VQTokenizer, folder: Path) -> bytes:
    return (tokenizer.save_pretrained(folder) / "model.safetensors").read_bytes()


def test_prior_push_and_pull_round_trip(assets, tmp_path):
    prior, meta = vqgan.load_prior(assets["prior"])
    api = FakeHfApi()
    vqgan.push_prior_to_hub(prior, "someone/prior", {"tokenizer": "someone/tok"}, evaluation={"gfid": 12.5}, api=api)
    sent = api.commits[0]["files"]
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]
    assert api.commits[0]["on_disk"] == sorted(sent)  # nothing else was even written
    assert json.loads(sent["config.json"])["tokenizer"] == "someone/tok" and "| gfid | 12.5 |" in sent["README.md"].decode()
    cache = fake_cache(tmp_path / "cache", "someone/prior", {"main": sent})
    pulled, pulled_meta = vqgan.load_prior("someone/prior", cache_dir=cache, local_files_only=True)
    assert pulled_meta["config"] == meta["config"]
    for (name, a), b in zip(prior.state_dict().items(), pulled.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ one-line errors


def test_user_errors_are_one_line_and_debug_shows_the_traceback(assets, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  steps: 3\n model: [\n")
    assert train.main([str(bad_yaml)]) == 2
    assert f"{bad_yaml}:3:2: not valid YAML" in one_error_line(capsys)
    assert train.main([str(tmp_path / "missing.yaml")]) == 2
    assert "recipe" in (line := one_error_line(capsys)) and "does not exist" in line
    good = tmp_path / "good.yaml"
    good.write_text("train: {steps: 1}\n")
    assert train.main([str(good), "train.steps=abc"]) == 2
    assert "train.steps: expected an integer" in one_error_line(capsys)

    assert export.main([str(tmp_path / "no-ckpt"), str(tmp_path / "out")]) == 2
    assert "checkpoint folder" in (line := one_error_line(capsys)) and "does not exist" in line
    with pytest.raises(ExportError):  # --debug: the exception itself, traceback and all
        export.main([str(tmp_path / "no-ckpt"), str(tmp_path / "out"), "--debug"])

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert reconstruct.main([str(assets["tokenizer"]), str(tmp_path / "broken.png"), "--out", str(tmp_path / "r")]) == 2
    assert "cannot read image" in one_error_line(capsys) and not (tmp_path / "r").exists()

    assert sample.main([str(assets["prior"]), "--top-k", "0", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "top_k must be an integer >= 1" in one_error_line(capsys)
    assert sample.main(["someone/absent-prior", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "'someone/absent-prior' is not a local folder" in one_error_line(capsys)

    (tmp_path / "empty").mkdir()
    common = ["--inception-weights", str(assets["inception"]), "--feature-layer", "64", "--num-workers", "0"]
    assert fid.main([str(tmp_path / "empty"), "--save-stats", str(tmp_path / "x.npz"), *common]) == 2
    assert "no images" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(assets["images"]), "--save-stats", str(tmp_path / "x.npz"), "--protocol", "imagenet"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert "invalid choice: 'imagenet'" in line and "imagenet-val" in line


def test_errors_module_joins_multiline_messages():
    assert errors.one_line(ValueError("a\n  b\n")) == "a; b"
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1\nValueError: cannot read image a.png: broken")
    assert errors.one_line(worker) == "cannot read image a.png: broken"


# ------------------------------------------------------------------------------ protocols, rFID, gFID


def test_imagenet_val_protocol_is_adm_resize_then_centre_crop():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (300, 600, 3), dtype=np.uint8))  # W=600, H=300
    out = preprocess(wide, "imagenet-val")
    expected = wide.resize((512, 256), Image.BICUBIC).crop((128, 0, 384, 256))  # shorter side 256, centre
    assert out.size == (256, 256) and np.array_equal(np.asarray(out), np.asarray(expected))
    big = Image.fromarray(rng.integers(0, 256, (1100, 700, 3), dtype=np.uint8))  # >= 2x: one box halving first
    halved = big.resize((350, 550), Image.BOX)
    expected = halved.resize((256, round(550 * 256 / 350)), Image.BICUBIC)
    top = (expected.height - 256) // 2
    assert np.array_equal(np.asarray(preprocess(big, "imagenet-val")), np.asarray(expected.crop((0, top, 256, top + 256))))
    assert preprocess(wide, "native").size == (600, 300)
    with pytest.raises(ValueError, match="valid protocols: native, imagenet-val"):
        preprocess(wide, "imagenet")
    assert PROTOCOLS["imagenet-val"] == 256


def test_rfid_on_mixed_sizes_and_the_reference_must_be_the_reconstructed_images(assets, tmp_path, capsys):
    common = ["--inception-weights", str(assets["inception"]), "--feature-layer", "64", "--num-workers", "0",
              "--batch-size", "2"]
    ref = tmp_path / "ref.npz"
    fid.run([str(assets["images"]), "--save-stats", str(ref), *common])
    assert load_stats(ref).source == f"folder {assets['images']}, protocol native"
    result = fid.run([str(ref), f"recon:{assets['tokenizer']}", "--images", str(assets["images"]), *common])
    assert result["count1"] == result["count2"] == 4 and np.isfinite(result["fid"])

    other = tmp_path / "other"
    shutil.copytree(assets["images"], other)
    with pytest.raises(ValueError, match="mismatched statistics"):
        fid.run([str(ref), f"recon:{assets['tokenizer']}", "--images", str(other), *common])
    allowed = fid.run([str(ref), f"recon:{assets['tokenizer']}", "--images", str(other), "--allow-different-reference",
                       *common])
    assert allowed["fid"] == pytest.approx(result["fid"], rel=1e-9)  # same pixels, other folder
    gfid = fid.run([str(assets["images"]), f"prior:{assets['prior']}", "--num-samples", "3", *common])  # mixed reference
    assert (gfid["count1"], gfid["count2"]) == (4, 3) and np.isfinite(gfid["fid"])


def test_prior_samples_do_not_depend_on_the_number_of_processes(assets):
    options = SourceOptions(batch_size=2, num_samples=5, seed=3, top_k=20)
    device = torch.device("cpu")
    alone = torch.cat(list(prior_samples(str(assets["prior"]), 0, 1, options, device)))  # (5, 3, 32, 32)
    # two processes: batches 0, 2 on rank 0 and batch 1 on rank 1
    rank0 = list(prior_samples(str(assets["prior"]), 0, 2, options, device))
    rank1 = list(prior_samples(str(assets["prior"]), 1, 2, options, device))
    assert torch.equal(torch.cat([rank0[0], rank1[0], rank0[1]]), alone)
    assert not torch.equal(alone[:2], alone[2:4])  # the batches really differ


# ------------------------------------------------------------------------------ pictures


def test_grids_enlarge_small_images_with_nearest_and_caption_them(tmp_path):
    from vqgan.image_io import render_image_grid

    images = torch.rand(4, 3, 8, 8)
    canvas = render_image_grid(images, nrow=2, captions=["step 10\nPSNR 20.0 dB"] * 4)
    scale = 12  # ceil(96 / 8)
    assert canvas.size == (2 * (8 * scale + 2) + 2, 2 * (8 * scale + 28 + 2) + 2)
    cell = np.asarray(canvas)[2 : 2 + 8 * scale, 2 : 2 + 8 * scale]  # first image, enlarged
    pixels = (images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(cell, pixels.repeat(scale, 0).repeat(scale, 1))  # nearest: each pixel a block


# ------------------------------------------------------------------------------ AR probe


@pytest.mark.slow
def test_probe_trains_the_fixed_prior_and_reports_nll_and_gfid(assets, tmp_path):
    out = tmp_path / "probe"
    command = [sys.executable, "-m", "vqgan.cli.probe", str(assets["tokenizer"]), "--out", str(out),
               "--data", "source=embedded", "image_size=32", "num_eval_images=4", "embedded_repeats=1",
               "--steps", "3", "--batch-size", "4", "--dim", "32", "--depth", "1", "--heads", "2", "--num-samples", "4",
               "--", "--inception-weights", str(assets["inception"]), "--feature-layer", "64", "--batch-size", "2"]
    done = subprocess.run(command, env={**ENV, "VQGAN_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["bits_per_token"] == result["bits_per_token"]
    assert 0 < result["bits_per_token"] < 2 * result["uniform_bits_per_token"] and np.isfinite(result["gfid"])
    assert result["probe"]["steps"] == 3 and (out / "prior_run" / "prior" / "model.safetensors").is_file()
    assert (out / "probe.md").read_text().startswith("| tokenizer |")


def test_inception_score_and_precision_recall_equal_torch_fidelity(assets, tmp_path):
    import torch_fidelity

    real, generated = tmp_path / "real", tmp_path / "generated"
    rng = np.random.default_rng(1)
    for folder, shift in ((real, 0), (generated, 60)):
        folder.mkdir()
        for i in range(12):
            pixels = np.clip(rng.integers(0, 256, (32, 32, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    ours = fid.run([str(real), str(generated), "--isc", "--prc", "--inception-weights", str(assets["inception"]),
                    "--feature-layer", "64", "--num-workers", "0", "--batch-size", "5"])
    common = dict(cuda=False, feature_extractor_weights_path=str(assets["inception"]), cache=False, verbose=False)
    isc = torch_fidelity.calculate_metrics(input1=str(generated), isc=True, **common)
    prc = torch_fidelity.calculate_metrics(input1=str(generated), input2=str(real), prc=True,
                                           feature_extractor="inception-v3-compat", feature_layer_prc="64", **common)
    assert ours["isc2"] == pytest.approx(isc["inception_score_mean"], rel=1e-4)
    assert ours["isc2_std"] == pytest.approx(isc["inception_score_std"], rel=1e-3, abs=1e-6)
    assert (ours["precision"], ours["recall"]) == (pytest.approx(prc["precision"]), pytest.approx(prc["recall"]))


def test_data_mistakes_in_the_trainers_are_one_line(tmp_path, capsys):
    """A folder without images, tokens of another codebook: the commands a user runs say so in one line."""
    from vqgan.cli import train_prior
    from vqgan.prior.data import save_token_dataset

    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    recipe = str(Path(__file__).resolve().parents[1] / "recipes")
    assert train.main([f"{recipe}/quickstart.yaml", f"data.source={empty}", f"run_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert f"image folder {empty} holds no image files" in line, line

    tokens = tmp_path / "tokens"  # K=16 tokens for the quickstart prior's K=256
    save_token_dataset(tokens, torch.zeros(2, 8, 8, dtype=torch.long), None,
                       {"num_codes": 16, "grid": [8, 8], "tokenizer_hash": "x"})
    capsys.readouterr()  # the save's progress bar
    assert train_prior.main([f"{recipe}/prior_quickstart.yaml", f"tokens.path={tokens}",
                             f"run_dir={tmp_path / 'prior'}"]) == 2
    assert "num_codes: dataset has K=16, prior expects K=256" in one_error_line(capsys)
