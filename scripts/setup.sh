#!/usr/bin/env bash
# Create .venv and install twotower with its test dependencies.
# torch==2.13.0 goes first: these machines hold its CPU build locally, and any other torch would
# make pip download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
