"""TrainState: the counters a training run keeps in each checkpoint (`train_state.json`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Mutable counters of one run; saved as JSON with every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps done
    batches_seen: int = 0  # micro-batches drawn per process: the data position (epoch, offset) of a resume
    images_seen: int = 0  # images that reached a completed step, over all processes
    nonfinite_steps: int = 0  # windows discarded because a loss was NaN/inf on some process
    nonfinite_in_row: int = 0  # consecutive such windows (the run stops at train.max_nonfinite_in_row)
    empty_batches: int = 0  # windows discarded because some process drew only unreadable files
    overflow_steps: int = 0  # fp16 steps whose update was skipped (adaptive-weight overflow) and scale backed off
    adaptive_weight: float = 1.0  # last adaptive GAN weight: the fallback when fp16 gradients overflow
    skipped_files: list[str] = field(default_factory=list)  # unreadable files met, all processes
    # [epoch, batches drawn in it] of each process's endless stream (data.streaming), where a resume restarts it
    stream_positions: list[list[int]] = field(default_factory=list)
    # what those positions count in (processes, batch_size, workers, shuffle buffer, samples): a resume checks it
    stream_layout: dict[str, Any] = field(default_factory=dict)
    # what batches_seen counts in on a map-style loader (processes, batch_size, batches_per_epoch): a resume under
    # another layout converts the position through the samples drawn (vqgan.training.batches.convert_position)
    data_layout: dict[str, int] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)  # the latest held-out metrics

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # older checkpoints lack newer counters

    def load(self, data: dict[str, Any]) -> None:
        """Overwrite every field from a checkpoint's saved state, in place."""
        restored = TrainState.from_dict(data)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(restored, f.name))
