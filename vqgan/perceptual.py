"""LPIPS perceptual distance (Zhang et al. 2018, https://arxiv.org/abs/1801.03924) with a VGG16 trunk.

The linear heads ship inside the `lpips` package (lpips/weights/v0.1/vgg.pth). The VGG16 trunk is
torchvision's ImageNet checkpoint, found in this order: an explicit path (argument or
$VQGAN_VGG16_WEIGHTS), torch hub's cache, a download into that cache. Missing weights are an error,
never a silent fallback to a random trunk; a random trunk exists only as an explicit test option.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

logger = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
WEIGHTS_ENV = "VQGAN_VGG16_WEIGHTS"
OFFLINE_ENV = "VQGAN_OFFLINE"  # "1" skips the download attempt (air-gapped clusters, tests)
_HEADS_FILE = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
_NUM_VGG16_CONVS = 13


class MissingWeightsError(FileNotFoundError):
    """The VGG16 (or LPIPS head) weights could not be found or fetched."""


def hub_cache_path() -> Path:
    """Where torchvision caches the VGG16 checkpoint: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _missing_message(looked: list[str]) -> str:
    places = "\n".join(f"  - {place}" for place in looked)
    return (
        f"VGG16 weights for LPIPS ({VGG16_FILENAME}) not found. Looked in:\n{places}\n"
        f"To provide them, download {VGG16_URL} and either put it at {hub_cache_path()} "
        f"(torch hub's cache; set TORCH_HOME to move it) or point ${WEIGHTS_ENV} (or the "
        f"`weights_path` argument) at the file. To train without the perceptual term, set its weight to 0."
    )


def resolve_vgg16_weights(path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Path of the VGG16 checkpoint: explicit path, then hub cache, then a download into the cache."""
    explicit = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if explicit is not None:
        # NOTE: a wrong explicit path is an error rather than a reason to look elsewhere:
        # the user asked for that file.
        explicit = Path(explicit).expanduser()
        if explicit.is_file():
            return explicit
        source = "weights_path argument" if path is not None else f"${WEIGHTS_ENV}"
        raise MissingWeightsError(_missing_message([f"{explicit} (from {source}): no such file"]))

    cached = hub_cache_path()
    looked = [f"${WEIGHTS_ENV}: not set", f"{cached} (torch hub cache): no such file"]
    if cached.is_file():
        return cached

    if not allow_download or os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        looked.append("download: skipped (offline)")
        raise MissingWeightsError(_missing_message(looked))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # hash_prefix checks the sha256 that torchvision encodes in the file name
        torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix="397923af", progress=False)
    except Exception as error:  # no network, proxy, hash mismatch, read-only cache: all mean "missing"
        looked.append(f"download from {VGG16_URL}: failed ({type(error).__name__}: {error})")
        raise MissingWeightsError(_missing_message(looked)) from error
    return cached


def lpips_available(path: str | os.PathLike | None = None, allow_download: bool = True) -> bool:
    """True when LPIPS can be built with real weights (may download VGG16 into the hub cache)."""
    if not _HEADS_FILE.is_file():
        return False
    try:
        resolve_vgg16_weights(path, allow_download=allow_download)
    except MissingWeightsError:
        return False
    return True


def load_vgg16_features(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy torchvision's `features.{i}.*` convs into lpips' sliced vgg16 (`slice{k}.{i}.*`), strictly."""
    # lpips keeps torchvision's layer index i as the child name inside each slice
    renamed: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for slice_name, block in net.named_children():
        for index, layer in block.named_children():
            if not isinstance(layer, nn.Conv2d):
                continue
            for param in ("weight", "bias"):
                source = f"features.{index}.{param}"
                if source not in state_dict:
                    raise ValueError(f"VGG16 checkpoint lacks {source!r}; is it torchvision's vgg16 (not vgg16_bn)?")
                renamed[f"{slice_name}.{index}.{param}"] = state_dict[source]
                used.add(source)
    unused = sorted(k for k in state_dict if k.startswith("features.") and k not in used)
    if unused or len(used) != 2 * _NUM_VGG16_CONVS:
        raise ValueError(
            f"VGG16 checkpoint does not match torchvision's vgg16 features: expected {_NUM_VGG16_CONVS} convs, "
            f"mapped {len(used) // 2}; unused feature keys {unused[:4]}"
        )
    net.load_state_dict(renamed, strict=True)  # raises on any missing key or shape mismatch


def _load_heads(model: lpips.LPIPS) -> None:
    """Load the calibrated linear heads strictly (lpips itself loads them with strict=False)."""
    if not _HEADS_FILE.is_file():
        raise MissingWeightsError(f"LPIPS linear heads not found at {_HEADS_FILE}; reinstall `lpips`")
    heads = torch.load(_HEADS_FILE, map_location="cpu", weights_only=True)
    # `lins.{k}` aliases `lin{k}` (same parameters), so the file holds only the `lin{k}` names
    expected = {k for k in model.state_dict() if re.match(r"lin\d+\.", k)}
    missing = sorted(expected - set(heads))
    if missing:
        raise ValueError(f"{_HEADS_FILE} lacks LPIPS head weights {missing}")
    model.load_state_dict({k: heads[k] for k in expected}, strict=False)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between (B, 3, H, W) images in [-1, 1] -> (B,) or its mean."""

    def __init__(self, weights_path: str | os.PathLike | None = None, random_backbone: bool = False,
                 allow_download: bool = True):
        super().__init__()
        if not random_backbone:
            # resolve first, so a missing file fails before the (slow) model build
            weights_path = resolve_vgg16_weights(weights_path, allow_download=allow_download)
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=`; pnet_rand=True keeps it offline
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        # NOTE: pretrained=False skips lpips' own non-strict head load; _load_heads does it strictly.
        _load_heads(model)
        if random_backbone:
            self.weights_source = "random backbone (tests only, not a perceptual metric)"
            logger.warning("LPIPS built with a RANDOM VGG16 backbone: distances are not perceptual")
        else:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
            load_vgg16_features(model.net, state_dict)
            self.weights_source = str(weights_path)
        self.model = model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: the heads carry dropout that must never be active in a loss."""
        return super().train(False)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if images.shape != targets.shape or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) tensors of the same shape, got "
                f"{tuple(images.shape)} and {tuple(targets.shape)}"
            )
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        distance = self.model(images, targets).flatten()  # (B,)
        return distance.mean() if reduction == "mean" else distance
