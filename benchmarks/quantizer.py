"""Benchmark the vector quantizer's forward+backward against a naive search and a bare matmul, and
every quantizer kind at K = 16384 (and LFQ at 2^18) against a no-grad matmul + argmin floor.

For N vectors and each (D, K) it times, forward+backward, (1) `VectorQuantizer` in training mode,
(2) the naive quantizer whose search is a (N, 1, D) - (1, K, D) broadcast, squared and summed, and
(3) a bare z @ e.T matmul with its backward, the floor any distance-matrix method pays. It prints a
markdown table and writes it, with the machine described, to benchmarks/results/quantizer.md.

    .venv/bin/python benchmarks/quantizer.py                  # CPU, float32, torch's thread count
    .venv/bin/python benchmarks/quantizer.py --threads 1 2    # one table per thread count
    .venv/bin/python benchmarks/quantizer.py --device cuda --dtype bfloat16

Peak extra memory is torch.cuda.max_memory_allocated on GPU. On CPU torch's allocator is not
tracked, so each method runs again in a child process with glibc's MALLOC_MMAP_THRESHOLD_=64 KiB
(every large buffer is its own mmap, returned on free, so resident memory follows live memory) and
the peak resident set size above the level before the call is read (reset through
/proc/self/clear_refs, read VmHWM). An analytic estimate of the dominant buffers sits beside it.

The second table ("every kind") times one training forward+backward of each kind on N vectors of
D = 256, beside the floor of a search over the same K codes in the kind's lookup width: one no-grad
z @ e.T and argmin, in blocks of up to 2^28 elements (what any nearest-code method must at least pay;
fsq and lfq have no such search, their floor is shown for scale). `--kinds-only` runs just that table.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import describe_machine, peak_extra_bytes, timed  # noqa: E402
from vqgan.quantizers import QuantizerConfig, VectorQuantizer, build_quantizer  # noqa: E402
from vqgan.quantizers.search import chunk_rows  # noqa: E402
from vqgan.utils import atomic_write_text  # noqa: E402

CASES = ((256, 1024), (256, 16384), (8, 16384))  # (D, K)
RESULTS = Path(__file__).resolve().parent / "results" / "quantizer.md"
KIND_DIM = 256  # D of the encoder output in the every-kind table
# (label, QuantizerConfig options): every kind at K = 16384, LFQ also at 2^18 (Open-MAGVIT2's size)
KIND_CASES = (
    ("vq", dict(kind="vq", num_codes=16384)),
    ("vq l2 code_dim 8", dict(kind="vq", num_codes=16384, code_dim=8, l2_normalize=True)),
    ("simvq", dict(kind="simvq", num_codes=16384)),
    ("ibq, no entropy, no restarts", dict(kind="ibq", num_codes=16384, dead_code_threshold=0)),
    ("ibq, entropy 0.05, no restarts", dict(kind="ibq", num_codes=16384, dead_code_threshold=0,
                                           entropy_weight=0.05, entropy_temperature=0.01)),
    ("fsq 2^14", dict(kind="fsq", num_codes=2**14)),
    ("fsq 2^14, entropy (exact)", dict(kind="fsq", num_codes=2**14, entropy_weight=0.1, entropy_temperature=0.1)),
    ("lfq 2^14, entropy (exact)", dict(kind="lfq", num_codes=2**14, entropy_weight=0.1, entropy_temperature=0.01)),
    ("lfq 2^18, entropy (groups of 9 bits: its recipe)", dict(kind="lfq", num_codes=2**18, entropy_weight=0.1,
                                                             entropy_temperature=0.01, entropy_group_bits=9)),
)


def best_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call, in seconds."""
    fn()
    return min(timed(fn, device) for _ in range(repeats))


def quantizer_step(z: torch.Tensor, grad: torch.Tensor, quantizer: VectorQuantizer) -> Callable[[], None]:
    def step() -> None:
        z.grad = None
        quantizer.zero_grad(set_to_none=True)
        out = quantizer(z)
        if out.loss.requires_grad:
            torch.autograd.backward([out.quantized, out.loss], [grad, None])
        else:  # fsq: no loss terms
            out.quantized.backward(grad)

    return step


def naive_step(z: torch.Tensor, grad: torch.Tensor, codes: torch.Tensor) -> Callable[[], None]:
    """The same quantizer with the textbook broadcast search: an (N, K, D) temporary."""

    def step() -> None:
        z.grad = None
        codes.grad = None
        with torch.no_grad():
            dist = (z.float()[:, None, :] - codes.float()[None, :, :]).square_().sum(-1)  # (N, K)
            indices = dist.argmin(dim=1)
        z_q = codes[indices]  # (N, D)
        loss = torch.nn.functional.mse_loss(z_q, z.detach()) + 0.25 * torch.nn.functional.mse_loss(z, z_q.detach())
        out = z + (z_q - z).detach()
        torch.autograd.backward([out, loss], [grad, None])

    return step


