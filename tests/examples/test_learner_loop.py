"""examples/learner_loop.py runs as documented: workers act while a learner pushes updates, every
worker sees the new versions, and the later versions (closer to the trained weights) play better."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.server_process import REPO


def test_learner_loop_runs_and_workers_follow_the_updates() -> None:
    result = subprocess.run(
        [sys.executable, "examples/learner_loop.py", "--seconds", "9", "--every", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "learner: pushed version 4" in out
    for worker in (0, 1):
        assert f"worker {worker}: acting with policy version 4" in out
    rows = {int(v): (int(n), float(r)) for v, n, r in re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)$", out, re.M)}
    assert rows[1][0] > 100 and rows[max(rows)][0] > 100, out
    assert rows[max(rows)][1] > rows[1][1] + 0.1, out  # trained weights beat the random start
