"""vqgan-fid SRC1 [SRC2] [options]: FID between two image sources, one line per user error.

    vqgan-fid SRC1 SRC2 [--save-stats ref.npz]
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.fid SRC1 SRC2   # same numbers, 8 shards

The sources and options are vqgan/metrics/fid_run.py's (`vqgan-fid --help` prints them).
"""

from __future__ import annotations

import sys

from vqgan.errors import run_command
from vqgan.metrics.fid_run import run  # the command without its error handling (vqgan.probe calls it too)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda args: run(args) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
