"""bench/host.py: the server's CPU per action by thread (a real server, a real client)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import host
from bench.shapes import checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_host_measures_the_servers_threads_per_action(tmp_path: Path) -> None:
    ckpt, _ = checkpoint("tiny", cache=tmp_path / "models")
    args = argparse.Namespace(shape="tiny", sessions=8, groups=2, warmup=2, steps=20, threads=1)
    res = host.measure(REPO, args, ckpt, tmp_path / "server.log")
    assert res["actions_per_s"] > 0 and res["call_p50_ms"] > 0
    # the event loop and the runner thread both worked for every action, and are part of the total
    assert res["loop_us"] > 0 and res["runner_us"] > 0
    assert res["loop_us"] + res["runner_us"] <= res["total_us"] + 1e-6
    assert "listening on" in (tmp_path / "server.log").read_text()
