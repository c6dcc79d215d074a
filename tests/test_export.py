"""Exported tokenizer: save/load round trips (in a fresh process, never unpickling), batch invariance,
input validation, checkpoint export with and without EMA, the reconstruct tool, and ONNX equality."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors.torch import load_file, save_file

from vqgan.autoencoder import PRESETS, VQModel, VQModelConfig, preset
from vqgan.config import from_dict, to_dict
from vqgan.export import export_checkpoint
from vqgan.folder_format import (
    FORMAT_VERSION,
    ExportError,
    parse_tokenizer_config,
    tokenizer_config,
    write_folder_atomically,
)
from vqgan.tokenizer import VQTokenizer
from vqgan.training_state import training_state_keys

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def low_dim_config() -> VQModelConfig:
    """tiny with LlamaGen-style projected, l2-normalised, affine codes: exercises every lookup branch."""
    cfg = preset("tiny")
    return dataclasses.replace(
        cfg, quantizer=dataclasses.replace(cfg.quantizer, code_dim=8, l2_normalize=True, affine_reparam=True)
    )


def random_model(config: VQModelConfig, seed: int) -> VQModel:
    """A random model whose codes are spread over its latents (like k-means init), so many codes get used."""
    torch.manual_seed(seed)
    model = VQModel(config).eval()
    q = model.quantizer
    with torch.no_grad():
        h = rearrange(model.encode_latent(torch.rand(8, 3, 32, 32) * 2 - 1), "b d h w -> (b h w) d")  # (512, D)
        if q.project_in is not None:
            h = q.project_in(h)  # (512, c)
        if config.quantizer.affine_reparam:
            q.affine_scale.uniform_(-0.5, 0.5)
            q.affine_shift.uniform_(-0.1, 0.1)
        codes = h[torch.randperm(h.shape[0])[: config.quantizer.num_codes]]  # (K, c)
        codes = codes + 0.05 * codes.std() * torch.randn_like(codes)
        if config.quantizer.l2_normalize:
            codes = F.normalize(codes, dim=1)
        if config.quantizer.affine_reparam:
            codes = (codes - q.affine_shift) / (1.0 + q.affine_scale)
        q.weight.copy_(codes)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> VQTokenizer:
    return VQTokenizer.from_model(random_model(preset("tiny"), seed=1), {"step": 7, "data": "unit-test"})


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> Path:
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("export") / "tok")


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen)  # (B, 3, H, W) in [0, 1]


def tool(name: str):
    """A console command's module (vqgan.cli.NAME), to call its main() in-process (cheaper than a subprocess)."""
    return importlib.import_module(f"vqgan.cli.{name}")


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120, **kwargs)


# ------------------------------------------------------------------------------------- round trips


def test_load_in_fresh_process_gives_identical_ids_and_images_without_unpickling(tokenizer, saved, tmp_path):
    x = images(3)
    ids, recon = tokenizer.encode(x), tokenizer.decode(tokenizer.encode(x))
    assert ids.unique().numel() > 10  # a degenerate all-one-code model would prove nothing
    save_file({"images": x}, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(f"""
        import pickle, sys, torch
        def refuse(*a, **k):
            raise AssertionError("unpickling attempted")
        pickle.load = pickle.loads = torch.load = refuse
        pickle.Unpickler = refuse
        from safetensors.torch import load_file, save_file
        from vqgan.tokenizer import VQTokenizer
        tok = VQTokenizer.from_pretrained({str(saved)!r})
        x = load_file({str(tmp_path / "inputs.safetensors")!r})["images"]
        ids = tok.encode(x)
        out = {{"ids": ids, "recon": tok.decode(ids), "embed": tok.embed(ids)}}
        save_file(out, {str(tmp_path / "out.safetensors")!r})
        heavy = [m for m in ("vqgan.train", "vqgan.losses", "vqgan.discriminator", "accelerate", "lpips")
                 if m in sys.modules]
        print("HEAVY", heavy)
    """)
    result = run(["-c", script])
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout  # training code stays out of a downstream program
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["ids"], ids)
    assert torch.equal(out["recon"], recon)
    assert torch.equal(out["embed"], tokenizer.embed(ids))


