#!/usr/bin/env bash
# The memory bank against in-batch negatives at batch 256 on Gowalla, at the same epochs and at the same
# wall time (docs/negatives.md, "The cross-batch memory bank at small batches"): the one script to rerun
# on a quiet machine. It times a bank step against an in-batch one (interleaved, under the bench lock),
# sets the in-batch run of the bank's wall time to the measured ratio times the bank's epochs, and trains
# the comparison (under the heavy lock). Needs TWOTOWER_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/bank_wall_time.py --config configs/gowalla-bank.toml \
    --variants inbatch-256 bank-256 --steps 100 --reps 5 --out benchmarks/results/bank-wall-time.json
epochs=$(.venv/bin/python -c "import json; r = json.load(open('benchmarks/results/bank-wall-time.json'));
print(max(1, round(r['epochs_of_first_in_the_same_time']['bank-256'])))")
sed -i "/^\[variants.inbatch-256-same-time\]/{n;s/^\"train.epochs\" = .*/\"train.epochs\" = $epochs/}" configs/gowalla-bank.toml
echo "in-batch at 256 for the bank's wall time: $epochs epochs"
flock /tmp/twotower-heavy.lock .venv/bin/twotower compare configs/gowalla-bank.toml --out reports/gowalla-bank --quiet --resume
.venv/bin/python benchmarks/negatives_summary.py reports/gowalla-bank --out benchmarks/results/negatives-bank.json
