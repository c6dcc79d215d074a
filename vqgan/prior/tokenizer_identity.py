"""Which tokenizer made a set of tokens, and the check that the tokenizer decoding them is that one.

Token ids mean something only to the tokenizer that produced them: a tokenizer run extended after its
tokens were written rewrites `run_dir/tokenizer` with other weights but the same K, and a prior trained on
the old tokens would then be decoded by the new tokenizer, silently. So the identity is resolved once,
before any image is encoded (`resolve_tokenizer`: a Hub repo id is downloaded first and pinned to the
commit it resolved to, a folder is made absolute), recorded with the tokens and the prior, and every
decoder (prior training's samples, `vqgan-sample`, the `prior:` FID source) compares it with the
fingerprint of the files it actually loads (`load_matching_tokenizer`).

The fingerprint is a content hash of config.json and the weights' tensors, so the same weights pulled
from the Hub, copied or saved again elsewhere match. Token sets written before it recorded the hash of the
files' bytes (which a re-save changes); a decoder whose files have that hash matches them too.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vqgan.errors import DataError
from vqgan.folder_format import CONFIG_NAME, WEIGHTS_NAME, resolve_folder

# The metadata keys a token dataset (tokenizer.json) and a prior (config.json) record the identity under.
NAME_KEY, REVISION_KEY, HASH_KEY = "tokenizer", "tokenizer_revision", "tokenizer_hash"


class TokenizerMismatchError(DataError):
    """Tokens decoded (or a prior trained) with a tokenizer other than the one that made them."""


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 (first 16 hex digits) of the tokenizer folder's config.json and weights: its identity.

    The weights count by their tensors (names, dtypes, shapes, bytes), not by the file's bytes: safetensors
    writes its metadata entries in an unstable order, so the same weights saved twice differ as files.
    """
    folder = Path(folder)
    digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
    with open(folder / WEIGHTS_NAME, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: handle.read(1 << 20), b""):  # the tensors' bytes, in the header's offsets
            digest.update(block)
    return digest.hexdigest()[:16]


def file_fingerprint(folder: str | Path) -> str:
    """The fingerprint token datasets recorded before tokenizer_fingerprint: sha256 of the two files' bytes."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TokenizerIdentity:
    """A tokenizer as recorded beside its tokens: where it came from and what its files hash to."""

    name: str  # a Hub repo id, or the folder's absolute path
    revision: str | None  # the Hub commit the files came from; None for a local folder
    hash: str  # tokenizer_fingerprint of the files
    file_hash: str = ""  # file_fingerprint: what token sets written before tokenizer_fingerprint recorded

    def metadata(self) -> dict[str, Any]:
        return {NAME_KEY: self.name, REVISION_KEY: self.revision, HASH_KEY: self.hash}

    def describe(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.name}{at} (hash {self.hash})"


def _hub_commit(folder: Path) -> str | None:
    """The commit of a huggingface_hub snapshot folder (.../snapshots/COMMIT), else None."""
    return folder.name if folder.parent.name == "snapshots" else None


def resolve_tokenizer(name_or_path: str | Path, **hub_kwargs: Any) -> tuple[Path, TokenizerIdentity]:
    """A tokenizer folder or Hub repo id -> (local folder holding its files, its identity).

    Resolved once: load the tokenizer from the returned folder, so the hashed files are the loaded ones.
    `hub_kwargs` are VQTokenizer.from_pretrained's (revision, cache_dir, local_files_only, token).
    """
    local = Path(name_or_path).expanduser()
    folder = resolve_folder(name_or_path, **hub_kwargs)
    if local.is_dir():
        name, revision = str(local.resolve()), None
    else:
        name, revision = str(name_or_path), _hub_commit(folder)
    return folder, TokenizerIdentity(name, revision, tokenizer_fingerprint(folder), file_fingerprint(folder))


def tokenizer_record(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The identity entries of a token dataset's metadata, as a prior trained on it records them."""
    return {key: metadata[key] for key in (NAME_KEY, REVISION_KEY, HASH_KEY) if metadata.get(key) is not None}


def recorded_identity(metadata: Mapping[str, Any]) -> TokenizerIdentity | None:
    """The identity a token dataset or prior recorded, or None when it records no hash (older priors)."""
    if not metadata.get(HASH_KEY):
        return None
    name = str(metadata.get(NAME_KEY) or "an unrecorded tokenizer")
    return TokenizerIdentity(name, metadata.get(REVISION_KEY) or None, str(metadata[HASH_KEY]))


def check_same_tokenizer(recorded: Mapping[str, Any], what: str, decoder: TokenizerIdentity, *,
                         allow_mismatch: bool, override: str) -> None:
    """Raise TokenizerMismatchError when `decoder` is not the tokenizer that `recorded` (metadata) names.

    `what` names the tokens' holder ("token dataset runs/x/tokens"); `override` the flag or config key that
    accepts a mismatch, which then only warns. Metadata without a hash (priors saved by hand or before
    they recorded it) cannot be checked: a warning says so.
    """
    made_by = recorded_identity(recorded)
    if made_by is None:
        warnings.warn(f"{what} records no {HASH_KEY}: cannot check that tokenizer {decoder.describe()} is the "
                      "one that made its tokens", stacklevel=2)
        return
    if made_by.hash in (decoder.hash, decoder.file_hash):  # the file hash: token sets of older versions
        return
    problem = (f"{what} holds tokens of tokenizer {made_by.describe()}, but the tokenizer given to decode them is "
               f"{decoder.describe()}: its ids mean other images")
    if allow_mismatch:
        warnings.warn(f"{problem}; going on because {override} is set", stacklevel=2)
        return
    raise TokenizerMismatchError(f"{problem}; re-tokenize with this tokenizer, point at the tokenizer that made the "
                                 f"tokens, or set {override} to decode anyway")


def load_matching_tokenizer(name_or_path: str | Path | None, recorded: Mapping[str, Any], what: str, *,
                            allow_mismatch: bool, override: str, device: Any = "cpu", **hub_kwargs: Any):
    """The VQTokenizer that decodes `recorded`'s tokens, checked against it (check_same_tokenizer).

    `name_or_path` None: the tokenizer `recorded` names, at the Hub revision it recorded.
    """
    from vqgan.tokenizer import VQTokenizer

    if name_or_path is None:
        name_or_path = recorded.get(NAME_KEY)
        if not name_or_path:
            raise ValueError(f"{what} does not record its tokenizer: name the tokenizer that decodes it")
        hub_kwargs = {"revision": recorded.get(REVISION_KEY) or None, **hub_kwargs}
    folder, identity = resolve_tokenizer(name_or_path, **hub_kwargs)
    check_same_tokenizer(recorded, what, identity, allow_mismatch=allow_mismatch, override=override)
    return VQTokenizer.from_pretrained(folder, device=device)
