"""The proto contract: generated code is current, `buf lint` passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint() -> None:
    buf = REPO / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is missing: run `npm ci` (scripts/setup.sh does)"
    result = subprocess.run([str(buf), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_do_not_import_the_proto_package_path() -> None:
    """protoc's `mouse.action.v1` imports are rewritten, so they cannot clash with PyPI `mouse`."""
    for path in (REPO / "client" / "mouse_client" / "v1").glob("*.py*"):
        assert "from mouse.action" not in path.read_text(), path