def test_saved_folder_holds_config_weights_and_card(tokenizer, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and isinstance(config["format_version"], int)
    assert (config["num_codes"], config["code_dim"], config["downsample_factor"]) == (256, 32, 4)
    assert config["image_size"] == [32, 32] and config["value_range"] == [0.0, 1.0]
    assert from_dict(VQModelConfig, config["model"]) == tokenizer.config
    card = (saved / "README.md").read_text()
    assert "VQTokenizer.from_pretrained" in card and "step: 7" in card and "unit-test" in card
    assert "8x8 = 64 tokens" in card


def test_from_model_copies_and_leaves_the_model_alone():
    model = random_model(preset("tiny"), seed=3).train()
    tok = VQTokenizer.from_model(model)
    assert model.training and not tok.training and not tok.model.training
    tok.train()  # a tokenizer never leaves eval mode
    assert not tok.model.training
    with torch.no_grad():
        model.quantizer.weight.add_(1.0)
    assert not torch.equal(tok.codebook, model.quantizer.codebook)


def test_batch_invariance(tokenizer):
    x = images(4, seed=5)
    batch = tokenizer.encode(x)  # (4, 8, 8)
    alone = torch.cat([tokenizer.encode(x[i : i + 1]) for i in range(4)])
    assert torch.equal(batch, alone)
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(tokenizer.encode(x[order]), batch[order])
    recon_batch = tokenizer.decode(batch)
    recon_alone = torch.cat([tokenizer.decode(batch[i : i + 1]) for i in range(4)])
    # Images are only close, not bit-equal: conv kernels may block a batch of 4 differently from 1.
    torch.testing.assert_close(recon_batch, recon_alone, rtol=0, atol=1e-5)


def test_uint8_input_equals_float_input(tokenizer):
    x8 = (images(2) * 255).round().to(torch.uint8)
    assert torch.equal(tokenizer.encode(x8), tokenizer.encode(x8.float() / 255.0))


def test_shapes_embed_codebook_and_geometry(tokenizer):
    x = images(2, size=48)  # any multiple of f, not only the training size
    ids = tokenizer.encode(x)
    assert ids.shape == (2, 12, 12) and ids.dtype == torch.long
    assert tokenizer.decode(ids).shape == (2, 3, 48, 48)
    codebook = tokenizer.codebook
    assert codebook.shape == (256, 32)
    assert torch.equal(tokenizer.embed(ids), codebook[ids])  # (B, h, w, code_dim), channels-last
    assert tokenizer.tokens_per_image(64, 32) == 16 * 8 and tokenizer.grid_shape(64, 32) == (16, 8)
    assert (tokenizer.num_codes, tokenizer.code_dim, tokenizer.downsample_factor) == (256, 32, 4)
    # Outputs are ordinary tensors: a downstream model can train on them.
    emb = torch.nn.Embedding(256, 4)
    emb(ids).sum().backward()
    (tokenizer.embed(ids) * torch.ones(32, requires_grad=True)).sum().backward()


def test_decode_of_encode_equals_the_model_forward(tokenizer):
    x = images(2)
    recon, _ = tokenizer.model(x * 2 - 1)  # the training-time path, [-1, 1]
    expected = ((recon.clamp(-1, 1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(tokenizer.decode(tokenizer.encode(x)), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.full((1, 8, 8), 256), r"ids must lie in \[0, 256\).*\[256, 256\]"),
        (lambda: torch.full((1, 8, 8), -1), r"ids must lie in \[0, 256\).*\[-1, -1\]"),
        (lambda: torch.zeros(1, 8, 8), r"ids must be an integer tensor.*float32"),
        (lambda: torch.zeros(8, 8, dtype=torch.long), r"ids must have shape \(B, h, w\), got \(8, 8\)"),
        (lambda: [[[0]]], r"ids must be a torch.Tensor"),
    ],
)
def test_bad_ids_are_rejected(tokenizer, make, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.decode(make())
    with pytest.raises(ValueError, match=message):
        tokenizer.embed(make())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.rand(3, 32, 32), r"shape \(B, 3, H, W\), got \(3, 32, 32\).*batch dimension"),
        (lambda: torch.rand(1, 1, 32, 32), r"shape \(B, 3, H, W\), got \(1, 1, 32, 32\)"),
        (lambda: torch.rand(1, 3, 30, 32), r"30x32 must be positive multiples of the downsampling factor 4"),
        (lambda: torch.rand(1, 3, 32, 32) * 2 - 1, r"must lie in \[0, 1\], got values in \[-"),
        (lambda: torch.rand(1, 3, 32, 32) * 255, r"must lie in \[0, 1\]"),
        (lambda: torch.zeros(1, 3, 32, 32, dtype=torch.int32), r"float in \[0, 1\] or uint8.*torch.int32"),
        (lambda: torch.full((1, 3, 32, 32), float("nan")), r"NaN or infinite"),
    ],
)
def test_bad_images_are_rejected(tokenizer, make, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(make())


def test_grid_shape_rejects_indivisible_sizes(tokenizer):
    with pytest.raises(ValueError, match="downsampling factor 4"):
        tokenizer.tokens_per_image(33, 32)


# ------------------------------------------------------------------------- loading: refusals


def test_pickle_files_are_refused(tokenizer, tmp_path):
    for suffix in (".pt", ".bin", ".pth", ".ckpt"):
        path = tmp_path / f"weights{suffix}"
        torch.save(tokenizer.model.state_dict(), path)
        with pytest.raises(ExportError, match=rf"refusing to load .*weights\{suffix}: it is a pickle file"):
            VQTokenizer.from_pretrained(path)
    folder = tmp_path / "hf_style"
    folder.mkdir()
    torch.save(tokenizer.model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(tokenizer_config(tokenizer.config)))
    with pytest.raises(ExportError, match=r"refusing to load .*pytorch_model.bin: it is a pickle file"):
        VQTokenizer.from_pretrained(folder)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / "config.json").read_text())
    edit(data)
    (folder / "config.json").write_text(json.dumps(data))


