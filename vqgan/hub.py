"""The Hugging Face Hub as a place for tokenizer and prior folders: push one, pull one by repo id.

A thin layer on `HfApi.create_repo` + `HfApi.upload_folder` and `snapshot_download` (huggingface_hub's own
mixins, `PyTorchModelHubMixin`, pickle-free too, would write their own config.json and card; ours carry a
format version and the training summary, so we keep the folder format and only move it). Only the named
files travel, either way: a repo holding a stray pickle never gets it onto the user's disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


class HubError(ValueError):
    """A repo that cannot be fetched or pushed as asked."""


def is_repo_id(text: str) -> bool:
    """'owner/name' or 'name' (not a path: no leading '.', '/', '~', at most one '/')."""
    return bool(text) and not text.startswith((".", "/", "~")) and text.count("/") <= 1


def download_folder(
    repo_id: str,
    files: Sequence[str],
    *,
    what: str = "model",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The snapshot folder of `repo_id` at `revision` holding only `files` (from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, allow_patterns=list(files))
    except Exception as err:  # offline, unknown repo, unknown revision, bad id: all mean the same to the caller
        at = f" at revision {revision!r}" if revision else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{what} {repo_id!r}{at} is not a local folder and could not be fetched from the Hub "
                       f"({type(err).__name__}: {reason}); check the path, or the repo id and revision, "
                       "or go online (HF_HUB_OFFLINE=1 only finds repos already in the cache)") from None
    return Path(folder)


def push_folder(
    write: Callable[[Path], None],
    repo_id: str,
    files: Sequence[str],
    *,
    commit_message: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> Any:
    """Call `write(tmp_dir)`, then create `repo_id` (if new) and upload exactly `files` of tmp_dir in one commit.

    `api` is an `HfApi` (default: a new one; tests pass a fake). Returns upload_folder's CommitInfo.
    """
    if not is_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (expected 'owner/name')")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="vqgan-push-") as tmp:
        folder = Path(tmp)
        write(folder)
        present = [name for name in files if (folder / name).is_file()]
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, token=token, allow_patterns=present)
