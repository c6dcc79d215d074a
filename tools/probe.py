"""`vqgan-probe` from a checkout: python tools/probe.py ... (see --help).

Several processes: accelerate launch [--multi_gpu --num_processes N] tools/probe.py ...
"""

import os
import sys

# This folder leaves the import path: tools/tokenize.py (or evaluate.py) would shadow the module of that name.
sys.path = [entry for entry in sys.path if os.path.abspath(entry) != os.path.dirname(os.path.abspath(__file__))]
from vqgan.cli.probe import main  # noqa: E402

sys.exit(main())
