#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with torch and the toolkit.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first, pinned to the builds that lie on this machine's disk; the project's ranges admit them.
.venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install --quiet -e ".[dev,onnx,interop]"
# taming's VQGAN modules: the converter tests build it from its own code and benchmarks/gpu_acceptance.py
# times its step. --no-deps: the wheel pins a pytorch-lightning/omegaconf stack its model files never import.
.venv/bin/pip install --quiet --no-deps "taming-transformers-rom1504==0.0.6"
