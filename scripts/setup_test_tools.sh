#!/usr/bin/env bash
# The tools the tests need beyond .venv: buf (npm, lints the proto) and nginx (Debian package,
# for the proxy tests in tests/ops). Sourced by test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x node_modules/.bin/buf ] || npm ci --no-fund --no-audit --loglevel=error
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
# mouse-env 0.5.0 (GPL-3.0) for the adapter tests in tests/integration: a test-only install,
# never a dependency of the published package. It declares Python >= 3.12 but imports on 3.10+;
# what its import needs (torch, huggingface_hub, gymnasium) is already in .venv.
.venv/bin/python -c "import mouse_envs" 2>/dev/null \
  || .venv/bin/pip install -q --no-deps --ignore-requires-python "mouse-env==0.5.0"
