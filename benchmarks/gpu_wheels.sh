#!/usr/bin/env bash
# Wheels that benchmarks/gpu_acceptance.py needs on the lent GPU machine, which is offline and whose image has
# torch, accelerate, numpy, pandas, scipy, scikit-image, huggingface_hub, ... but not these. Run it here (with
# the project's venv, whose versions it pins); it writes them into .whl/ (git-ignored). Then the device
# command carries ".whl" and begins with the install line of gpu_acceptance.py's docstring.
#   bash benchmarks/gpu_wheels.sh [DEST]     # DEST defaults to .whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
# datasets and what it needs beyond the image (pyarrow >= 24, fsspec <= its cap, dill, multiprocess); the
# project's other missing dependencies; taming for the step comparison (the gpu-bench extra)
PACKAGES=(datasets dill multiprocess pyarrow fsspec lpips torch-fidelity webdataset braceexpand
          taming-transformers-rom1504)
pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
        echo "gpu_wheels.sh: $name is not installed in $PY (run bash setup.sh first)" >&2; exit 1; }
    pins+=("$name==$version")
done
mkdir -p "$DEST"
# the lent GPU machine runs Python 3.12 on x86-64
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"
ls -la "$DEST"
du -sh "$DEST"
