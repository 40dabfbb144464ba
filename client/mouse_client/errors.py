"""The client's errors: one hierarchy under `MouseClientError`.

- `ActionError`: a call failed. Server refusals carry the standard rich error details
  (`google.rpc.ErrorInfo`, `google.rpc.BadRequest`), exposed as `.reason`, `.field`, `.step`,
  `.entry` and `.metadata`. A refusal means the request was **not applied**; `.in_doubt` is True
  instead when the client cannot tell (its own deadline, a cancel, a broken connection): the
  session then resolves the request on its next call.
- `GroupError(ActionError)`: a `SessionGroup` call in which some entries failed; `.outcomes`
  says, per entry, what happened.
- `SessionClosedError`: a closed session was used.
- `ValidationError(ValueError)`: the client refused the arguments before sending anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "mouse.action.v1"
# Client-side failures after which a request may or may not have reached the server.
_MAYBE_SENT = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
)
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class MouseClientError(Exception):
    """Base of every error the client raises."""


class ValidationError(MouseClientError, ValueError):
    """The client refused a call's arguments (steps, options) before sending anything."""


class SessionClosedError(MouseClientError):
    """The session was closed (by this client or, `SESSION_CLOSED`, on the server); it is never
    reopened. Open a new one."""


class ActionError(MouseClientError):
    """A call failed with a gRPC status.

    `code` is the status, `message` the server's (or gRPC's) text. From the rich details:
    `reason` (e.g. `INVALID_STEPS`, `SEQ_GAP`, `SESSION_NOT_FOUND`), `field` (e.g.
    `steps.obs_continuous`), `step` (index of the step within the request), `entry` (index
    within a batch), `session_id`, and all of `metadata`. `in_doubt` is True when the request
    may or may not have been applied (no answer from the server).

    `earlier` is set when the call failed while re-sending an earlier request of the session
    whose outcome was unknown; the call's own records were then not sent. "pending": that request
    was not applied and stays queued, re-sent first by the session's next call (the server
    refused it only for now, e.g. its deadline passed in the queue, or gave no answer again).
    "dropped": the server refused it for good, so its records are not applied and never will
    be. None: the error concerns the call's own records.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        in_doubt: bool = False,
        earlier: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.in_doubt = in_doubt
        self.earlier = earlier

    @property
    def field(self) -> str | None:
        return self.metadata.get("field")

    @property
    def step(self) -> int | None:
        return _int(self.metadata.get("step"))

    @property
    def entry(self) -> int | None:
        return _int(self.metadata.get("entry"))

    @property
    def session_id(self) -> str | None:
        return self.metadata.get("session_id")

    @property
    def answered(self) -> bool:
        """True when the server itself answered (then the request was not applied)."""
        return not self.in_doubt

    @classmethod
    def from_status(cls, status: status_pb2.Status | Message) -> ActionError:
        """From a `google.rpc.Status` (or the wire-compatible `RequestError`)."""
        if not isinstance(status, status_pb2.Status):
            status = status_pb2.Status.FromString(status.SerializeToString())
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        return cls._with_details(code, status.message, status)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ActionError:
        """From a failed call (blocking or asyncio)."""
        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        message = err.details() if callable(getattr(err, "details", None)) else str(err)
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            status = None
        return cls._with_details(code, message or "", status)

    @classmethod
    def _with_details(
        cls, code: grpc.StatusCode, message: str, status: status_pb2.Status | None
    ) -> ActionError:
        reason, metadata, answered = None, {}, False
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN:
                    reason, answered = info.reason, True
                    metadata.update(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations and "field" not in metadata:
                    metadata["field"] = bad.field_violations[0].field
        in_doubt = not answered and code in _MAYBE_SENT
        return cls(code, message, reason=reason, metadata=metadata, in_doubt=in_doubt)


@dataclass(frozen=True)
class EntryOutcome:
    """What happened to one entry of a group call.

    `status` is "applied" (its action is `action`), "refused" (not applied: `error` says why;
    the entry's records may be corrected and sent again) or "in_doubt" (no answer: the session
    resolves it on its next call).
    """

    index: int
    session_id: str
    status: str
    action: int | None = None
    error: ActionError | None = None

    @property
    def code(self) -> grpc.StatusCode | None:
        return None if self.error is None else self.error.code

    @property
    def message(self) -> str | None:
        return None if self.error is None else self.error.message

    @property
    def field(self) -> str | None:
        return None if self.error is None else self.error.field

    @property
    def step(self) -> int | None:
        return None if self.error is None else self.error.step


class GroupError(ActionError):
    """Some entries of a `SessionGroup` call failed; the others were applied.

    `outcomes` has one `EntryOutcome` per entry of the call (in call order); `failed` lists
    the group indices that were not applied (refused or in doubt). `code`, `message` and the
    details are those of the first failure. The group remembers the applied entries: calling
    again right away with the same records (the failed ones corrected or not) applies each
    record exactly once, and the applied entries get their recorded actions back.
    """

    def __init__(self, outcomes: list[EntryOutcome]) -> None:
        failures = [o for o in outcomes if o.error is not None]
        first = failures[0].error
        assert first is not None
        summary = "; ".join(
            f"entry {o.index} ({o.session_id}): {o.error.code.name}: {o.error.message}"
            for o in failures
            if o.error is not None
        )
        super().__init__(
            first.code,
            f"{len(failures)} of {len(outcomes)} entries failed: {summary}",
            reason=first.reason,
            metadata=first.metadata,
            in_doubt=first.in_doubt,
            earlier=first.earlier,
        )
        self.outcomes = outcomes

    @property
    def failed(self) -> list[int]:
        return [o.index for o in self.outcomes if o.status != "applied"]

    @property
    def applied(self) -> dict[int, int]:
        """Group index -> action, for the entries that were applied."""
        return {o.index: o.action for o in self.outcomes if o.status == "applied" and o.action is not None}


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
