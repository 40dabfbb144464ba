"""What a unary gRPC round trip costs on this machine without any of mouse-serve's code.

A bare grpcio server (`grpc.aio`, raw bytes, no protobuf) whose handler computes for a given time
with torch on the server's threads, blocking the event loop as the server's inline forward does,
and the blocking client the SDK uses, on loopback with messages the size of a one-step
`GetAction`. Transport = round trip - the handler's own measured time. Measured once with an
instant handler and once with the handler time of the real server, because on some machines
(virtual ones whose idle vCPUs halt) threads that waited a few milliseconds wake up slowly, so
the same RPC costs more when the server computed in between.

`bench/run.py` calls `floor()` next to measurement a; on its own:
`python bench/transport.py --handler-ms 0,8 --threads 2` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REQUEST_BYTES = 128  # about a one-step GetActionRequest (ids, seq, 5 fields, 8 observations)
REPLY_BYTES = 32  # about a GetActionResponse without scores
METHOD = "/bench.Transport/Echo"


def _serve(threads: int) -> None:
    """The echo server on a free loopback port (printed as `ready PORT`): reply after computing
    for the requested time (first 8 bytes of the request, seconds)."""
    import asyncio

    import grpc
    import torch

    torch.set_num_threads(threads)
    x, w = torch.rand(3, 256), torch.rand(1024, 256)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        (seconds,) = struct.unpack_from("d", request)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.nn.functional.linear(x, w)  # about 10-50 us: the loop ends close to `seconds`
        took = time.perf_counter() - started
        return struct.pack("d", took).ljust(REPLY_BYTES, b"\0")

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Transport", {"Echo": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"ready {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def floor(handler_ms: list[float], threads: int, calls: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Round trip (median) and transport (round trip - handler; median and mean) per handler time,
    in ms: one entry of `runs` per value of `handler_ms`, in order."""
    import grpc

    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", "--threads", str(threads)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 60.0)
        words = server.stdout.readline().split() if ready else []
        if len(words) != 2 or words[0] != "ready":
            raise RuntimeError("the transport echo server did not start within 60 s")
        port = int(words[1])
        runs = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(METHOD)
            for ms in handler_ms:
                request = struct.pack("d", ms / 1e3).ljust(REQUEST_BYTES, b"\0")
                rtts, transport_ms = [], []
                for i in range(warmup + calls):
                    started = time.perf_counter()
                    reply = echo(request, timeout=30)
                    rtt = time.perf_counter() - started
                    if i >= warmup:
                        rtts.append(1e3 * rtt)
                        transport_ms.append(1e3 * (rtt - struct.unpack_from("d", reply)[0]))
                runs.append(
                    {
                        "handler_ms": ms,
                        "round_trip_ms": statistics.median(rtts),
                        "transport_ms": statistics.median(transport_ms),
                        "transport_mean_ms": statistics.mean(transport_ms),
                        "calls": calls,
                    }
                )
        return {"threads": threads, "request_bytes": REQUEST_BYTES, "reply_bytes": REPLY_BYTES, "runs": runs}
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--handler-ms", default="0,8", help="comma-separated handler times (ms, >= 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the handler")
    p.add_argument("--calls", type=int, default=200, help="measured calls per handler time")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads < 1 or args.calls < 1:
        p.error("--threads and --calls must be at least 1.")
    if args.serve:
        _serve(args.threads)
        return
    try:
        ms = [float(v) for v in args.handler_ms.split(",") if v.strip()]
    except ValueError:
        ms = []
    if not ms or not all(0 <= v < 10_000 for v in ms):
        p.error(f"--handler-ms {args.handler_ms!r}: expected comma-separated times in ms, e.g. 0,8.")
    print(json.dumps(floor(ms, args.threads, args.calls), indent=1))


if __name__ == "__main__":
    main()
