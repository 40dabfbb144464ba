"""The client on the server's exactly-once contract: rich error details (field, step, entry),
recovery that keeps the sequence numbering (seeded draws continue as if nothing happened, also
when the replay needs several requests), and sessions closed on the server."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mouse_client import ActionClient, ActionError, GroupError, RetryPolicy, SessionClosedError, encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from tests.helpers import golden_cases
from tests.server_process import ServerProcess, free_port

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")


def restart(args: list[str], port: int) -> ServerProcess:
    """A server on `port` again, right after a kill (retried while the port is still busy)."""
    for _ in range(40):
        try:
            return ServerProcess(*args, port=port).start()
        except RuntimeError as err:
            if "Address already in use" not in str(err):
                raise
            time.sleep(0.5)
    raise RuntimeError(f"port {port} stayed busy")


def row(s: int) -> dict[str, object]:
    return CASE.step_record(0, s % CASE.steps)


def test_refusals_name_field_step_and_entry(golden_server: ServerProcess) -> None:
    with ActionClient(golden_server.target, retry=RetryPolicy(max_attempts=1)) as client:
        session = client.open_session(CASE.name)
        with pytest.raises(ActionError) as info:
            session.get_action([row(0), row(1), {**row(2), "done": 7}])
        err = info.value
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and not err.in_doubt
        assert (err.reason, err.field, err.step) == ("INVALID_STEPS", "steps.done", 2)
        assert err.session_id == session.id and session.seq == 0
        group = client.open_sessions(3, CASE.name)
        with pytest.raises(GroupError) as group_info:
            group.get_actions([row(0), {**row(0), "action": 9}, row(0)])
        entry = group_info.value.outcomes[1]
        assert (entry.field, entry.step, group_info.value.entry) == ("steps.action", 0, 1)
        # the same details, read with grpcio-status from the raw call (as grpcurl shows them)
        req = pb.GetActionRequest(session_id=session.id, seq=1, steps=encode_steps({**row(0), "time": 10**6}))
        with pytest.raises(grpc.RpcError) as raw:
            client.stub(session.id).GetAction(req)
        status = rpc_status.from_call(raw.value)
        assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
        assert {"google.rpc.ErrorInfo", "google.rpc.BadRequest"} <= kinds
        bad = error_details_pb2.BadRequest()
        next(d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)).Unpack(bad)
        assert bad.field_violations[0].field == "steps.time"


def test_seeded_draws_continue_after_a_restart() -> None:
    """A restarted server loses the session; the client reopens it with start_seq and replays
    its history in ceil(13 / 4) requests (`--max-steps-per-request 4`): the sampled actions
    (temperature 1, seed 7) equal those of an uninterrupted session."""
    port = free_port()
    args = ["--model", str(CASE.checkpoint), "--max-steps-per-request", "4"]
    retry = RetryPolicy(max_attempts=1000, max_backoff_s=0.2, timeout_s=60)
    server = ServerProcess(*args, port=port).start()
    try:
        with ActionClient(server.target, retry=retry) as client:
            assert client.model_info().max_steps_per_request == 4
            uninterrupted = client.open_session(seed=7, temperature=1.0)
            expected = [uninterrupted.get_action(row(s)) for s in range(30)]
            session = client.open_session(seed=7, temperature=1.0)
            got = [session.get_action(row(s)) for s in range(12)]
            server.kill()
            server = restart(args, port)
            got += [session.get_action(row(s)) for s in range(12, 30)]
            assert session.recoveries == 1 and session.seq == 30
    finally:
        server.stop()
    assert got == expected
    assert len(set(expected)) > 1  # really sampled


def test_session_closed_on_the_server_is_never_reopened(golden_server: ServerProcess) -> None:
    with ActionClient(golden_server.target) as client, ActionClient(golden_server.target) as other:
        session = client.open_session(CASE.name)
        session.get_action(row(0))
        other.stub(session.id).CloseSession(pb.CloseSessionRequest(session_id=session.id))
        with pytest.raises(ActionError) as info:
            session.get_action(row(1))
        assert info.value.reason == "SESSION_CLOSED" and session.recoveries == 0
        with pytest.raises(SessionClosedError):
            session.get_action(row(1))
