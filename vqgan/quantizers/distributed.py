"""The torch.distributed calls that keep every rank's codebook identical; each a no-op on one process."""

from __future__ import annotations

import torch
from torch import Tensor

from vqgan.utils import is_distributed


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all ranks in place when running distributed; a no-op otherwise."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(tensor: Tensor) -> Tensor:
    """Overwrite `tensor` with rank 0's in place when running distributed; a no-op otherwise."""
    if is_distributed():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


def is_rank0() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def all_gather_rows(x: Tensor) -> Tensor:
    """(n_rank, d) on every rank -> (sum of n_rank, d) on every rank; ranks may hold different n."""
    if not is_distributed():
        return x
    world = torch.distributed.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros(longest, x.shape[1])  # all_gather needs equal shapes
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])
