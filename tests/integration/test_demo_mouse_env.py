"""The demo's mouse-env mode runs against a real server on the demo checkpoint."""

from __future__ import annotations

import pytest

from demo import mouse_env_mode
from tests.server_process import ServerProcess

pytest.importorskip("mouse_envs")


def test_mouse_env_mode_runs(adapter_server: ServerProcess) -> None:
    assert mouse_env_mode.available()
    stats = mouse_env_mode.run(adapter_server.target, envs=4, seconds=3.0)
    assert stats["actions"] > 100 and stats["episodes"] > 0
