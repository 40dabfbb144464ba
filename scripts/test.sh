#!/usr/bin/env bash
# The test command: fresh clone -> venvs, install, lint, all tests (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
source scripts/setup_test_tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two worker processes (pytest-xdist): most tests wait on server processes, so two halve the
# wall time on 2 cores. MOUSE_TEST_WORKERS=0 runs everything in one process.
.venv/bin/python -m pytest -n "${MOUSE_TEST_WORKERS:-2}" --dist load "$@"
bash scripts/test_client.sh
