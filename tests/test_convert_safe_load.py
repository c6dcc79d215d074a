"""The safe checkpoint reader: released pickles load as data, a pickle naming any other callable is refused
by name and never executed."""

from __future__ import annotations

import argparse
import os
import pickle
import pytest
import torch
from safetensors.torch import save_file

from convert_helpers import save_lightning_checkpoint
from vqgan.convert.safe_load import InertObject, UnsafeCheckpointError, read_state_dict_file, safe_torch_load


class _RunsShell:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_by_name_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _RunsShell(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt|os)\.system.*not on the allowlist"):
        safe_torch_load(path)
    assert not marker.exists()


def test_plain_pickle_with_eval_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"function (builtins\.)?eval, which is not on the allowlist"):
        read_state_dict_file(path)
    assert not marker.exists()


def test_unknown_class_is_refused_by_name(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"model": {}, "opt": torch.optim.SGD}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.optim\.sgd\.SGD"):
        safe_torch_load(path)


def test_lightning_checkpoint_with_callback_class_keys_loads_as_data(tmp_path):
    """pytorch_lightning 1.x keys `callbacks` by the callback class: it loads as an inert stand-in."""
    path = save_lightning_checkpoint({"w": torch.ones(2)}, tmp_path / "last.ckpt")
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    (key,) = loaded["callbacks"]
    assert key is InertObject  # the name resolved to the stand-in, not to any importable code
    assert loaded["global_step"] == 1234


def test_llamagen_style_checkpoint_with_namespace_loads(tmp_path):
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=16384, codebook_embed_dim=8, image_size=256)
    path = tmp_path / "0001.pt"
    torch.save({"model": {"w": torch.arange(3)}, "steps": 5, "args": args}, path)
    loaded = safe_torch_load(path)
    assert loaded["args"].codebook_embed_dim == 8 and torch.equal(loaded["model"]["w"], torch.arange(3))


def test_safetensors_and_missing_and_garbage_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    assert torch.equal(read_state_dict_file(path)["a"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnsafeCheckpointError, match="not a readable torch checkpoint"):
        safe_torch_load(junk)
