"""benchmarks/gpu_acceptance.py's CPU rehearsal: every part runs (tiny sizes, the GPU run's code) and reports,
so that the prepared run never reaches a lent GPU broken; and its prerequisite check names what is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_acceptance

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


@pytest.mark.slow
def test_dry_run_passes_every_part_and_a_parts_rerun_keeps_the_other_sections(tmp_path):
    out = tmp_path / "gpu_acceptance.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    text = out.read_text()
    assert "DRY RUN" in text and "- Commit: " in text and "torch " in text
    for part in gpu_acceptance.LIMITS:
        assert f"| {part} | passed |" in text and f"## {part}: passed" in text, part
    assert "taming (wheel), eager" in text and "Ratio (ours / taming" in text
    assert "Bitwise exact resume with train.deterministic=true: yes." in text
    assert "| simvq |" in text and "maskgit, 12 steps" in text

    rerun = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(out), "--parts", "sampling"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-2000:]
    merged = out.read_text()
    assert "| sampling | passed |" in merged and "| resume | kept from an earlier run (its section) | | |" in merged
    assert merged.count("## ") == len(gpu_acceptance.LIMITS)
    assert merged.index("## cuda-tests") < merged.index("## sampling") < merged.index("## resume")
    assert "Bitwise exact resume with train.deterministic=true: yes." in merged


def test_prerequisites_name_the_missing_package_and_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("lpips", "taming") else real(name, *a))
    problems, warnings = gpu_acceptance.check_prerequisites(dry_run=True)
    assert len(problems) == 1 and "missing Python packages: lpips." in problems[0]
    assert "gpu_wheels.sh" in problems[0]
    assert len(warnings) == 1 and "taming-transformers-rom1504" in warnings[0] and "--no-deps" in warnings[0]


def test_without_cuda_the_real_run_stops_before_running_anything(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "never.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "sees no CUDA device" in run.stderr and "nothing run, nothing written" in run.stderr
    assert not out.exists()
