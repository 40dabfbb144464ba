#!/usr/bin/env bash
# The main job: set up, start mouse-serve on the bundled demo model (a bandit learner) and run
# environment worker processes against it, then its learning curve. Extra arguments go to
# `python -m demo.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m demo.run "$@"
