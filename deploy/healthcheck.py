#!/usr/bin/env python3
"""Container health check for mouse-serve: asks its gRPC health service (grpc.health.v1).

Exits 0 when the ActionService is SERVING and 1 otherwise (NOT_SERVING while draining on
SIGTERM, not listening yet, unreachable, timed out). Installed in the image as
`mouse-serve-healthcheck`; usage: `mouse-serve-healthcheck [HOST:PORT]`, by default
127.0.0.1:$MOUSE_SERVE_PORT (50051). Plaintext only: a server started with --tls-cert needs
another health check (see the README's Deployment section).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "mouse.action.v1.ActionService"
TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('MOUSE_SERVE_PORT', '50051')}"
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {SERVICE} {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
