"""bench/transport.py: the gRPC floor that measurement a is compared with (a real grpcio server)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import transport


def test_transport_floor_subtracts_the_handlers_own_time() -> None:
    out = transport.floor([0.0, 5.0], threads=1, calls=10, warmup=2)
    instant, busy = out["runs"]
    assert (instant["handler_ms"], busy["handler_ms"]) == (0.0, 5.0)
    assert busy["round_trip_ms"] >= 5.0  # the handler computed for its time
    for run in (instant, busy):
        assert 0.0 < run["transport_ms"] <= run["round_trip_ms"]
        assert 0.0 < run["transport_mean_ms"] < 1000.0
    # what is left after the handler's time is transport, not the handler again
    assert busy["transport_ms"] < busy["round_trip_ms"] - 4.0
