"""Next-scale sampling: len(scales) steps, each drawing every token of one scale at once.

Step k runs the VAR prior over only scale k's s_k^2 positions, reading the keys and values of scales
< k from a KV cache (FoundationVision/VAR `autoregressive_infer_cfg`); its input comes from the
tokenizer's `NextScaleInput` and the ids drawn so far. Tokens are drawn by `sample_from_logits`
(temperature, top-k, top-p; one uniform per token from the caller's generator), so the cached path
and the uncached one (use_kv_cache=False: the whole prefix re-run each step) give identical tokens.

Classifier-free guidance ramps linearly over the scales, as VAR: scale k is guided with weight
w_k = 1 + (cfg_scale - 1) * k / (len(scales) - 1), so the coarsest scale is unguided and the finest
gets the full cfg_scale. Our cfg_scale is uncond + w * (cond - uncond) (1 = none); VAR's `cfg=c`
((1 + t) cond - t uncond, t = c * ratio) is cfg_scale = 1 + c.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from vqgan.prior.next_scale_input import NextScaleInput, check_inputs_fit, teacher_forcing_input
from vqgan.prior.sampling import check_guidance, check_sampling_settings, guided_logits, labels_tensor, sample_from_logits

if TYPE_CHECKING:
    from vqgan.prior.var import VARPrior


def guidance_weights(cfg_scale: float, num_scales: int) -> list[float]:
    """VAR's linear CFG ramp -> the weight of each scale, 1 at the coarsest and cfg_scale at the finest."""
    if num_scales == 1:
        return [float(cfg_scale)]
    return [1.0 + (cfg_scale - 1.0) * k / (num_scales - 1) for k in range(num_scales)]


@torch.inference_mode()
def sample_var(
    model: VARPrior,
    inputs: NextScaleInput,
    n: int,
    labels: int | Sequence[int] | Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Tensor:
    """n token pyramids -> (n, L) flat ids, scale after scale; labels None = the null class.

    A class-conditional prior trained without class dropout has no usable null class: labels None and
    cfg_scale != 1 are then refused (check_null_class_trained).
    """
    cfg = model.config
    check_inputs_fit(model, inputs)
    check_sampling_settings(temperature, top_k, top_p, cfg.num_codes)
    device = model.head.weight.device
    labels = labels_tensor(labels, n, cfg.num_classes, device)
    guided = check_guidance(cfg.num_classes, cfg.class_dropout, labels, cfg_scale, section="var")
    row_labels = labels  # None: the null class (an unconditional prior's only one)
    if guided:  # rows [0, n) conditional, rows [n, 2n) the null class; guidance implies labels
        row_labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)])
    rows = 2 * n if guided else n
    weights = guidance_weights(cfg_scale, len(cfg.scales))
    was_training = model.training
    model.eval()
    cond = model.condition(row_labels, rows)                                            # (R, D)
    cache = model.new_kv_cache(rows) if use_kv_cache else None
    ids: list[Tensor] = []                                                              # (n, s_k^2) each
    for k, (begin, end) in enumerate(model.bounds):
        if use_kv_cache:
            scale_input = None if k == 0 else inputs.next_scale_input(ids, k).repeat(rows // n, 1, 1)
            logits = model.forward_scale(k, scale_input, cond, cache)                    # (R, s_k^2, K)
        else:  # the whole prefix again: scales 0..k under the block-causal mask
            prefix = teacher_forcing_input(inputs, ids, upto=k + 1) if k else cond.new_zeros(n, 0, cfg.input_dim)
            logits = model(prefix.repeat(rows // n, 1, 1), row_labels)[:, begin:end]    # (R, s_k^2, K)
        if guided:  # weight 1 (the coarsest scale) is the conditional rows exactly, not uncond + (cond - uncond)
            logits = logits[:n] if weights[k] == 1.0 else guided_logits(logits, n, weights[k])  # (n, s_k^2, K)
        drawn = sample_from_logits(logits.flatten(0, 1), temperature, top_k, top_p, generator)
        ids.append(drawn.view(n, end - begin))
    model.train(was_training)
    return torch.cat(ids, dim=1)                                                        # (n, L)
