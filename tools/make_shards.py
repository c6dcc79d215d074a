"""`vqgan-make-shards` from a checkout: python tools/make_shards.py ... (see --help)."""

import os
import sys

# This folder leaves the import path: tools/tokenize.py (or evaluate.py) would shadow the module of that name.
sys.path = [entry for entry in sys.path if os.path.abspath(entry) != os.path.dirname(os.path.abspath(__file__))]
from vqgan.data.make_shards import main  # noqa: E402

sys.exit(main())
