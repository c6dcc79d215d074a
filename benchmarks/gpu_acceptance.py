"""One prepared GPU acceptance run (issue 23): what the CPU cannot measure, in about 6-8 minutes on one H100.

Parts, in order, each in a process of its own under its own time limit (benchmarks/gpu_parts.py); a
part that fails or runs out of time is reported and the run goes on:

1. cuda-tests: `pytest -m cuda tests` (tests/test_cuda.py: no host sync in a tokenizer window or a prior
   step besides the window flag's one read, bf16 and fp16 steps finite, the quantizers' fp32 island
   under autocast, encode/decode on CUDA equal to CPU within the stated tolerance).
2. step-eager, step-compiled: the imagenet256_f16_l2 training step at batch 16 and 32, bf16, eager
   (NCHW, channels_last) and compiled, images/s and peak memory, beside taming's VQGAN step from the
   `taming-transformers-rom1504` wheel at the same size and precision; the ratio is the figure.
3. sampling: cached GPT against MaskGIT at 8 and 12 steps, batch 1 and 16, tokens/s and images/s.
4. tokenization: the imagenet256_f16_l2 encoder at 256 px in fp32 and bf16, and tokenize_dataset end to end.
5. codebook-usage: 300 steps of a small f16 model, K=16384, per kind (vq with l2 codes, simvq, ibq,
   lfq 2^14) on the embedded photos at 128 px: codes used over the last 65,536 training tokens.
6. resume: 40 steps with train.deterministic=true, SIGKILLed and resumed, compared bitwise with an
   uninterrupted run; and how far two non-deterministic runs drift.

It writes benchmarks/results/gpu_acceptance.md (or --out) after every part: the device, torch / CUDA /
cuDNN versions, the commit, a status table, then one section per part. `--parts NAME ...` reruns only
those parts and replaces their sections in an existing file. Exit status 0 when every part passed.

Prerequisites, checked before anything runs (each missing one is named with the way to get it):
torch with CUDA; the project's dependencies (pyproject.toml) importable, the project itself from this
checkout (`PYTHONPATH=.`); optional: taming-transformers-rom1504, the `gpu-bench` extra, installed with
`pip install --no-deps taming-transformers-rom1504==0.0.6` as setup.sh does (its metadata would pull
pytorch-lightning and omegaconf, which the modules used never import). Without it the taming rows
fail and the rest runs.

On the lent GPU machine (offline; its image has torch, accelerate, numpy, ... but not lpips, datasets,
torch-fidelity, webdataset, braceexpand or taming), first here, once: `bash benchmarks/gpu_wheels.sh`
(downloads those wheels into .whl/, git-ignored), then run with `carry: [".whl"]` and timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && \\
        python3 benchmarks/gpu_acceptance.py --commit COMMIT --out $OUT/gpu_acceptance.md

(COMMIT: `git rev-parse HEAD` here; the copy there may have no .git), then copy the returned file to
benchmarks/results/gpu_acceptance.md and commit it. Anywhere else with a CUDA GPU and the venv:

    .venv/bin/python benchmarks/gpu_acceptance.py
    .venv/bin/python benchmarks/gpu_acceptance.py --dry-run-cpu --out /tmp/dry.md  # the same code on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
sys.path.insert(0, str(ROOT / "benchmarks"))  # common
RESULTS = ROOT / "benchmarks" / "results" / "gpu_acceptance.md"
DRY_RESULTS = ROOT / "benchmarks" / ".cache" / "gpu_acceptance_dry.md"  # git-ignored
PARTS_SCRIPT = ROOT / "benchmarks" / "gpu_parts.py"
# seconds each part may take on one H100 (measured or estimated with margin); --budget caps the sum
LIMITS = {
    "cuda-tests": 75,
    "step-eager": 75,
    "step-compiled": 200,  # two inductor compilations of G and D (batch 16, then 32); rows print as they come
    "sampling": 45,
    "tokenization": 75,
    "codebook-usage": 100,
    "resume": 90,
}
DRY_LIMIT = 150  # each part of the CPU rehearsal (2 shared cores)
# pyproject distribution name -> module to find, where they differ
MODULE_OF = {"scikit-learn": "sklearn", "scikit-image": "skimage", "pyyaml": "yaml", "pillow": "PIL",
             "torch-fidelity": "torch_fidelity"}


@dataclass(frozen=True)
class Outcome:
    part: str
    status: str  # "passed", "FAILED", "TIMED OUT", "not run"
    seconds: float
    limit: float
    text: str  # the part's section, or what went wrong


# ---------------------------------------------------------------- prerequisites


def required_distributions() -> list[str]:
    """The project's dependencies and its dev extra (pytest for the cuda tests), as pyproject.toml names them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in specs]


def check_prerequisites(dry_run: bool) -> tuple[list[str], list[str]]:
    """-> (problems that stop the run, warnings); each names what is missing and how to get it."""
    problems, warnings = [], []
    missing = [name for name in required_distributions()
               if importlib.util.find_spec(MODULE_OF.get(name, name.replace("-", "_"))) is None]
    if missing:
        problems.append(f"missing Python packages: {', '.join(missing)}. Here: `bash setup.sh`. On the offline GPU "
                        "machine: `bash benchmarks/gpu_wheels.sh` here, carry .whl and install it there (docstring).")
    if "torch" not in missing:
        import torch

        if not dry_run and not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False; "
                            f"built for CUDA {torch.version.cuda}); use --dry-run-cpu to rehearse on CPU")
    if not missing:
        try:
            importlib.import_module("vqgan.train")
            importlib.import_module("vqgan.prior.tokenize")
        except ImportError as err:
            problems.append(f"the project does not import ({err}); missing module {err.name!r}: carry its wheel too "
                            "(benchmarks/gpu_wheels.sh) or install it")
    if importlib.util.find_spec("taming") is None:
        warnings.append("taming-transformers-rom1504 is not importable: the taming rows of step-eager will fail. "
                        "Install it with `pip install --no-deps taming-transformers-rom1504==0.0.6` (setup.sh does), "
                        "or on the GPU machine carry its wheel (benchmarks/gpu_wheels.sh)")
    return problems, warnings


