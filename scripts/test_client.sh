#!/usr/bin/env bash
# The client's own tests in a venv WITHOUT torch: `pip install .` (no extras) must be enough.
# The server they talk to runs from .venv (MOUSE_SERVE_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-client/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-client
  .venv-client/bin/pip install -q --upgrade pip
fi
.venv-client/bin/pip install -q ".[test-client]"
.venv-client/bin/pip install -q --no-deps --force-reinstall .  # always the current code
if .venv-client/bin/python -c "import torch" 2>/dev/null; then
  echo "torch is installed in .venv-client: the client must not need it" >&2
  exit 1
fi
MOUSE_CLIENT_ONLY=1 MOUSE_SERVE_PYTHON="$PWD/.venv/bin/python" \
  .venv-client/bin/python -m pytest -p no:cacheprovider tests/client "$@"
