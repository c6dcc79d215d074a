"""vqgan: adversarial VQGAN image tokenizers and the discrete priors that sample from them."""

__version__ = "0.1.0"
