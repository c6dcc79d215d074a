"""Exact nearest-code search, chunked so that no (N, K) matrix exists, and the two similarities a
codebook kind searches by: Euclidean distance (vq, simvq) and inner product (ibq's argmax of logits).

A similarity gives the indices (fast, exact) and the same indices in a form the ONNX tracer takes;
`inner_product` tells the entropy penalty which logits to take the softmax of.
"""

from __future__ import annotations

import torch
from torch import Tensor

# On CPU a (rows, K) fp32 distance buffer of ~4 MB per thread and per 16 code dims stays in cache;
# at small d the argmin's pass over it costs more than the matmul, so a cache-sized chunk runs ~2x
# faster at d=8, K=16384 (1 thread: 170 ms vs 363 ms with 4096 rows), while large d keeps big,
# gemm-friendly chunks.
_CPU_CHUNK_ELEMENTS = 2**20
_CPU_MIN_ROWS = 16


def squared_distances(z: Tensor, codes: Tensor) -> Tensor:
    """(n, d), (K, d) -> (n, K) squared Euclidean distances ||z||^2 - 2 z.e + ||e||^2, differentiable."""
    z_sq = z.square().sum(dim=1, keepdim=True)  # (n, 1)
    codes_sq = codes.square().sum(dim=1)  # (K,)
    return torch.addmm(codes_sq, z, codes.t(), alpha=-2.0) + z_sq  # (n, K)


def chunk_rows(n: int, num_codes: int, dim: int, chunk_size: int, device: torch.device) -> int:
    """Rows of the distance matrix per chunk: chunk_size, capped on CPU to a cache-sized buffer."""
    rows = min(chunk_size, n)
    if device.type == "cpu":
        budget = _CPU_CHUNK_ELEMENTS * max(1, dim // 16) * torch.get_num_threads()
        rows = min(rows, max(_CPU_MIN_ROWS, budget // num_codes))
    return max(1, rows)


@torch.no_grad()
def nearest_code(z: Tensor, codes: Tensor, chunk_size: int, inner_product: bool = False) -> Tensor:
    """(N, d), (K, d) -> (N,) long: index of the nearest code, exact, computed in fp32 chunks of rows.

    inner_product: the code of largest z.e instead (IBQ's argmax of logits).

    The distance matrix never exists as a whole: each chunk of at most `chunk_size` rows (see
    `chunk_rows`) gets one fused addmm into a reused (rows, K) buffer, then its argmin, so extra
    memory is O(chunk_size * K) and at small d the buffer stays in cache. ||z||^2 is the same for
    every code of a row, so it cannot move the argmin and is left out (one pass over the buffer
    saved); ||e||^2 is computed once per call.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        codes = codes.float()
        codes_sq = codes.new_zeros(codes.shape[0]) if inner_product else codes.square().sum(dim=1)  # (K,)
        codes_t = codes.t()  # (d, K)
        n = z.shape[0]
        out = torch.empty(n, dtype=torch.long, device=z.device)
        rows = chunk_rows(n, codes.shape[0], codes.shape[1], chunk_size, z.device)
        buffer = z.new_empty(rows, codes.shape[0])  # (rows, K), reused by every chunk
        for start in range(0, n, rows):
            chunk = z[start : start + rows]  # (r, d)
            dist = buffer[: chunk.shape[0]]
            torch.addmm(codes_sq, chunk, codes_t, alpha=-2.0, out=dist)  # (r, K) = ||e||^2 - 2 z.e
            torch.argmin(dist, dim=1, out=out[start : start + chunk.shape[0]])
        return out


class EuclideanSearch:
    """The nearest code by Euclidean distance (VQ-VAE)."""

    inner_product = False

    def indices(self, h: Tensor, codes: Tensor, chunk_size: int) -> Tensor:
        """(N, c), (K, c) -> (N,) long, exact, chunked, fp32."""
        return nearest_code(h, codes, chunk_size, inner_product=self.inner_product)

    def traceable_indices(self, h: Tensor, codes: Tensor) -> Tensor:
        """The same indices without out= buffers (the ONNX tracer refuses them)."""
        codes = codes.float()  # (K, c)
        # ||z||^2 is the same for every code of a row, so it cannot move the argmin (as nearest_code).
        return (codes.square().sum(dim=1) - 2.0 * (h @ codes.t())).argmin(dim=1)


class InnerProductSearch:
    """The code of largest z.e (IBQ's argmax of logits)."""

    inner_product = True

    def indices(self, h: Tensor, codes: Tensor, chunk_size: int) -> Tensor:
        """(N, c), (K, c) -> (N,) long, exact, chunked, fp32."""
        return nearest_code(h, codes, chunk_size, inner_product=self.inner_product)

    def traceable_indices(self, h: Tensor, codes: Tensor) -> Tensor:
        return (h @ codes.float().t()).argmax(dim=1)
