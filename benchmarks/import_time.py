"""Seconds to `import vqgan` (lazy: no torch) and to `from vqgan import VQTokenizer` (torch and the model), each in
a fresh interpreter; median of --repeats. Prints a markdown table and writes benchmarks/results/import_time.md.

    python benchmarks/import_time.py            # 7 repeats
    python benchmarks/import_time.py --quick    # 1 repeat, to check the script
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from common import source_commit  # noqa: E402 - the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS = {
    "python -c pass (interpreter start)": "pass",
    "import vqgan": "import vqgan",
    "from vqgan import VQTokenizer": "from vqgan import VQTokenizer",
    "import torch (for scale)": "import torch",
}


def seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    rows = ["| statement | median seconds (in-process, after interpreter start) |", "| --- | --- |"]
    for name, statement in STATEMENTS.items():
        rows.append(f"| `{name}` | {statistics.median(seconds(statement) for _ in range(repeats)):.4f} |")
    table = "\n".join([f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
                       f"{repeats} repeat(s); {source_commit()}", "", *rows]) + "\n"
    print(table)
    out = ROOT / "benchmarks" / "results" / "import_time.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


if __name__ == "__main__":
    main()