# ---------------------------------------------------------------- running the parts


def run_part(part: str, limit: float, dry_run: bool, env: dict[str, str], logs: Path) -> Outcome:
    """gpu_parts.py PART in its own process group, killed whole (training runs, loader workers) at `limit` s."""
    out = logs / f"{part}.json"
    log = logs / f"{part}.log"
    command = [sys.executable, str(PARTS_SCRIPT), part, "--out", str(out)] + (["--dry-run-cpu"] if dry_run else [])
    print(f"\n=== {part} (limit {limit:.0f} s) ===", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever it left running (or all of it, on a timeout)
            except ProcessLookupError:
                pass
            process.wait()
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-3000:]
    print(tail[-1500:], flush=True)
    if status is None:
        return Outcome(part, "TIMED OUT", seconds, limit, f"Killed after {limit:.0f} s. End of its output:\n\n"
                       f"```\n{tail}\n```\n")
    if status != 0 or not out.is_file():
        return Outcome(part, "FAILED", seconds, limit, f"Exit status {status}. End of its output:\n\n```\n{tail}\n```\n")
    section = json.loads(out.read_text())
    return Outcome(part, "passed" if section["ok"] else "FAILED", seconds, limit, section["text"])


# ---------------------------------------------------------------- the results file


def git_commit(given: str) -> str:
    if given:
        return given
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: pass --commit)"


def describe_device(dry_run: bool) -> list[str]:
    import torch

    if dry_run or not torch.cuda.is_available():
        from common import describe_machine

        cpu = describe_machine(torch.device("cpu")).split(";")[0]
        device = f"{cpu}: DRY RUN, tiny sizes, its numbers mean nothing"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
            device += f", driver {driver}" if driver else ""
        except (OSError, subprocess.TimeoutExpired):
            pass
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [f"- Device: {device}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, Python {platform.python_version()}"]


def header(args: argparse.Namespace) -> str:
    command = " ".join(["python", "benchmarks/gpu_acceptance.py", *map(shlex.quote, sys.argv[1:])])
    return "\n".join([
        "# GPU acceptance run", "",
        *describe_device(args.dry_run_cpu),
        f"- Commit: {git_commit(args.commit)}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{command}`",
    ]) + "\n"


def sections_of(text: str) -> dict[str, str]:
    """An earlier results file's '## part: status' sections -> {part: the section, heading included}."""
    chunks = re.split(r"^## ", text, flags=re.M)[1:]
    return {chunk.split(":", 1)[0].strip(): "## " + chunk.rstrip() + "\n" for chunk in chunks}


def render(head: str, outcomes: dict[str, Outcome], earlier: dict[str, str]) -> str:
    """The header, the status table, then each part's section (this run's, or an earlier run's kept by --parts)."""
    lines = [head, "| part | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    body = []
    for part in LIMITS:
        if part in outcomes:
            o = outcomes[part]
            lines.append(f"| {part} | {o.status} | {o.seconds:.0f} | {o.limit:.0f} |")
            body.append(f"## {part}: {o.status}\n\n{o.text}")
        elif part in earlier:
            lines.append(f"| {part} | kept from an earlier run (its section) | | |")
            body.append(earlier[part])
    return "\n".join(lines) + "\n\n" + "\n".join(body)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {RESULTS.relative_to(ROOT)}; dry run: "
                        f"{DRY_RESULTS.relative_to(ROOT)})")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="the same parts on CPU at tiny sizes (a rehearsal: its numbers mean nothing)")
    parser.add_argument("--parts", nargs="+", choices=list(LIMITS), default=None,
                        help="run only these parts and replace their sections in an existing --out file")
    parser.add_argument("--budget", type=float, default=550.0,
                        help="seconds for all parts together (default 550: with the wheel install, inside one "
                        "10-minute device command); "
                        "a part gets min(its limit, what is left), and none starts with under 15 s left")
    parser.add_argument("--commit", default="", help="the commit measured (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DRY_RESULTS if args.dry_run_cpu else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems, warnings = check_prerequisites(args.dry_run_cpu)
    for warning in warnings:
        print(f"WARNING: {warning}", flush=True)
    if problems:
        for problem in problems:
            print(f"MISSING: {problem}", file=sys.stderr)
        print("gpu_acceptance.py: nothing run, nothing written", file=sys.stderr)
        return 2
    from vqgan.utils import atomic_write_text

    parts = args.parts or list(LIMITS)
    earlier = sections_of(args.out.read_text()) if args.parts and args.out.is_file() else {}
    head = header(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1"}
    outcomes: dict[str, Outcome] = {}
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as logs:
        for part in parts:
            left = deadline - time.monotonic()
            limit = min(DRY_LIMIT if args.dry_run_cpu else LIMITS[part], left)
            if limit < 15:
                outcomes[part] = Outcome(part, "not run", 0.0, 0.0, f"Not run: {left:.0f} s of the budget left.\n")
            else:
                outcomes[part] = run_part(part, limit, args.dry_run_cpu, env, Path(logs))
            print(f"--- {part}: {outcomes[part].status} in {outcomes[part].seconds:.0f} s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, render(head, outcomes, earlier))  # a kill now still leaves a whole file
    print(f"\nwrote {args.out}")
    for o in outcomes.values():
        print(f"  {o.part:15s} {o.status:10s} {o.seconds:5.0f} s")
    return 0 if all(o.status == "passed" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
