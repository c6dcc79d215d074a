"""Priors over tokenizer grids: Gated PixelCNN and a GPT-style transformer (autoregressive), MaskGIT (parallel), VAR (next-scale)."""

from vqgan.prior.data import check_token_dataset, load_token_dataset, save_token_dataset, token_dataset_tensors
from vqgan.prior.maskgit import MaskGITConfig, MaskGITPrior
from vqgan.prior.maskgit_sampling import maskgit_decode, sample_maskgit
from vqgan.prior.pixelcnn import PixelCNNConfig, PixelCNNPrior, nll_bits
from vqgan.prior.sampling import (
    SamplingConfig,
    check_null_class_trained,
    filter_logits,
    generator_from_config,
    sample_from_logits,
    sample_pixelcnn,
    sample_prior,
    sample_transformer,
)
from vqgan.prior.transformer import KVCache, TransformerConfig, TransformerPrior
from vqgan.prior.next_scale_input import NextScaleInput, ResidualPyramidInput
from vqgan.prior.var import VARConfig, VARPrior, next_scale_loss
from vqgan.prior.var_sampling import sample_var

__all__ = [
    "KVCache", "MaskGITConfig", "MaskGITPrior", "PixelCNNConfig", "PixelCNNPrior", "SamplingConfig", "TransformerConfig", "TransformerPrior",
    "VARConfig", "VARPrior", "NextScaleInput", "ResidualPyramidInput", "next_scale_loss", "sample_var",
    "check_null_class_trained", "check_token_dataset", "filter_logits", "generator_from_config",
    "load_token_dataset", "maskgit_decode", "nll_bits", "sample_from_logits", "sample_maskgit", "sample_pixelcnn", "sample_prior", "sample_transformer",
    "save_token_dataset", "token_dataset_tensors",
]
