#!/usr/bin/env bash
# The test command: fresh clone -> venvs, install, lint, all tests (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
source scripts/setup_test_tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
bash scripts/test_client.sh
