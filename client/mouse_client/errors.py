"""Errors raised by the client."""

from __future__ import annotations

import grpc


class ActionError(Exception):
    """The server refused a request. `code` is the gRPC status, `message` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ActionError:
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        return cls(code, details or "")

    @classmethod
    def from_number(cls, number: int, message: str) -> ActionError:
        code = next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
        return cls(code, message)
