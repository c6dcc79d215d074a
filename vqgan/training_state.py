"""Training-only state: the buffers a module holds that only training reads (usage counters, restart
candidates, EMA running sums, the k-means-done flag).

Each module declares its own in `training_state_names()` (names in that module); nothing here lists
names. Training checkpoints keep the whole state dict; tokenizer folders keep the rest
(`inference_state`), and a model loaded from a folder gets its training state from the module itself
(fresh as built, then `reset_training_state()` makes it consistent with the loaded weights).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn


def training_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of `module` that some submodule declares training-only (declared names it does not
    hold at present included, so that a file written under another setting is read the same way)."""
    keys = set()
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "training_state_names", None)
        if callable(declared):
            keys.update(f"{prefix}.{name}" if prefix else name for name in declared())
    return keys


def inference_state(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` without its training-only entries: what inference reads."""
    training = training_state_keys(module)
    return {key: value for key, value in module.state_dict().items() if key not in training}


def with_own_training_state(module: nn.Module, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`weights` (a folder's, of any version) with every training-only entry replaced by the module's own.

    Folders of earlier versions carry training state (step, restart_rows, ...); it is never read, so a
    folder loads the same whatever version wrote it.
    """
    training = training_state_keys(module)
    own = module.state_dict()
    state = {key: value for key, value in weights.items() if key not in training}
    state.update({key: own[key] for key in training if key in own})
    return state


def reset_training_state(module: nn.Module) -> None:
    """Let every submodule derive training state consistent with weights just loaded from a folder."""
    for sub in module.modules():
        reset = getattr(sub, "reset_training_state", None)
        if callable(reset):
            reset()
