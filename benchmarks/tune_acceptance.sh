#!/usr/bin/env bash
# Issue 22's acceptance runs, one script (docs/tuning.md): the baselines on the three data sets,
# `twotower tune --budget 20m` on each with the baselines in its report, and the time-to-quality
# curve on Gowalla against ALS, measured in one run.
#
#   TWOTOWER_DATA=/path/to/data bash benchmarks/tune_acceptance.sh [STEP ...]
#
# STEPs (default: all, in this order): baselines-ml-100k tune-ml-100k baselines-grocery tune-grocery
# baselines-gowalla ttq-gowalla ttq-gowalla-trainvalid tune-gowalla. OUT (default reports/tune-acceptance) holds
# one folder per step and load.txt, the machine's load average before and after each.
# Each step holds the heavy lock (one long job at a time on a shared machine) from start to end, and
# the timed ones (tune, time to quality) the bench lock too; no step lasts over ~25 minutes.
# BUDGET (default 20m) is tune's wall clock. Wall-clock figures are only fair on a quiet machine:
# check load.txt.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/tune-acceptance}
BUDGET=${BUDGET:-20m}
TT=.venv/bin/twotower
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(baselines-ml-100k tune-ml-100k baselines-grocery tune-grocery baselines-gowalla
                                  ttq-gowalla ttq-gowalla-trainvalid tune-gowalla)

heavy() { flock /tmp/twotower-heavy.lock "$@"; }
timed() { flock /tmp/twotower-bench.lock flock /tmp/twotower-heavy.lock "$@"; }
note() { echo "$(date -u +%FT%TZ) $1: $(uptime)" >> "$OUT/load.txt"; }

baselines() {  # NAME CONFIG METHOD...
  local name=$1 config=$2; shift 2
  for m in "$@"; do
    rm -rf "$OUT/$name-$m"
    $TT baseline "$config" --method "$m" --out "$OUT/$name-$m" --quiet
  done
}

tune() {  # NAME CONFIG [ARGS...]
  local name=$1 config=$2; shift 2
  local dirs=()
  for d in "$OUT/$name"-{popularity,als,ease}; do [ -f "$d/metrics.json" ] && dirs+=(--baseline "$d"); done
  rm -rf "$OUT/tune-$name"
  $TT tune "$config" --budget "$BUDGET" --out "$OUT/tune-$name" "${dirs[@]}" "$@"
}

als_settings() {  # the ALS settings twotower baseline chose on Gowalla's validation split
  .venv/bin/python -c "import json,sys; s=json.load(open(sys.argv[1]))['settings']; print(','.join(f'{k}={v}' for k,v in s.items()))" \
      "$OUT/gowalla-als/baseline.json" 2>/dev/null || echo "factors=256,regularization=0.1,alpha=5,iterations=15"
}

run_step() {
  case $1 in
    baselines-ml-100k) baselines ml-100k configs/tune-ml-100k.toml popularity ease als ;;
    baselines-grocery) baselines grocery configs/tune-grocery.toml popularity ease als ;;
    # EASE refuses Gowalla's 40,981 items (a 31 GiB dense inverse): the message says so.
    baselines-gowalla) baselines gowalla configs/tune-gowalla.toml popularity als ;;
    ttq-gowalla)
      .venv/bin/python benchmarks/time_to_quality.py configs/gowalla.toml --out "$OUT/time_to_quality-gowalla" \
            --als "$(als_settings)" --settings normal,svd,svd+early-batch --set train.epochs=6 --set train.refit=false ;;
    ttq-gowalla-trainvalid)  # like for like with ALS's test figure: the curves and ALS fit training + validation
      .venv/bin/python benchmarks/time_to_quality.py configs/gowalla.toml --out "$OUT/time_to_quality-gowalla-trainvalid" \
            --als "$(als_settings)" --settings normal,svd --set train.epochs=6 --set train.refit=false --train-on train+valid ;;
    tune-ml-100k) tune ml-100k configs/tune-ml-100k.toml --enqueue configs/ml-100k.toml ;;
    tune-grocery) tune grocery configs/tune-grocery.toml --enqueue configs/grocery.toml ;;
    tune-gowalla) tune gowalla configs/tune-gowalla.toml --enqueue configs/tune-gowalla.toml ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

if [ "${1:-}" = __step ]; then  # one step, its lock already held by the caller below
  note "$2 start (locks held)"
  run_step "$2"
  note "$2 end"
  exit 0
fi
for step in "${STEPS[@]}"; do
  note "$step queued for its lock"
  case $step in
    ttq-*|tune-*) timed bash "$SELF" __step "$step" ;;   # wall-clock figures: the bench lock too
    *) heavy bash "$SELF" __step "$step" ;;
  esac
done
