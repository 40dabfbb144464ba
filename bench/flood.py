"""A stream flood against a real server: one client writes prefills on a StreamActions call as
fast as it can and never reads the replies, while another session steps one step at a time.
Reports the victim's round trip (p50, p99) before and during the flood and the server's
resident memory, against issue 10's targets (RSS within +200 MiB, victim p50 within 2x idle).

    .venv/bin/python bench/flood.py                      # mid model, 30 s flood, 64-step prefills
    .venv/bin/python bench/flood.py --seconds 10 --prefill-steps 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import Feed, rss_bytes
from bench.server import BenchServer
from bench.shapes import checkpoint, feed_spec
from mouse_client import encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc


class Victim:
    """One session stepped one step at a time over unary GetAction; records round trips."""

    def __init__(self, target: str, feed: Feed) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ActionServiceStub(self.channel)
        self.sid = self.stub.OpenSession(pb.OpenSessionRequest(seed=0)).session_id
        self.feed = feed
        self.seq = 0
        self.times: list[float] = []

    def run(self, seconds: float) -> list[float]:
        times: list[float] = []
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            cols = self.feed.columns(0, 1, start=self.seq)
            self.seq += 1
            req = pb.GetActionRequest(
                session_id=self.sid, seq=self.seq, steps=encode_steps({k: v[0] for k, v in cols.items()})
            )
            started = time.perf_counter()
            self.stub.GetAction(req, timeout=60)
            times.append(time.perf_counter() - started)
        return times


def flood_requests(
    sid: str, steps: pb.Steps, stop: threading.Event, sent: list[int]
) -> Iterator[pb.StreamActionsRequest]:
    while not stop.is_set():
        sent[0] += 1
        yield pb.StreamActionsRequest(request=pb.GetActionRequest(session_id=sid, seq=0, steps=steps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mid")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the flood")
    parser.add_argument("--idle-seconds", type=float, default=8.0, help="victim alone, before the flood")
    parser.add_argument("--prefill-steps", type=int, default=64, help="steps per flood request")
    parser.add_argument("--threads", type=int, default=0, help="server torch threads (0: all cores)")
    args = parser.parse_args(argv)

    path, _ = checkpoint(args.shape)
    spec = feed_spec(args.shape)
    feed = Feed(spec["obs_dim"], spec["max_time"], spec["num_actions"])
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = BenchServer(
        sys.executable,
        path,
        device="cpu",
        dtype="float32",
        max_sessions=4,
        max_context_steps=2048,
        threads=args.threads or 2,
        log_path=log,
        metrics=False,
    ).start()
    try:
        victim = Victim(server.target, feed)
        victim.run(2.0)  # warm-up
        idle = victim.run(args.idle_seconds)
        rss_idle = rss_bytes(server.pid)

        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.ActionServiceStub(channel)
        flood_sid = stub.OpenSession(pb.OpenSessionRequest(seed=1)).session_id
        cols = feed.columns(1, args.prefill_steps)
        prefill = encode_steps([{k: v[i] for k, v in cols.items()} for i in range(args.prefill_steps)])
        stop, sent = threading.Event(), [0]
        call = stub.StreamActions(flood_requests(flood_sid, prefill, stop, sent))  # never read
        rss_max = [rss_idle]

        def watch() -> None:
            while not stop.is_set():
                rss_max[0] = max(rss_max[0], rss_bytes(server.pid))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        during = victim.run(args.seconds)
        rss_end = rss_bytes(server.pid)
        stop.set()
        call.cancel()
        watcher.join()
        channel.close()
    finally:
        server.stop()

    def ms(ts: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(ts) * 1e3, q))

    ratio = ms(during, 50) / ms(idle, 50)
    growth = (rss_max[0] - rss_idle) / 2**20
    print(
        f"flood: {args.shape} model, {args.prefill_steps}-step prefills on one stream, replies never read, "
        f"{args.seconds:.0f} s; {sent[0]} requests written by the flooding client"
    )
    print(
        f"victim round trip idle:   p50 {ms(idle, 50):.2f} ms, p99 {ms(idle, 99):.2f} ms ({len(idle)} steps)"
    )
    print(
        f"victim round trip flood:  p50 {ms(during, 50):.2f} ms, p99 {ms(during, 99):.2f} ms ({len(during)} steps)"
    )
    print(f"victim p50 flood / idle:  {ratio:.2f}  (target <= 2)  {'PASS' if ratio <= 2 else 'MISS'}")
    print(
        f"server RSS: idle {rss_idle / 2**20:.0f} MiB, max during the flood {rss_max[0] / 2**20:.0f} MiB, "
        f"at the end {rss_end / 2**20:.0f} MiB: +{growth:.0f} MiB  (target <= +200)  {'PASS' if growth <= 200 else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
