"""bench/run.py: a failed gRPC measurement is named by its cause, and a restarted server leaves
nothing of it behind for the next one (a real server and real worker processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import run
import shapes

from server import BenchServer


def test_a_failed_measurement_names_its_cause_and_a_restart_frees_its_sessions(tmp_path: Path) -> None:
    ckpt, _ = shapes.checkpoint("mid", tmp_path / "cache")
    feed = {**{k: v for k, v in shapes.feed_spec("mid").items() if k != "tokens_per_step"}, "seed": 0}
    server = BenchServer(
        sys.executable,
        ckpt,
        device="cpu",
        dtype="float32",
        max_sessions=12,  # two workers of 8 sessions: the second to open runs out
        max_context_steps=16,
        threads=1,
        log_path=tmp_path / "server.log",
    )
    with server as srv:
        for _ in range(2):  # which worker runs out varies; the other one waits at the barrier
            with pytest.raises(RuntimeError) as failed:
                run.run_workers(
                    srv.target, "batched", [8, 8], warmup=2, measure=2, feed=feed, timeout=60, server=srv
                )
            # the cause, not the BrokenBarrierError of the worker it stopped
            assert "RESOURCE_EXHAUSTED" in run.failure(failed.value), str(failed.value)
            srv.restart()  # a worker stopped at the barrier may have left its sessions open
            assert srv.scrape().get("mouse_active_sessions", 0) == 0
        # the restarted server has every slot: a measurement that needs the whole pool runs
        out = run.run_workers(
            srv.target, "batched", [6, 6], warmup=2, measure=2, feed=feed, timeout=60, server=srv
        )
        assert out["actions"] == 24
