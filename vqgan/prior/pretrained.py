"""Prior folders by name: a local folder or a Hugging Face Hub repo id, pulled and pushed pickle-free.

The folder itself (config.json + model.safetensors) is vqgan/prior/io.py's; this adds the Hub and a card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from vqgan.prior.io import load_prior, prior_kind, save_prior

PRIOR_FILES = ("config.json", "model.safetensors", "README.md")


def from_pretrained(
    name_or_path: str | Path,
    *,
    device: str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A prior folder or Hub repo id -> (model in eval mode, its config.json contents)."""
    from vqgan.hub import download_folder, is_repo_id

    path = Path(name_or_path).expanduser()
    if path.exists() or isinstance(name_or_path, Path) or not is_repo_id(str(name_or_path)):
        return load_prior(path, device=device)
    folder = download_folder(str(name_or_path), PRIOR_FILES, what="prior", revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token)
    return load_prior(folder, device=device)


def prior_card(meta: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None) -> str:
    """README.md of a prior folder: kind, sizes, the tokenizer it pairs with, and its figures."""
    from vqgan.model_card import evaluation_section

    config = meta.get("config", {})
    lines = ["---", "library_name: vqgan", "tags: [image-generation, vqgan, autoregressive-prior]", "---", "",
             f"# vqgan {meta.get('kind', 'prior')} prior", "",
             f"- K = {config.get('num_codes')} codes, grid {config.get('grid', config.get('shape'))}, "
             f"classes: {config.get('num_classes', 0)}",
             f"- tokenizer: {meta.get('tokenizer') or 'not recorded'}", "",
             "```python", "from vqgan import load_prior, load_tokenizer", "",
             'prior, meta = load_prior("this/repo")  # or a local folder', "```"]
    lines += evaluation_section(evaluation, grid=False)
    return "\n".join(lines) + "\n"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    extra: Mapping[str, Any] | None = None,
    *,
    evaluation: Mapping[str, Any] | None = None,
    commit_message: str = "Upload vqgan prior",
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> Any:
    """Upload the prior's config.json, model.safetensors and a model card to `repo_id` in one commit.

    `extra`: more config.json entries (e.g. {"tokenizer": "owner/tokenizer-repo"}) as save_prior takes them.
    """
    from vqgan.hub import push_folder

    prior_kind(model)  # a clear error before any network call

    def write(folder: Path) -> None:
        save_prior(model, folder / "prior", dict(extra or {}))
        for name in ("config.json", "model.safetensors"):  # save_prior writes a folder of its own: flatten it
            (folder / "prior" / name).rename(folder / name)
        (folder / "prior").rmdir()
        meta = json.loads((folder / "config.json").read_text())
        (folder / "README.md").write_text(prior_card(meta, evaluation), encoding="utf-8")

    return push_folder(write, repo_id, PRIOR_FILES, commit_message=commit_message, private=private,
                       revision=revision, token=token, api=api)
