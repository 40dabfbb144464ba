"""Reading the standard rich error model: `google.rpc.Status` with `ErrorInfo` and `BadRequest`
(as the server sends in `grpc-status-details-bin` and, wire-compatible, in `RequestError`)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from mouse_client import ActionError
from mouse_client.errors import ERROR_DOMAIN
from mouse_client.v1 import action_service_pb2 as pb


def packed(message: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)  # type: ignore[arg-type]
    return out


def rich_status(code: grpc.StatusCode, domain: str = ERROR_DOMAIN) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        domain=domain, reason="INVALID_STEPS", metadata={"session_id": "g.1", "step": "3", "entry": "1"}
    )
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="steps.obs_continuous", description="x")
        ]
    )
    return status_pb2.Status(code=code.value[0], message="bad", details=[packed(info), packed(bad)])


def test_details_name_reason_field_step_and_entry() -> None:
    err = ActionError.from_status(rich_status(grpc.StatusCode.INVALID_ARGUMENT))
    assert (err.code, err.reason, err.field, err.step, err.entry) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_STEPS",
        "steps.obs_continuous",
        3,
        1,
    )
    assert err.session_id == "g.1" and not err.in_doubt and str(err) == "INVALID_ARGUMENT: bad"


def test_request_error_is_read_as_a_status() -> None:
    item = pb.RequestError.FromString(rich_status(grpc.StatusCode.NOT_FOUND).SerializeToString())
    err = ActionError.from_status(item)
    assert err.code is grpc.StatusCode.NOT_FOUND and err.field == "steps.obs_continuous"


def test_only_a_server_answer_means_not_applied() -> None:
    """A deadline the server answers (with its details) was not applied; one without details
    (the client's own deadline, a proxy) is in doubt."""
    answered = ActionError.from_status(rich_status(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not answered.in_doubt
    foreign = ActionError.from_status(rich_status(grpc.StatusCode.UNAVAILABLE, domain="example.com"))
    assert foreign.in_doubt and foreign.reason is None
    bare = ActionError.from_status(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0]))
    assert not bare.in_doubt
