#!/usr/bin/env bash
# Set up (idempotent) and run the test suite against ../shared/data.
# With no arguments: the whole suite, then the end-to-end training, evaluation and serving tests a
# second time with every compiled kernel switched off (TWOTOWER_NATIVE=0: their PyTorch paths; ~1.5
# min). With arguments: pytest with those arguments, once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TWOTOWER_DATA="${TWOTOWER_DATA:-$(cd .. && pwd)/shared/data}"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
echo "--- again with the compiled kernels off (TWOTOWER_NATIVE=0) ---"
TWOTOWER_NATIVE=0 exec .venv/bin/python -m pytest -q tests/test_native.py tests/test_trainer.py tests/test_cli.py \
  tests/test_evaluator.py tests/test_losses.py tests/test_optim.py tests/test_negatives.py tests/test_service.py
