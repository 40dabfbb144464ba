"""The one exception type the service raises: a gRPC status, a precise message, and the standard
rich error details (`google.rpc.ErrorInfo`, and `google.rpc.BadRequest` for a bad field).

Unary calls carry the details as a serialized `google.rpc.Status` in the `grpc-status-details-bin`
trailer (what `grpc_status.rpc_status.from_call` and grpcurl read); items of StreamActions and
BatchGetAction carry them in `RequestError`, which has the same fields as `google.rpc.Status`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from mouse_client.v1 import action_service_pb2 as pb

DOMAIN = "mouse.action.v1"
DETAILS_KEY = "grpc-status-details-bin"


class ServiceError(Exception):
    """A request failed and was not applied; `code` is the gRPC status to answer with.

    `reason` (UPPER_SNAKE) and `metadata` become a `google.rpc.ErrorInfo`; `metadata["field"]`
    (e.g. ``steps.obs_continuous``) also a `google.rpc.BadRequest` field violation.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, **metadata: object | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = {k: str(v) for k, v in metadata.items() if v is not None}

    def add(self, **metadata: object | None) -> ServiceError:
        """Add context (session id, seq, batch entry, ...) that was not known where it was raised."""
        self.metadata.update(
            {k: str(v) for k, v in metadata.items() if v is not None and k not in self.metadata}
        )
        return self

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        out = [info]
        if "field" in self.metadata:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.metadata["field"], description=self.message
            )
            bad = any_pb2.Any()
            bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            out.append(bad)
        return out

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())
        return ((DETAILS_KEY, status.SerializeToString()),)

    def request_error(self) -> pb.RequestError:
        return pb.RequestError(code=self.code.value[0], message=self.message, details=self.details())


def invalid(message: str, reason: str = "INVALID_REQUEST", **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason, **metadata)


def not_found(message: str, reason: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, reason, **metadata)


def failed_precondition(message: str, reason: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason, **metadata)


def exhausted(message: str, reason: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason, **metadata)


def already_exists(message: str, reason: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, reason, **metadata)


def permission_denied(message: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, "PERMISSION_DENIED", **metadata)


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED")


def deadline_exceeded(message: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message, "DEADLINE_NOT_APPLIED", **metadata)


def unavailable(message: str, reason: str, **metadata: object | None) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, reason, **metadata)


def internal(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message, "INTERNAL")
