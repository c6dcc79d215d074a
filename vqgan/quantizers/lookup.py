"""CodebookQuantizer: the forward of every kind that looks codes up in a codebook (vq, ibq, simvq),
assembled from the parts a kind chooses:

    codebook     where the codes come from      codebooks.py (learned, EMA, frozen x linear map)
    search       which code a row takes         search.py (nearest, largest inner product)
    estimator    the gradient and the losses    estimators.py (straight-through, rotation, IBQ softmax)
    init         the first training forward     maintenance.py (k-means, rank-0 sync)
    restart      dead-code restarts, or None    maintenance.py

One training forward: init (first call) or restart dead codes -> search -> estimator -> entropy
penalty -> usage counters -> codebook update (EMA) -> draw the next restart's candidates. Distances,
codes and losses are fp32 under autocast.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vqgan.quantizers.base import Quantizer, QuantizerOutput
from vqgan.quantizers.codebooks import Codebook, masked_write
from vqgan.quantizers.config import KindConfig
from vqgan.quantizers.entropy import entropy_penalty, histogram, perplexity
from vqgan.quantizers.estimators import EstimatorOutput
from vqgan.quantizers.maintenance import DeadCodeRestart
from vqgan.quantizers.search import EuclideanSearch, InnerProductSearch

Search = EuclideanSearch | InnerProductSearch
Estimator = Callable[[Tensor, Tensor, Tensor, Tensor], EstimatorOutput]
Init = Callable[[Quantizer, Tensor], None]


class CodebookQuantizer(Quantizer):
    """A codebook, a search, an estimator and the codebook's maintenance; see the module docstring."""

    def __init__(self, config: KindConfig, codebook: Codebook, initial_codes: Callable[[KindConfig], Tensor],
                 search: Search,
                 estimator: Estimator, init: Init, restart: DeadCodeRestart | None = None):
        super().__init__(config)
        self.codebook_store = codebook  # not `codebook`: that name is the (K, c) codes, as in every kind
        self.code_search = search
        self.estimator = estimator
        self.init = init
        self.restart = restart
        codebook.register(self, initial_codes(config))  # drawn after the projections' init, as always
        if restart is not None:
            restart.register(self, config.num_codes, config.lookup_dim)
        self.register_buffer("initialized", torch.tensor(False))  # k-means / rank sync done
        # The buffer above is what checkpoints keep; this mirror is what forward reads, so a training
        # step never waits on the device to learn whether initialisation is due (no host sync).
        self._initialized = False
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_flags())

    # -- training state ---------------------------------------------------------------------------

    def refresh_flags(self) -> None:
        """Re-read the Python mirror of `initialized` from the buffer (after a load or a restore)."""
        self._initialized = bool(self.initialized)

    def training_state_names(self) -> tuple[str, ...]:
        # restart_rows is declared with restarts off too: a file written with them on reads the same
        return (super().training_state_names() + self.codebook_store.training_state + DeadCodeRestart.training_state
                + ("initialized",))

    @torch.no_grad()
    def reset_training_state(self) -> None:
        """Loaded codes are trained codes: no k-means over them; the codebook's running sums follow them."""
        self.codebook_store.reset_training_state(self)
        self.initialized.fill_(True)
        self.refresh_flags()

    def param_lr_scales(self) -> dict[str, float]:
        return self.codebook_store.param_lr_scales()

    # -- lookup -----------------------------------------------------------------------------------

    @property
    def codebook(self) -> Tensor:
        """(K, c) effective code vectors used for lookup."""
        return self.codebook_store.codes(self)

    def codes_for(self, indices: Tensor) -> Tensor:
        codes = self.codebook
        # fp32 at least (bf16 / fp16 weights); a float64 model keeps float64, as its forward does, so that
        # decoding indices matches the forward exactly (the converter tests compare in float64)
        return F.embedding(indices, codes.to(torch.promote_types(codes.dtype, torch.float32)))

    def prepare_rows(self, h: Tensor) -> Tensor:
        return self.codebook_store.prepare_rows(h)

    def search(self, h: Tensor) -> Tensor:
        return self.code_search.indices(h, self.codebook.detach(), self.config.chunk_size)

    def export_search(self, h: Tensor) -> Tensor:
        return self.code_search.traceable_indices(h, self.codebook)

    # -- training forward -------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, D, H, W) or (N, D) -> QuantizerOutput; updates statistics only in training mode."""
        cfg = self.config
        flat = self._flatten_checked(z)  # (N, D)
        h = self.to_lookup_space(flat)  # (N, c) fp32
        zero = flat.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.prepare_rows(h)
            if self.training:
                finite = torch.isfinite(h.detach()).all(dim=1)  # (N,)
                h_stats = torch.where(finite.unsqueeze(1), h.detach(), 0.0)  # (N, c), non-finite rows zeroed
                self._maintain(h_stats)
            codes = self.codebook_store.training_codes(self) if self.training else self.codebook  # (K, c)
            indices = self.code_search.indices(h.detach(), codes.detach(), cfg.chunk_size)  # (N,)
            h_q = F.embedding(indices, codes)  # (N, c)
            out, codebook_loss, commitment_loss, loss = self.estimator(h, h_q, codes, indices)
            entropy_loss = zero
            if cfg.entropy_weight > 0:
                entropy_loss = entropy_penalty(h, codes, cfg.entropy_temperature, cfg.chunk_size,
                                               inner_product=self.code_search.inner_product)
                loss = loss + self._entropy_weight() * entropy_loss
            batch_perplexity = perplexity(histogram(indices, cfg.num_codes))
            if self.training:
                counts = self._count(indices, finite)
                self.codebook_store.update(self, h_stats, indices, counts)
                if self.restart is not None:
                    self.restart.draw(self, h_stats, h_q.detach(), finite)
            usage = self.window_usage()
        return self._output(z, out, indices, loss=loss, codebook_loss=codebook_loss,
                            commitment_loss=commitment_loss, entropy_loss=entropy_loss,
                            perplexity=batch_perplexity, usage=usage)

    @torch.no_grad()
    def _maintain(self, h: Tensor | None) -> None:
        """First training call: the init (k-means or rank-0 sync) on rows h (N, c). Later calls: restart dead
        codes (h is not read; msvq passes None then)."""
        if not self._initialized:
            self.init(self, h)
            self.initialized.fill_(True)
            self._initialized = True
        elif self.restart is not None:
            self.restart.restart(self)

    @torch.no_grad()
    def write_codes(self, rows: Tensor, vectors: Tensor, mask: Tensor | None = None) -> None:
        """Make the effective codes at `rows` equal `vectors` and reset their age.

        `mask` (m,) bool: only rows whose mask is set change (a fixed-shape masked write). A restart
        resets the age (last_used_step) but not last_seen: usage counts real assignments only.
        """
        self.codebook_store.write(self, rows, vectors, mask)
        masked_write(self.last_used_step, rows, self.step.expand(rows.shape[0]), mask)