def matmul_step(z: torch.Tensor, codes: torch.Tensor, grad_nk: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        z.grad = None
        codes.grad = None
        (z @ codes.t()).backward(grad_nk)  # (N, K) forward, two matmuls backward

    return step


def fmt_mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MB"


def kind_config(index: int, args: argparse.Namespace) -> QuantizerConfig:
    return QuantizerConfig(dim=KIND_DIM, chunk_size=args.chunk_size, **KIND_CASES[index][1])


FLOOR_BLOCK = 2**28  # elements of one (rows, K) block of the floor: 1 GiB in fp32 (2^18 codes: 1024 rows)


def floor_step(z: torch.Tensor, codes: torch.Tensor) -> Callable[[], None]:
    """No-grad search floor: ||e||^2 - 2 z.e over all K codes and its argmin, one matmul per block of rows
    (blocks of at most FLOOR_BLOCK elements: a whole (8192, 2^18) matrix would be 8 GiB)."""
    codes_sq = codes.square().sum(dim=1)
    rows = max(1, min(z.shape[0], FLOOR_BLOCK // codes.shape[0]))

    @torch.no_grad()
    def step() -> None:
        for start in range(0, z.shape[0], rows):
            torch.addmm(codes_sq, z[start : start + rows], codes.t(), alpha=-2.0).argmin(dim=1)

    return step


def build(method: str, dim: int, num_codes: int, n: int, args: argparse.Namespace) -> Callable[[], None]:
    """Inputs and one forward+backward closure for `method` in ours / naive / matmul / kind<i> / floor<i>."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if method.startswith("kind"):
        cfg = kind_config(int(method[4:]), args)
        z = torch.randn(n, KIND_DIM, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, KIND_DIM, device=device, dtype=dtype)
        return quantizer_step(z, grad, build_quantizer(cfg).to(device).train())
    if method.startswith("floor"):
        cfg = kind_config(int(method[5:]), args)
        z = torch.randn(n, cfg.lookup_dim, device=device, dtype=torch.float32)
        return floor_step(z, torch.randn(cfg.num_codes, cfg.lookup_dim, device=device))
    z = torch.randn(n, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, dim, device=device, dtype=dtype)
    codes = torch.randn(num_codes, dim, device=device, dtype=dtype, requires_grad=True)
    if method == "ours":
        cfg = QuantizerConfig(num_codes=num_codes, dim=dim, chunk_size=args.chunk_size)
        return quantizer_step(z, grad, VectorQuantizer(cfg).to(device).train())
    if method == "naive":
        return naive_step(z, grad, codes)
    grad_nk = torch.randn(n, num_codes, device=device, dtype=dtype)
    return matmul_step(z, codes, grad_nk)


def measure_memory(method: str, dim: int, num_codes: int, n: int, args: argparse.Namespace) -> int:
    """Peak extra bytes of one call after a warm-up; on CPU in a child process (see module doc)."""
    if args.device.startswith("cuda") or args.measure:
        step = build(method, dim, num_codes, n, args)
        step()
        return peak_extra_bytes(step, torch.device(args.device))
    command = [sys.executable, __file__, "--measure", method, str(dim), str(num_codes), str(n),
               "--device", args.device, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
               "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def table_rows(args: argparse.Namespace) -> list[str]:
    """One markdown row per (D, K) case at the current thread count; times are best over all rounds."""
    device, n = torch.device(args.device), args.n
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    methods = ("ours", "naive", "matmul")
    sizes = {}  # (case, method) -> N it runs at; the naive search shrinks N to fit the budget
    for dim, num_codes in CASES:
        n_naive = n
        while n_naive * num_codes * dim * 4 > args.naive_budget_gb * 2**30:
            n_naive //= 2
        sizes.update({((dim, num_codes), m): (n_naive if m == "naive" else n) for m in methods})
    times = {key: math.inf for key in sizes}
    for _ in range(args.rounds):  # interleaved rounds: a burst of load on the shared machine hits one round
        for (case, method), size in sizes.items():
            step = build(method, *case, size, args)
            times[case, method] = min(times[case, method], best_time(step, device, args.repeats) * n / size)
            del step

    rows = []
    for dim, num_codes in CASES:
        case = (dim, num_codes)
        t_ours, t_naive, t_mm = (times[case, m] for m in methods)
        m_ours, m_naive, m_mm = (measure_memory(m, dim, num_codes, sizes[case, m], args) for m in methods)
        rows_per_chunk = chunk_rows(n, num_codes, dim, args.chunk_size, device)
        est_ours = rows_per_chunk * num_codes * 4 + n * (6 * dim + 2) * 4  # distance buffer + fp32 row tensors
        n_naive = sizes[case, "naive"]
        naive_note = "" if n_naive == n else f" (est.: timed at N={n_naive}, x{n // n_naive})"
        m_naive_txt = fmt_mb(m_naive) + ("" if n_naive == n else f" at N={n_naive}")
        rows.append(
            f"| {dim} | {num_codes} | {t_ours * 1e3:,.1f} | {t_naive * 1e3:,.1f}{naive_note} | {t_mm * 1e3:,.1f} "
            f"| {t_ours / t_mm:.2f} | {fmt_mb(m_ours)} (est. {fmt_mb(est_ours)}) "
            f"| {m_naive_txt} (est. {fmt_mb(n * num_codes * dim * 4)} at N={n}) "
            f"| {fmt_mb(m_mm)} (est. {fmt_mb(n * num_codes * elem)}) |"
        )
        print(rows[-1], flush=True)
    return rows


def kind_rows(args: argparse.Namespace) -> list[str]:
    """One markdown row per KIND_CASES entry: the kind's forward+backward beside the search floor."""
    device, n = torch.device(args.device), args.n
    times = {}
    for _ in range(args.rounds):
        for i in range(len(KIND_CASES)):
            for method in (f"kind{i}", f"floor{i}"):
                step = build(method, 0, 0, n, args)
                times[method] = min(times.get(method, math.inf), best_time(step, device, args.repeats))
                del step
    rows = []
    for i, (label, _) in enumerate(KIND_CASES):
        cfg = kind_config(i, args)
        t_kind, t_floor = times[f"kind{i}"], times[f"floor{i}"]
        m_kind, m_floor = (measure_memory(m, 0, 0, n, args) for m in (f"kind{i}", f"floor{i}"))
        rows.append(f"| {label} | {cfg.num_codes} | {cfg.lookup_dim} | {t_kind * 1e3:,.1f} | {t_floor * 1e3:,.1f} "
                    f"| {t_kind / t_floor:.2f} | {fmt_mb(m_kind)} | {fmt_mb(m_floor)} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--n", type=int, default=8192, help="vectors per batch")
    parser.add_argument("--chunk-size", type=int, default=QuantizerConfig().chunk_size)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round, after a warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all cases; best kept")
    parser.add_argument("--threads", type=int, nargs="*", default=[],
                        help="one table per torch intra-op thread count (default: torch's)")
    parser.add_argument("--naive-budget-gb", type=float, default=2.0,
                        help="run the naive search at reduced N above this (N, K, D) size and scale")
    parser.add_argument("--kinds-only", action="store_true", help="only the every-kind table")
    parser.add_argument("--skip-kinds", action="store_true", help="only the vector-quantizer table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", nargs=4, metavar=("METHOD", "D", "K", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # child process of measure_memory
        if args.threads:
            torch.set_num_threads(args.threads[0])
        method, dim, num_codes, n = args.measure
        print(measure_memory(method, int(dim), int(num_codes), int(n), args))
        return
    device = torch.device(args.device)
    memory = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS delta in a child process with MALLOC_MMAP_THRESHOLD_=65536 (VmHWM after clear_refs)"
    )
    lines = [
        "# Vector quantizer benchmark",
        "",
        f"dtype {args.dtype}, N = {args.n} vectors, chunk_size = {args.chunk_size}; times are forward+backward "
        f"in ms, best of {args.rounds} interleaved rounds x {args.repeats} calls after a warm-up.",
        f"Memory: {memory}; 'est.' is the analytic size of the dominant buffers (ours: one (rows, K) fp32 "
        "distance buffer + fp32 (N, D) row tensors; naive: the (N, K, D) fp32 temporary; matmul: its "
        "(N, K) output, the incoming (N, K) gradient being allocated beforehand).",
    ]
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        if not args.kinds_only:
            load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
            rows = table_rows(args)
            lines += [
                "",
                f"Machine: {describe_machine(device)}; 1-min load average {load_before:.1f} before this table, "
                f"{os.getloadavg()[0]:.1f} after.",
                "",
                "| D | K | ours ms | naive broadcast ms | bare z@e.T fwd+bwd ms | ours / matmul | ours peak extra "
                "| naive peak extra | matmul peak extra |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                *rows,
            ]
        if not args.skip_kinds:
            load_before = os.getloadavg()[0]
            rows = kind_rows(args)
            lines += [
                "",
                f"Every kind, D = {KIND_DIM}, N = {args.n}. Machine: {describe_machine(device)}; 1-min load average "
                f"{load_before:.1f} before this table, {os.getloadavg()[0]:.1f} after.",
                "",
                "| kind | K | lookup width c | fwd+bwd ms | floor: no-grad z@e.T + argmin ms | kind / floor "
                "| kind peak extra | floor peak extra |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                *rows,
            ]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.kinds_only and Path(args.out).exists():
        # --kinds-only replaces its own table and keeps an earlier run's nearest-code tables above it
        earlier = Path(args.out).read_text().split("\nEvery kind")[0].rstrip("\n")
        table = earlier + "\n" + table[table.index("\nEvery kind"):]
    atomic_write_text(args.out, table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
