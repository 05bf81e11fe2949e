#!/usr/bin/env bash
# Issue 17 (HTTP): does the guarded server stack cost latency? `benchmarks/load_test.py` on ML-100K
# against `twotower serve` before (commit 2bd7c42: uvicorn's defaults, h11 + asyncio) and after (this
# tree: uvicorn + httptools + uvloop with the deadlines and caps of serving/server.py), paired and
# interleaved (before, after, before, after, ...). The acceptance: p50 and p99 within 10 % of before.
#
#   git worktree add ../base 2bd7c42 && (cd ../base && bash scripts/setup.sh)    # once: the before tree
#   TWOTOWER_DATA=/path/to/data bash benchmarks/serve_ab_http17.sh [BASE_TREE] [REPS]
#
# BASE_TREE (default ../base) is served with its own .venv (its packages decide its stack) and its
# own run (its run format is older): each tree trains runs/ml100k if it has none (a few minutes).
# Writes benchmarks/results/serve-ab-http17.json and prints medians and after/before ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(cd "${1:-../base}" && pwd)
reps=${2:-3}
: "${TWOTOWER_DATA:?set TWOTOWER_DATA to the data folder (ml-100k/ inside)}"
[ -x "$base/.venv/bin/python" ] || { echo "no $base/.venv: run bash scripts/setup.sh in the before tree" >&2; exit 2; }
[ -f runs/ml100k/model.safetensors ] || .venv/bin/twotower train configs/ml-100k.toml --out runs/ml100k
[ -f "$base/runs/ml100k/model.safetensors" ] || (cd "$base" && .venv/bin/twotower train configs/ml-100k.toml --out runs/ml100k)
flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/serve_ab.py --run runs/ml100k --starts 0 --reps "$reps" \
    --requests 10000 --concurrency 32 --before-src "$base/src" --before-python "$base/.venv/bin/python" \
    --before-run "$base/runs/ml100k" --out benchmarks/results/serve-ab-http17.json
