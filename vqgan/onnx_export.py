"""ONNX graphs of a VQTokenizer: `encoder.onnx` (images [0, 1] -> ids) and `decoder.onnx` (ids -> images).

The graphs have a fixed image size and a dynamic batch axis. The training quantizer's chunked search
writes into preallocated buffers (`out=`), which does not trace; here each kind's `export_search` is
used: for vq / simvq the plain form ||e||^2 - 2 z.e over all K codes followed by ArgMin (ibq: ArgMax
of z.e), exact and small enough to export; fsq and lfq compute the index arithmetically, so no
K-sized tensor is in their graphs. A learned codebook is traced into constants.

Uses the TorchScript exporter (`dynamo=False`): the torch.export-based default needs `onnxscript`,
which the project does not depend on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from vqgan.folder_format import ONNX_FILES
from vqgan.tokenizer import VQTokenizer
from vqgan.utils import images_from_model_range, images_to_model_range

OPSET = 17


class EncodeToIds(nn.Module):
    """(B, 3, H, W) float in [0, 1] -> (B, H/f, W/f) int64 ids, as VQTokenizer.encode."""

    def __init__(self, tokenizer: VQTokenizer):
        super().__init__()
        model = tokenizer.model
        self.encoder, self.quant_conv, self.quantizer = model.encoder, model.quant_conv, model.quantizer

    def forward(self, images: Tensor) -> Tensor:
        z = self.quant_conv(self.encoder(images_to_model_range(images)))  # (B, D, h, w)
        if hasattr(self.quantizer, "export_lookup"):  # msvq: (B, Σ s²) ids, scale by scale
            return self.quantizer.export_lookup(z)
        b, _, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")  # (N, D)
        # the kind's own search: argmin over K codes (vq, simvq), argmax z.e (ibq), arithmetic (fsq, lfq)
        rows = self.quantizer.prepare_rows(self.quantizer.to_lookup_space(flat))  # (N, c) fp32
        ids = self.quantizer.export_search(rows)  # (N,)
        return rearrange(ids, "(b h w) -> b h w", b=b, h=h, w=w)


class IdsToImages(nn.Module):
    """(B, h, w) int64 ids -> (B, 3, h*f, w*f) float images in [0, 1], as VQTokenizer.decode."""

    def __init__(self, tokenizer: VQTokenizer):
        super().__init__()
        model = tokenizer.model
        self.model = model  # post_quant_conv, decoder and to_images are used as they are
        self.quantizer = model.quantizer

    def forward(self, ids: Tensor) -> Tensor:
        if hasattr(self.quantizer, "export_codes"):  # msvq: (B, Σ s²) ids -> f̂
            return images_from_model_range(self.model.to_images(self.model.decode_latent(
                self.quantizer.export_codes(ids))).float())
        b, h, w = ids.shape
        codes = self.quantizer.codes_for(ids.reshape(-1))  # (N, c)
        if self.quantizer.project_out is not None:
            codes = self.quantizer.project_out(codes)  # (N, D)
        z_q = rearrange(codes, "(b h w) d -> b d h w", b=b, h=h, w=w)  # (B, D, h, w)
        images = self.model.to_images(self.model.decode_latent(z_q))  # (B, 3, H, W) in [-1, 1]
        return images_from_model_range(images.float())


def export_onnx(tokenizer: VQTokenizer, folder: str | Path, image_size: tuple[int, int]) -> list[Path]:
    """Write encoder.onnx and decoder.onnx for images of `image_size` (H, W) into `folder`."""
    folder = Path(folder)
    height, width = image_size
    grid = tokenizer.grid_shape(height, width)  # validates divisibility
    images = torch.rand(2, tokenizer.config.autoencoder.in_channels, height, width, device=tokenizer.device)
    if tokenizer.config.quantizer.kind == "msvq":  # one sequence of Σ s² ids an image
        grid = (tokenizer.tokens_per_image(height, width),)
    ids = torch.randint(0, tokenizer.num_codes, (2, *grid), device=tokenizer.device)
    graphs = [
        (EncodeToIds(tokenizer), images, "images", "ids", folder / ONNX_FILES[0]),
        (IdsToImages(tokenizer), ids, "ids", "images", folder / ONNX_FILES[1]),
    ]
    written = []
    for module, example, input_name, output_name, path in graphs:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter warns that it is deprecated (it is the one that needs no onnxscript),
            # that the fixed-size attention unpacking is traced as constants (intended: the size is fixed)
            # and about Slice constant folding; tests compare the graphs' outputs with PyTorch instead.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            torch.onnx.export(
                module.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            )
        written.append(path)
    return written
