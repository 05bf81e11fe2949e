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

# The browser tests (tests/test_page.py) drive Debian's Chromium through chromedriver. Installed
# here when missing, where this can be done (root, apt-get); elsewhere those tests skip and say why.
# TWOTOWER_NO_BROWSER=1 leaves the system alone.
if [ -z "${TWOTOWER_NO_BROWSER:-}" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (apt-get) for the browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "setup: could not install chromium; the browser tests will be skipped"
  else
    echo "setup: no chromium/chromedriver (installing them needs root and apt-get); the browser tests will be skipped"
  fi
fi
