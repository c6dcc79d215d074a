"""Memory one training process holds for a token dataset: the old in-RAM int64 tensors vs memory-mapped shards.

Writes N random (h, w) grids as token shards (vqgan.prior.data, uint16), then in a fresh child process
for each reader measures the resident set added by opening the set and drawing --batches shuffled
batches, as the prior's loader does:

  in-memory int64   the layout before: the whole set as one int64 tensor per process
  memory-mapped     TokenGrids over the shards (the pages read are shared by every rank of a node)

Private memory (RssAnon) is what each rank holds for itself; the file pages a memory map touched
(RssFile) are page cache, shared by every process of the node that maps the same files and
reclaimable; the table gives both. Prints a markdown table and writes it to
benchmarks/results/token_memory.md.

    .venv/bin/python benchmarks/token_memory.py                      # 400k grids of 16x16 (ImageNet x flips / 6)
    .venv/bin/python benchmarks/token_memory.py --grids 2562334      # ImageNet with flipped rows
    .venv/bin/python benchmarks/token_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import describe_machine  # noqa: E402
from vqgan.prior.data import finish_token_shards, write_token_shard  # noqa: E402
from vqgan.utils import atomic_write_text  # noqa: E402

CHILD = r"""
import json, re, sys
from pathlib import Path
import numpy as np, torch
from torch.utils.data import DataLoader
sys.path.insert(0, sys.argv[4])
from vqgan.prior.data import TokenGrids

def status(key):
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

path, reader, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
anon, mapped = status("RssAnon"), status("RssFile")  # private memory; file pages mapped in
if reader == "int64":
    grids = TokenGrids(path)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(grids.tokens_in_order()))  # int64, as before
    del grids
else:
    dataset = TokenGrids(path)
loader = DataLoader(dataset, batch_size=256, shuffle=True)
for i, batch in zip(range(batches), loader):
    pass
print(json.dumps({"anon": status("RssAnon") - anon, "file": status("RssFile") - mapped}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=400_000)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--shards", type=int, default=8, help="token shards (as 8 tokenizing processes write)")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "token_memory.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.grids, args.batches, args.output = 20_000, 20, args.output.with_name("token_memory_quick.md")
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="vqgan-token-memory-") as folder:
        rng = np.random.default_rng(0)
        entries, per = [], -(-args.grids // args.shards)
        for rank in range(args.shards):
            n = min(per, args.grids - rank * per)
            tokens = rng.integers(0, 16384, (n, args.side, args.side), dtype=np.int64)
            keys = np.arange(rank, args.grids, args.shards)[:n] * 2
            entries.append(write_token_shard(folder, rank, 0, tokens, None, keys, 16384))
        finish_token_shards(folder, entries, {"num_codes": 16384, "grid": [args.side, args.side], "tokenizer_hash": "x"})
        rows = []
        for reader in ("int64", "mmap"):
            out = subprocess.run([sys.executable, "-c", CHILD, folder, reader, str(args.batches), str(root)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append((reader, json.loads(out.strip().splitlines()[-1])))
    gib = 2**30
    lines = ["# Token dataset memory per training process\n", f"Machine: {describe_machine(torch.device('cpu'))}\n",
             f"{args.grids} grids of {args.side}x{args.side} (K=16384) in {args.shards} shards; {args.batches} shuffled "
             f"batches of 256 drawn. Command: `python benchmarks/token_memory.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n",
             "| reader | private memory added (GiB) | file pages mapped in, shared by a node's ranks (GiB) | "
             "int64 copy of the set (GiB) |",
             "|---|---:|---:|---:|"]
    full = args.grids * args.side**2 * 8 / gib
    names = {"int64": "in-memory int64 (before)", "mmap": "memory-mapped shards (now)"}
    for reader, m in rows:
        lines.append(f"| {names[reader]} | {m['anon'] / gib:.3f} | {m['file'] / gib:.3f} | {full:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
