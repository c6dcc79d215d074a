"""The FID feature extractor: torch-fidelity's port of the TF-FID InceptionV3, loaded from a local weights file.

FID is only comparable across papers when the features come from the same network, the same weights
and the same resizing. We reuse torch-fidelity's `FeatureExtractorInceptionV3` unchanged (the network
torch-fidelity and torchmetrics use; its forward takes uint8 (B, 3, H, W), resizes to 299 with
TF1.x-exact bilinear interpolation and normalises as the TF graph did), so our features are theirs.
Heusel et al. 2017, https://arxiv.org/abs/1706.08500; https://github.com/toshas/torch-fidelity
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as _port
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this network
WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# torch.hub convention: the digits after the last '-' are the start of the file's sha256 (only used to warn).
WEIGHTS_SHA256_PREFIX = WEIGHTS_FILENAME.rsplit("-", 1)[-1].split(".")[0]
FEATURE_LAYERS = ("64", "192", "768", "2048")  # "2048" = pool3, the layer of FID
FEATURE_DIMS = {layer: int(layer) for layer in FEATURE_LAYERS}
LOGITS_LAYER = "logits_unbiased"  # the 1008 class logits the Inception Score reads (torch-fidelity's ISC layer)


@dataclass(frozen=True)
class ExtractorIdentity:
    """What makes two sets of features comparable: network, layer and the exact weights file."""

    name: str
    layer: str
    weights_sha256: str

    def describe(self) -> str:
        return f"{self.name} layer {self.layer}, weights sha256 {self.weights_sha256[:16]}..."


def default_weights_path() -> Path:
    """Where torch-fidelity's `load_state_dict_from_url` caches the weights: <torch hub dir>/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _missing_weights_message(path: Path, reason: str) -> str:
    return (
        f"InceptionV3 FID weights not found: {reason}.\n"
        f"Download {URL_INCEPTION_V3} (about 91 MB) on a machine with network access and either put it at\n"
        f"  {default_weights_path()}\n"
        f"(torch-fidelity's cache: $TORCH_HOME/hub/checkpoints) or pass --inception-weights PATH "
        f"(`weights_path=` in Python). Looked at: {path}"
    )


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch `url` to `dest` through a temporary file so that a failed download leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
            tmp.close()
            Path(tmp.name).replace(dest)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise


def resolve_weights_path(weights_path: str | Path | None = None, download: bool = True, timeout: float = 30.0) -> Path:
    """An explicit file, else torch-fidelity's cached file, else a download into that cache; never random weights."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path, f"{path} is not a file"))
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(_missing_weights_message(path, "not in the cache and downloading is off"))
    try:
        _download(URL_INCEPTION_V3, path, timeout)
    except OSError as err:  # URLError, timeouts and DNS failures are all OSErrors
        raise FileNotFoundError(_missing_weights_message(path, f"download failed ({err})")) from err
    return path  # InceptionFeatures warns if its sha256 is not the official file's


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a weights file from one read: the hash describes the very bytes loaded.

    weights_only=True so that a hostile file cannot run code (STYLE habit 8); the keys are checked too.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileNotFoundError(_missing_weights_message(path, f"cannot read it ({err})")) from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a PyTorch InceptionV3 state dict ({WEIGHTS_FILENAME}): {err}") from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{path} does not hold the TF-FID InceptionV3 state dict of torch-fidelity's port")
    return state, hashlib.sha256(data).hexdigest()


_PORT_LOCK = threading.Lock()


def port_with_state(features: list[str], state: dict[str, torch.Tensor], internal_dtype: str) -> FeatureExtractorInceptionV3:
    """torch-fidelity's network, unchanged, holding `state`; the port itself reads no file.

    NOTE: the port's constructor either unpickles a path with weights_only=False or downloads the file. We
    hand it the tensors already read safely through the one name it calls for the download, swapped for
    the constructor's duration (under a lock, since it is a module attribute), so nothing is read twice
    and no file can be swapped between our check and its load.
    """
    with _PORT_LOCK, mock.patch.object(_port, "load_state_dict_from_url", lambda *args, **kwargs: state):
        return FeatureExtractorInceptionV3(EXTRACTOR_NAME, features, feature_extractor_internal_dtype=internal_dtype)


def extractor_identity(weights_path: str | Path, layer: str = "2048") -> ExtractorIdentity:
    """The identity of features from `layer` with this weights file, without building the network."""
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"feature layer must be one of {FEATURE_LAYERS}, got {layer!r}")
    return ExtractorIdentity(EXTRACTOR_NAME, layer, sha256_file(Path(weights_path)))


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) in [0, 255] -> (B, D) float32 InceptionV3 features (D = 2048 for pool3)."""

    def __init__(self, weights_path: str | Path, layer: str = "2048", internal_dtype: str = "float32",
                 extra_layers: tuple[str, ...] = ()):
        super().__init__()
        path = Path(weights_path)
        if layer not in FEATURE_LAYERS:
            raise ValueError(f"feature layer must be one of {FEATURE_LAYERS}, got {layer!r}")
        unknown = [name for name in extra_layers if name not in (*FEATURE_LAYERS, LOGITS_LAYER)]
        if unknown:
            raise ValueError(f"unknown extra feature layers {unknown}; valid: {(*FEATURE_LAYERS, LOGITS_LAYER)}")
        state, sha256 = read_weights(path)  # the file's one read
        self.identity = ExtractorIdentity(EXTRACTOR_NAME, layer, sha256)
        if not sha256.startswith(WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{path} is not the official TF-FID InceptionV3 file (sha256 does not start with "
                f"{WEIGHTS_SHA256_PREFIX}); FIDs from it are not comparable with published numbers",
                stacklevel=2,
            )
        self.net = port_with_state([layer, *extra_layers], state, internal_dtype)
        self.layer = layer
        self.dim = FEATURE_DIMS[layer]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_layers(images)[0]  # (B, D)

    def forward_layers(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(features of `layer` (B, D), then one (B, D_i) per extra layer), from one forward pass."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (B, 3, H, W) in [0, 255], got {images.dtype} {tuple(images.shape)}"
            )
        return tuple(self.net(images))  # the port resizes to 299x299 itself


def load_inception(
    weights_path: str | Path | None = None,
    layer: str = "2048",
    device: str | torch.device = "cpu",
    download: bool = True,
) -> InceptionFeatures:
    """The TF-FID InceptionV3 in eval mode on `device`; weights from `weights_path` or torch-fidelity's cache."""
    path = resolve_weights_path(weights_path, download=download)
    return InceptionFeatures(path, layer).to(device).eval().requires_grad_(False)


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a random-valued state dict in the exact format of the real weights file. For tests and benchmarks.

    NOTE: FIDs computed with it mean nothing; it exists because neither tests nor benchmarks may download the
    real file. BatchNorm statistics are calibrated on random images so that activations keep a sane scale.
    """
    torch.manual_seed(seed)
    with mock.patch.object(_port, "load_state_dict_from_url", lambda *args, **kwargs: None), mock.patch.object(
        FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
    ):
        net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048"])
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
            module.momentum = None  # cumulative average: running stats become the calibration batch's stats
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
