"""LlamaGen VQ and SEED-Voken IBQ -> vqgan, against fixtures made with their own code.

Neither project is on PyPI: tests/fixtures/upstream/make_upstream_fixtures.py built tiny models of theirs
(LlamaGen commit ce98ec4, SEED-Voken commit b9a17ea, recorded in each fixture), with weights from
`seeded_state` and codebooks seeded from encoder outputs, and stored their key layouts, an input and
their float64 outputs. Here the same weights are regenerated, written as the checkpoints those projects
write, converted with vqgan-convert, and compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert_helpers import max_abs_diff, save_lightning_checkpoint, seeded_state
from vqgan.cli.convert import main as convert_main
from vqgan.convert import load_source
from vqgan.tokenizer import VQTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"


def read_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / name), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def compare(tok: VQTokenizer, fixture: dict[str, torch.Tensor]) -> dict[str, float]:
    model = tok.model.double()
    images = fixture["images"]
    with torch.no_grad():
        z = model.encode_latent(images)
        indices = model.quantizer.lookup(z)
        recon = model.decode_latent(model.quantizer.indices_to_codes(indices))
        forward, _ = model(images)
    figures = {"z": max_abs_diff(z, fixture["z"]), "recon": max_abs_diff(recon, fixture["recon"]),
               "forward": max_abs_diff(forward, fixture["recon"])}
    assert torch.equal(indices, fixture["indices"].long()), "indices differ"
    assert all(value < 1e-10 for value in figures.values()), figures
    return figures


def llamagen_state(fixture, meta):
    shapes = json.loads(meta["shapes"])
    state = seeded_state(shapes, int(meta["seed"]))
    state["quantize.embedding.weight"] = fixture["codebook"]
    return state, shapes


def test_llamagen_pt_converts_exactly(tmp_path):
    fixture, meta = read_fixture("llamagen_tiny.safetensors")
    state, shapes = llamagen_state(fixture, meta)
    # a training checkpoint as LlamaGen's vq_train.py writes it (args is an argparse.Namespace)
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=64, codebook_embed_dim=4, codebook_l2_norm=True,
                              image_size=256, global_seed=0)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 10, "args": args},
               tmp_path / "0000010.pt")
    assert convert_main([str(tmp_path / "0000010.pt"), str(tmp_path / "out"), "--from", "llamagen"]) == 0
    tok = VQTokenizer.from_pretrained(tmp_path / "out")
    q, ae = tok.config.quantizer, tok.config.autoencoder
    assert (q.dim, q.code_dim, q.l2_normalize, ae.z_channels) == (4, None, True, 32)  # quant_conv 32 -> 4, no projection
    assert tok.model.quant_conv.weight.shape == (4, 32, 1, 1)
    converted = load_source("llamagen", tmp_path / "0000010.pt")
    assert converted.source["keys_mapped"] == len(shapes) - 1  # all but quantize.codebook_used
    assert converted.source["keys_dropped"] == 1
    compare(tok, fixture)
    with torch.no_grad():  # LlamaGen's decode_code(indices) too
        decoded = tok.model.decode_latent(tok.model.quantizer.indices_to_codes(fixture["indices"].long()))
    assert max_abs_diff(decoded, fixture["decode_code"]) < 1e-10


def test_llamagen_ema_and_hub_folder(tmp_path):
    fixture, meta = read_fixture("llamagen_tiny.safetensors")
    state, _ = llamagen_state(fixture, meta)
    junk = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({"model": junk, "ema": state}, tmp_path / "ema.pt")  # the EMA weights are the ones that match
    assert load_source("llamagen", tmp_path / "ema.pt").source["weights"] == "EMA"
    convert_main([str(tmp_path / "ema.pt"), str(tmp_path / "out"), "--from", "llamagen"])
    compare(VQTokenizer.from_pretrained(tmp_path / "out"), fixture)
    # PyTorchModelHubMixin folder: model.safetensors + config.json
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"codebook_size": 64, "codebook_embed_dim": 4, "codebook_l2_norm": True}))
    convert_main([str(hub), str(tmp_path / "out_hub"), "--from", "llamagen"])
    compare(VQTokenizer.from_pretrained(tmp_path / "out_hub"), fixture)


def ibq_checkpoint(tmp_path: Path, with_ema: bool = True) -> tuple[Path, dict, dict]:
    fixture, meta = read_fixture("ibq_tiny.safetensors")
    shapes, ema_shapes = json.loads(meta["shapes"]), json.loads(meta["ema_shapes"])
    raw = seeded_state(shapes, int(meta["seed"]))
    shift = seeded_state(ema_shapes, int(meta["ema_seed"]))
    # LitEma: one buffer per parameter, named without dots, plus decay / num_updates
    ema = {"model_ema." + flat: raw[name] + float(meta["ema_shift"]) * shift[flat]
           for name in shapes for flat in [name.replace(".", "")] if flat in ema_shapes}
    ema["model_ema.quantizeembeddingweight"] = fixture["codebook"]
    ema["model_ema.decay"] = torch.tensor(0.999)
    ema["model_ema.num_updates"] = torch.tensor(-1, dtype=torch.int32)
    ema["model_ema.lossdiscriminatormain0weight"] = torch.zeros(8, 3, 4, 4)  # LitEma covers loss.* too
    loss = {"loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4), "loss.logvar": torch.zeros(())}
    state = {**raw, **loss, **(ema if with_ema else {})}
    return save_lightning_checkpoint(state, tmp_path / "ibq.ckpt"), fixture, meta


def test_ibq_with_ema_converts_exactly(tmp_path):
    ckpt, fixture, meta = ibq_checkpoint(tmp_path)
    assert convert_main([str(ckpt), str(tmp_path / "out"), "--from", "ibq"]) == 0
    tok = VQTokenizer.from_pretrained(tmp_path / "out")
    assert tok.config.quantizer.kind == "ibq" and tok.num_codes == int(meta["n_embed"])
    converted = load_source("ibq", ckpt)
    assert converted.source["weights"] == "EMA"
    assert converted.source["keys_mapped"] == len(json.loads(meta["shapes"]))
    compare(tok, fixture)


def test_ibq_raw_weights_are_not_the_ema(tmp_path):
    ckpt, fixture, _ = ibq_checkpoint(tmp_path)
    raw = load_source("ibq", ckpt, ema=False)
    assert raw.source["weights"] == "raw"
    ema = load_source("ibq", ckpt)
    assert not torch.equal(raw.state["encoder.conv_in.weight"], ema.state["encoder.conv_in.weight"])
    (tmp_path / "no_ema").mkdir()
    ckpt_no_ema, _, _ = ibq_checkpoint(tmp_path / "no_ema", with_ema=False)
    assert load_source("ibq", ckpt_no_ema).source["weights"] == "raw"
    with pytest.raises(ValueError, match="lack model_ema"):
        load_source("ibq", ckpt_no_ema, ema=True)


def test_command_line_converts_and_refuses_an_unsafe_pickle(tmp_path):
    """`python -m vqgan.cli.convert` (= vqgan-convert) as a user runs it, in a fresh process."""
    import os
    import subprocess
    import sys

    fixture, meta = read_fixture("llamagen_tiny.safetensors")
    state, _ = llamagen_state(fixture, meta)
    torch.save({"model": state}, tmp_path / "vq.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "vqgan.cli.convert", str(tmp_path / "vq.pt"), str(tmp_path / "out"),
                           "--from", "llamagen"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "155 tensors mapped one to one" in done.stdout
    compare(VQTokenizer.from_pretrained(tmp_path / "out"), fixture)

    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": state, "args": Shell()}, tmp_path / "evil.pt")
    done = subprocess.run([sys.executable, "-m", "vqgan.cli.convert", str(tmp_path / "evil.pt"), str(tmp_path / "o2"),
                           "--from", "llamagen"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "error: refusing to load" in done.stderr and "system" in done.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o2").exists()