def test_newer_format_version_is_refused(saved, tmp_path):
    folder = copy_folder(saved, tmp_path / "tok")
    edit_config(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ExportError, match=rf"format_version {FORMAT_VERSION + 1} is newer .* upgrade vqgan"):
        VQTokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"]["autoencoder"].update(bogus=1), r"unknown config key model\.autoencoder\.bogus"),
        (lambda d: d.update(extra=1), r"unknown key\(s\) extra"),
        (lambda d: d.update(num_codes=512), r"num_codes=512 contradicts the model config \(256\)"),
        (lambda d: d.update(format="something-else"), r"not a vqgan tokenizer config"),
    ],
)
def test_bad_config_is_refused(saved, tmp_path, edit, message):
    folder = copy_folder(saved, tmp_path / "tok")
    edit_config(folder, edit)
    with pytest.raises(ExportError, match=message):
        VQTokenizer.from_pretrained(folder)


def test_missing_and_unexpected_weights_are_refused(saved, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    folder = copy_folder(saved, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"missing keys: decoder\.conv_out\.bias"):
        VQTokenizer.from_pretrained(folder)
    folder = copy_folder(saved, tmp_path / "unexpected")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"unexpected keys: extra\.weight"):
        VQTokenizer.from_pretrained(folder)
    folder = copy_folder(saved, tmp_path / "shape")
    save_file({**state, "quantizer.weight": torch.zeros(128, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"quantizer\.weight has shape \(128, 32\).*\(256, 32\)"):
        VQTokenizer.from_pretrained(folder)


def test_a_folder_holds_no_training_state_and_format_1_folders_with_it_still_load(tokenizer, saved, tmp_path):
    """model.safetensors holds what inference reads (issue 22): the quantizer's declared training state (usage
    counters, restart candidates, the k-means flag) stays out. Format-1 folders carried it (and those from
    before restart_rows existed lacked that one); they load to the same ids, their training state unread."""
    state = load_file(str(saved / "model.safetensors"))
    declared = training_state_keys(tokenizer.model)
    assert {f"quantizer.{name}" for name in ("step", "seen", "last_used_step", "last_seen", "restart_rows",
                                              "initialized")} <= declared
    assert set(state) == set(tokenizer.model.state_dict()) - declared
    x = images(4)
    full = {k: v.clone() for k, v in tokenizer.model.state_dict().items()}
    full["quantizer.step"] = torch.tensor(123)  # a run's counters: never read back
    full["quantizer.last_used_step"] = torch.arange(256)
    for name, weights in (("v1", full), ("v1_before_restart_rows", {k: v for k, v in full.items()
                                                                     if k != "quantizer.restart_rows"})):
        folder = copy_folder(saved, tmp_path / name)
        save_file(weights, str(folder / "model.safetensors"))
        edit_config(folder, lambda d: d.update(format_version=1))
        old = VQTokenizer.from_pretrained(folder)
        assert torch.equal(old.encode(x), tokenizer.encode(x))
        assert int(old.model.quantizer.step) == 0 and not bool(old.model.quantizer.initialized)


def test_missing_folders_and_files(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "vqmodel_config.json").write_text("{}")
    with pytest.raises(ExportError, match="looks like a training checkpoint"):
        VQTokenizer.from_pretrained(tmp_path / "ckpt")


def test_hub_id_loads_from_the_local_hub_cache_offline(saved, tmp_path):
    # The layout huggingface_hub keeps for a downloaded repo: refs/main -> snapshots/<commit>/files.
    repo = tmp_path / "cache" / "models--someone--tiny-tokenizer"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    copy_folder(saved, repo / "snapshots" / commit)
    tok = VQTokenizer.from_pretrained("someone/tiny-tokenizer", cache_dir=tmp_path / "cache", local_files_only=True)
    reference = VQTokenizer.from_pretrained(saved)
    x = images(1)
    assert torch.equal(tok.encode(x), reference.encode(x))
    with pytest.raises(ExportError, match="could not be fetched from the Hub"):
        VQTokenizer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_config_round_trips_through_config_json(name):
    cfg = preset(name)
    assert from_dict(VQModelConfig, to_dict(cfg)) == cfg
    text = json.dumps(tokenizer_config(cfg, {"step": 1}))  # what config.json holds
    assert parse_tokenizer_config(json.loads(text)) == cfg


def test_low_dim_config_round_trips(tmp_path):
    cfg = low_dim_config()
    data = json.loads(json.dumps(tokenizer_config(cfg)))
    assert data["code_dim"] == 8 and parse_tokenizer_config(data) == cfg
    tok = VQTokenizer.from_model(random_model(cfg, seed=2))
    loaded = VQTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    x = images(2)
    ids = tok.encode(x)
    assert torch.equal(loaded.encode(x), ids) and torch.equal(loaded.embed(ids), tok.embed(ids))
    codebook = loaded.codebook  # (K, 8) after the affine map and l2 normalisation
    assert codebook.shape == (256, 8)
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(256))


# ------------------------------------------------------------------------------ atomic writes


def test_save_replaces_an_old_export_and_refuses_foreign_folders(tokenizer, tmp_path):
    out = tmp_path / "tok"
    VQTokenizer.from_model(random_model(preset("tiny"), seed=9)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert torch.equal(VQTokenizer.from_pretrained(out).codebook, tokenizer.codebook)

    def fail(folder: Path) -> None:
        (folder / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(out, fail)
    assert torch.equal(VQTokenizer.from_pretrained(out).codebook, tokenizer.codebook)  # old folder intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left behind

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a vqgan tokenizer folder; refusing to replace it"):
        tokenizer.save_pretrained(foreign)
    assert (foreign / "holiday.jpg").exists()


# ------------------------------------------------------------------------ checkpoint export


def make_checkpoint(folder: Path, with_ema: bool = True) -> tuple[VQModel, VQModel]:
    """A checkpoint folder as vqgan/train.py writes it (contracts.md), with distinct raw and EMA weights."""
    config = preset("tiny")
    raw, ema = random_model(config, seed=11), random_model(config, seed=12)
    folder.mkdir(parents=True)
    (folder / "vqmodel_config.json").write_text(json.dumps(to_dict(config)))
    save_file(raw.state_dict(), str(folder / "generator.safetensors"))
    if with_ema:
        save_file(ema.state_dict(), str(folder / "generator_ema.safetensors"))
    summary = {"step": 500, "data": "tiny-images", "metrics": {"psnr": 21.5, "rfid": 88.0}, "images_seen": 4000}
    (folder / "train_summary.json").write_text(json.dumps(summary))
    (folder / "optimizer.bin").write_bytes(b"opaque accelerate state, never read")
    return raw, ema


def test_export_checkpoint_uses_ema_or_raw_weights(tmp_path):
    raw, ema = make_checkpoint(tmp_path / "checkpoint-0000500")
    x = images(2)
    for use_ema, source in ((True, ema), (False, raw)):
        out = export_checkpoint(tmp_path / "checkpoint-0000500", tmp_path / f"tok-{use_ema}", use_ema=use_ema)
        tok = VQTokenizer.from_pretrained(out)
        for key, value in source.state_dict().items():
            assert torch.equal(tok.model.state_dict()[key], value), key
        assert torch.equal(tok.encode(x), VQTokenizer.from_model(source).encode(x))
        card = (out / "README.md").read_text()
        assert "step: 500" in card and "tiny-images" in card and "| psnr | 21.5 |" in card
        assert ("weights: EMA" in card) == use_ema
        assert json.loads((out / "config.json").read_text())["train_summary"]["images_seen"] == 4000


def test_export_without_ema_file_suggests_no_ema(tmp_path):
    make_checkpoint(tmp_path / "ckpt", with_ema=False)
    with pytest.raises(ExportError, match=r"no generator_ema\.safetensors .*--no-ema"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_export_tool_cli_with_onnx(tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", with_ema=False)
    assert tool("export").main([str(tmp_path / "ckpt"), str(tmp_path / "tok")]) == 2
    assert "--no-ema" in capsys.readouterr().err
    result = run(["-m", "vqgan.cli.export", str(tmp_path / "ckpt"), str(tmp_path / "tok"), "--no-ema",
                  "--format", "onnx", "--onnx-size", "32", "40"])
    assert result.returncode == 0, result.stderr
    assert "K=256" in result.stdout and "32x32 -> 64 tokens" in result.stdout
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["README.md", "config.json", "decoder.onnx", "encoder.onnx", "model.safetensors"]
    assert "take 32x40 images" in (tmp_path / "tok" / "README.md").read_text()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "tok").iterdir())  # readable by others


# ------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("config", [preset("tiny"), low_dim_config()], ids=["tiny", "tiny_l2_code_dim8"])
def test_onnx_graphs_equal_pytorch(config, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vqgan.onnx_export import export_onnx

    tok = VQTokenizer.from_model(random_model(config, seed=4))
    encoder_path, decoder_path = export_onnx(tok, tmp_path, (32, 40))
    x = images(3, size=40)[:, :, :32]  # (3, 3, 32, 40); batch 3 differs from the traced batch 2
    ids = tok.encode(x)
    assert ids.unique().numel() > 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    encoder = ort.InferenceSession(str(encoder_path), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
    onnx_ids = encoder.run(None, {"images": x.numpy()})[0]
    assert onnx_ids.dtype.name == "int64" and (onnx_ids == ids.numpy()).all()
    onnx_images = decoder.run(None, {"ids": ids.numpy()})[0]
    assert onnx_images.shape == (3, 3, 32, 40)
    assert abs(onnx_images - tok.decode(ids).numpy()).max() <= 1e-4


# ------------------------------------------------------------------------------ reconstruct tool


def test_reconstruct_tool_writes_side_by_side_pngs_and_psnr(saved, tmp_path):
    gen = torch.Generator().manual_seed(0)
    for name, (h, w) in (("a.png", (32, 32)), ("b.png", (38, 45))):  # b is center-cropped to 36x44
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)
        Image.fromarray(pixels.numpy()).save(tmp_path / name)
    out = tmp_path / "recon"
    result = run(["-m", "vqgan.cli.reconstruct", str(saved), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                  "--out", str(out), "--device", "cpu", "--check-bf16"])
    assert result.returncode == 0, result.stderr
    assert "PSNR" in result.stdout and "ids differ" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    sizes = [row["size"] for row in metrics["images"]]
    assert sizes == [[32, 32], [36, 44]]
    crops = [(0, 0), (1, 0)]  # (top, left) of the center crop: 38x45 -> 36x44
    for name, row, (h, w), (top, left) in zip(("a.png", "b.png"), metrics["images"], sizes, crops):
        with Image.open(out / row["output"]) as png:
            assert png.size == (2 * w + 4, h)  # original | gap | reconstruction
            side = torch.from_numpy(np.asarray(png.convert("RGB")).copy()).double() / 255
        with Image.open(tmp_path / name) as src:
            source = torch.from_numpy(np.asarray(src).copy()).double() / 255
        assert torch.equal(side[:, :w], source[top : top + h, left : left + w])
        mse = (side[:, w + 4 :] - side[:, :w]).square().mean().item()
        assert abs(10 * np.log10(1 / mse) - row["psnr"]) < 0.05  # PNG rounding moves it a little
        assert row["tokens"] == (h // 4) * (w // 4) and 0 < row["psnr"] < 60
        assert 0.0 <= row["bf16"]["id_mismatch"] <= 1.0
    assert 0.0 <= metrics["bf16"]["id_mismatch"] <= 1.0 and metrics["bf16"]["max_abs_diff"] >= 0.0
    assert "| 001_b.png | 36x44 | 99 |" in (out / "metrics.md").read_text()


def test_reconstruct_tool_names_a_corrupt_file(saved, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = [str(saved), str(tmp_path / "good.png"), str(tmp_path / "broken.png"), "--out", str(tmp_path / "o")]
    assert tool("reconstruct").main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "good.png" not in err
    assert not (tmp_path / "o").exists()  # every input is read before anything is written


def test_names_moved_out_of_vqgan_export_warn_with_their_removal_version():
    import vqgan
    import vqgan.export as export
    from vqgan import folder_format, model_card, tokenizer

    major, minor = (int(part) for part in vqgan.__version__.split(".")[:2])
    assert export.REMOVAL_VERSION == f"{major}.{minor + 1}"  # the next minor release drops them
    with pytest.warns(DeprecationWarning, match=r"^vqgan\.export\.VQTokenizer is deprecated and will be removed in "
                                                r"vqgan 0\.2: import it from vqgan\.tokenizer instead$") as record:
        from vqgan.export import VQTokenizer as old
    assert old is tokenizer.VQTokenizer and len(record) == 1
    assert record[0].filename == __file__  # points at the import, not at vqgan/utils.py
    homes = {"vqgan.folder_format": folder_format, "vqgan.model_card": model_card, "vqgan.tokenizer": tokenizer}
    for name, home in export._MOVED.items():
        with pytest.warns(DeprecationWarning, match=rf"vqgan\.export\.{name} .* import it from {home}"):
            assert getattr(export, name) is getattr(homes[home], name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        export.not_a_name  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # export.py's own functions and vqgan.__all__ never warn
        assert vqgan.export_checkpoint is export.export_checkpoint and callable(export.load_checkpoint)
        assert vqgan.ExportError is folder_format.ExportError and vqgan.VQTokenizer is tokenizer.VQTokenizer
