#!/usr/bin/env bash
# Set up (idempotent) and run the demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TWOTOWER_DATA="${TWOTOWER_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/twotower demo "$@"
