"""Measuring helpers shared by the benchmark scripts: wall time, peak memory, the machine's description."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def source_commit() -> str:
    """The checkout's commit the figures were measured on ("+ changes" when the tree differs from it)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware and software that produced the numbers (and the CPU load)."""
    if device.type == "cuda":
        hw = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        cpu = platform.processor() or "unknown CPU"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
            cpu = match.group(1).strip() if match else cpu
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        hw = (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
              f"(load average {load} at the start)")
    return f"{hw}; torch {torch.__version__}; Python {platform.python_version()}; {source_commit()}"


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of fn(), with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory above the starting level while fn() runs (CUDA allocator, or the CPU resident set)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - start) * 1024
