"""Exactly-once on the server, over raw gRPC stubs: a seq is applied once with one content, every
refusal says why (rich details: reason, field, step, batch entry), closed and expired sessions
say so, a session can start after a given seq, and a session's queue is bounded."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mouse_client import encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from tests.helpers import GoldenCase
from tests.server.conftest import CASES
from tests.server_process import ServerProcess, total

VARIED = next(c for c in CASES if c.name == "llama_gqa_long")  # greedy actions vary
LLAMA = next(c for c in CASES if c.name == "llama_sum_dqn")  # has a vector field (obs_continuous)


@pytest.fixture
def stub(golden_server: ServerProcess) -> Iterator[pb_grpc.ActionServiceStub]:
    channel = grpc.insecure_channel(golden_server.target)
    yield pb_grpc.ActionServiceStub(channel)
    channel.close()


def steps_of(case: GoldenCase, b: int, first: int, n: int = 1, **overrides: object) -> pb.Steps:
    records = [{**case.step_record(b, s), **overrides} for s in range(first, first + n)]
    return encode_steps(records)


def cycled(n: int) -> pb.Steps:
    """`n` steps cycling through the case's first row (a longer history than the case has)."""
    return encode_steps([VARIED.step_record(0, s % VARIED.steps) for s in range(n)])


def request(sid: str, seq: int, steps: pb.Steps, **kw: object) -> pb.GetActionRequest:
    return pb.GetActionRequest(session_id=sid, seq=seq, steps=steps, **kw)


def open_session(stub: pb_grpc.ActionServiceStub, **kw: object) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=VARIED.name, temperature=0.0, **kw)).session_id


def details(error: pb.RequestError | grpc.Call) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """(ErrorInfo, BadRequest fields) of a RequestError or a failed unary call."""
    status = error if isinstance(error, pb.RequestError) else rpc_status.from_call(error)
    assert status is not None, "the status carries no rich details"
    info, fields = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert info is not None and info.domain == "mouse.action.v1"
    return info, fields


def refused(fn: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value


# -- a seq is applied once, with one content ----------------------------------------------------
def test_a_repeated_seq_with_other_steps_is_refused_not_answered_from_the_cache(
    stub: pb_grpc.ActionServiceStub,
) -> None:
    sid = open_session(stub)
    first = stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0)))
    assert stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0))) == first  # a true retry
    for other in (
        request(sid, 1, steps_of(VARIED, 0, 1)),  # the next step under the old seq (issue 10, #2/#3)
        request(sid, 1, steps_of(VARIED, 0, 0), temperature=1.0),  # other options
        request(sid, 1, steps_of(VARIED, 0, 0), return_scores=True),
    ):
        err = refused(lambda other=other: stub.GetAction(other))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already applied with other steps or options" in err.details()
        info, _ = details(err)
        assert info.reason == "SEQ_CONTENT_MISMATCH"
        assert info.metadata["last_seq"] == "1" and info.metadata["session_id"] == sid
    reply = stub.GetAction(request(sid, 2, steps_of(VARIED, 0, 1)))
    assert reply.context_steps == 2 and reply.action == VARIED.greedy(0)[1]


def test_seq_errors_name_the_session_position(stub: pb_grpc.ActionServiceStub) -> None:
    sid = open_session(stub)
    stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0)))
    stub.GetAction(request(sid, 2, steps_of(VARIED, 0, 1)))
    for seq, reason in ((1, "SEQ_ALREADY_APPLIED"), (4, "SEQ_GAP")):
        err = refused(lambda seq=seq: stub.GetAction(request(sid, seq, steps_of(VARIED, 0, 2))))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _ = details(err)
        assert info.reason == reason and info.metadata["last_seq"] == "2"


def test_start_seq_continues_the_numbering_and_the_seeded_draws(stub: pb_grpc.ActionServiceStub) -> None:
    """A session reopened after seq k (a client restoring a lost session) numbers its requests
    k+1, ...; its sampled actions equal those of a session that never stopped."""
    n = VARIED.steps

    def sampled(sid: str, first_seq: int, first_step: int) -> list[int]:
        return [
            stub.GetAction(request(sid, first_seq + i, steps_of(VARIED, 0, s))).action
            for i, s in enumerate(range(first_step, n))
        ]

    kw = {"seed": 7, "temperature": 1.5}
    whole = sampled(stub.OpenSession(pb.OpenSessionRequest(model=VARIED.name, **kw)).session_id, 1, 0)
    k = n // 2
    opened = stub.OpenSession(pb.OpenSessionRequest(model=VARIED.name, start_seq=k, **kw))
    assert opened.start_seq == k
    sid = opened.session_id
    # the first k steps replayed in one prefill carrying the step of seq k+1, then on as before
    replay = stub.GetAction(request(sid, k + 1, steps_of(VARIED, 0, 0, k + 1)))
    assert replay.seq == k + 1 and replay.context_steps == k + 1
    assert [replay.action, *sampled(sid, k + 2, k + 1)] == whole[k:]
    err = refused(lambda: stub.GetAction(request(sid, k, steps_of(VARIED, 0, 0))))
    assert details(err)[0].reason == "SEQ_ALREADY_APPLIED"


# -- rich error details ---------------------------------------------------------------------------
def test_a_bad_value_in_a_prefill_names_the_field_and_the_step(stub: pb_grpc.ActionServiceStub) -> None:
    sid = open_session(stub)
    # 20 values are past codec.SMALL_COLUMN: that column is read and checked as an array
    errors = []
    for n, bad in ((5, 3), (VARIED.steps, VARIED.steps - 2)):
        records = [VARIED.step_record(0, s) for s in range(n)]
        records[bad] = {**records[bad], "action": 99}
        err = refused(lambda records=records: stub.GetAction(request(sid, 1, encode_steps(records))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"steps.action at step {bad} of {n}: got 99; expected an integer in [0, 4)." in err.details()
        errors.append(err)
    info, fields = details(errors[0])
    assert info.reason == "INVALID_STEPS"
    assert info.metadata["field"] == "steps.action" and info.metadata["step"] == "3"
    assert info.metadata["seq"] == "1" and fields == ["steps.action"]
    # a vector field: the step is the value's row
    records = [LLAMA.step_record(0, s) for s in range(3)]
    records[2] = {**records[2], "obs_continuous": [0.0, float("nan"), 0.0]}
    vector_sid = stub.OpenSession(pb.OpenSessionRequest(model=LLAMA.name)).session_id
    info, _ = details(refused(lambda: stub.GetAction(request(vector_sid, 1, encode_steps(records)))))
    assert info.metadata["field"] == "steps.obs_continuous" and info.metadata["step"] == "2"
    # nothing was applied: seq 1 is still free
    assert stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0))).context_steps == 1


def test_a_missing_first_field_is_named(stub: pb_grpc.ActionServiceStub) -> None:
    sid = open_session(stub)
    record = {k: v for k, v in VARIED.step_record(0, 0).items() if k != "time"}
    err = refused(lambda: stub.GetAction(request(sid, 1, encode_steps(record))))
    assert "steps.time is missing" in err.details()
    assert details(err)[0].metadata["field"] == "steps.time"
    err = refused(lambda: stub.GetAction(request(sid, 1, pb.Steps())))
    assert "steps is empty" in err.details()


def test_batch_and_stream_errors_carry_the_details_and_the_entry(stub: pb_grpc.ActionServiceStub) -> None:
    sids = [open_session(stub) for _ in range(4)]
    reqs = [request(sid, 1, steps_of(VARIED, 0, 0)) for sid in sids]
    reqs[1] = request(sids[1], 1, steps_of(VARIED, 0, 0, action=99))
    results = stub.BatchGetAction(pb.BatchGetActionRequest(requests=reqs)).results
    assert [r.WhichOneof("result") for r in results] == ["response", "error", "response", "response"]
    info, fields = details(results[1].error)
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert info.metadata["entry"] == "1" and info.metadata["session_id"] == sids[1]
    assert fields == ["steps.action"]
    replies = list(stub.StreamActions(iter([pb.StreamActionsRequest(request=reqs[1])])))
    info, _ = details(replies[0].error)
    assert info.reason == "INVALID_STEPS" and "entry" not in info.metadata


# -- sessions that are gone say why ---------------------------------------------------------------
def test_closed_unknown_and_expired_sessions_say_why(golden_server: ServerProcess) -> None:
    with grpc.insecure_channel(golden_server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        sid = open_session(stub)
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        for call in (
            lambda: stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0))),
            lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=sid)),
        ):
            err = refused(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND and "was closed" in err.details()
            assert details(err)[0].reason == "SESSION_CLOSED"
        err = refused(lambda: stub.GetAction(request("never-opened", 1, steps_of(VARIED, 0, 0))))
        assert details(err)[0].reason == "SESSION_NOT_FOUND"
    args = ["--model", f"{VARIED.name}={VARIED.checkpoint}", "--idle-timeout", "0.5"]
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        sid = open_session(stub)
        server.wait_for("expired 1 idle session")
        err = refused(lambda: stub.GetAction(request(sid, 1, steps_of(VARIED, 0, 0))))
        assert details(err)[0].reason == "SESSION_EXPIRED" and "expired after 0.5s idle" in err.details()


# -- a session's queue is bounded -----------------------------------------------------------------
def test_a_session_queue_is_bounded_and_stays_consistent(tmp_path: object) -> None:
    """More concurrent requests of one session than it may queue: the excess is refused with
    RESOURCE_EXHAUSTED, the rest apply in seq order, and the context holds each once."""
    args = ["--model", f"{VARIED.name}={VARIED.checkpoint}", "--max-pending-per-session", "2"]
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        sid = open_session(stub)
        n = 24
        futures = [stub.GetAction.future(request(sid, 0, cycled(50))) for _ in range(n)]
        outcomes: list[object] = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except grpc.RpcError as err:
                outcomes.append(err)
        applied = [o for o in outcomes if isinstance(o, pb.GetActionResponse)]
        refusals = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert refusals and applied
        for err in refusals:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(err)[0].reason == "SESSION_QUEUE_FULL"
        assert sorted(r.seq for r in applied) == list(range(1, len(applied) + 1))
        last = stub.GetAction(request(sid, 0, steps_of(VARIED, 0, 0)))
        assert last.seq == len(applied) + 1
        limit = stub.GetModelInfo(pb.GetModelInfoRequest(model=VARIED.name)).model.max_context_steps
        assert last.context_steps == min(50 * len(applied) + 1, limit) or last.context_truncated


# -- streams are flow-controlled ------------------------------------------------------------------
def test_a_stream_holds_a_bounded_number_of_requests_and_others_are_served() -> None:
    """A client floods one stream with prefills for many sessions and never reads the replies:
    the server holds at most --max-requests-per-stream of them at a time (the queue for the
    model never grows past it; without the bound it reaches one per session), and another
    session is served meanwhile with the golden actions."""
    args = ["--model", f"{VARIED.name}={VARIED.checkpoint}", "--max-sessions", "40"]
    args += ["--max-requests-per-stream", "4"]
    with ServerProcess(*args, metrics=True) as server, grpc.insecure_channel(server.target) as flood_channel:
        stub = pb_grpc.ActionServiceStub(flood_channel)
        sids = [open_session(stub) for _ in range(32)]
        stop = threading.Event()
        prefill = cycled(40)

        def flood() -> Iterator[pb.StreamActionsRequest]:
            i = 0
            while not stop.is_set():
                yield pb.StreamActionsRequest(request=request(sids[i % len(sids)], 0, prefill))
                i += 1

        call = stub.StreamActions(flood())  # the replies are never read
        try:
            lengths = []
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                lengths.append(total(server.scrape(), "mouse_queue_length", model=VARIED.name))
            assert 0 < max(lengths) <= 4, lengths
            with grpc.insecure_channel(server.target) as channel:
                other = pb_grpc.ActionServiceStub(channel)
                victim = open_session(other)
                for s in range(VARIED.steps):
                    reply = other.GetAction(request(victim, s + 1, steps_of(VARIED, 0, s)), timeout=60)
                    assert reply.action == VARIED.greedy(0)[s]
        finally:
            stop.set()
            call.cancel()


class _StreamCall:
    """A `StreamActions` call fed from a queue, its replies read into another by a thread."""

    def __init__(self, stub: pb_grpc.ActionServiceStub, sid: str) -> None:
        self.sid, self.seq = sid, 0
        self.requests: queue.SimpleQueue[pb.StreamActionsRequest | None] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.call = stub.StreamActions(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
            self.replies.put("end")
        except grpc.RpcError as err:
            self.replies.put(err)

    def send(self, step: int) -> None:
        self.seq += 1
        self.requests.put(
            pb.StreamActionsRequest(request=request(self.sid, self.seq, steps_of(VARIED, 0, step)))
        )

    def reply(self, timeout: float = 10.0) -> pb.GetActionResponse:
        msg = self.replies.get(timeout=timeout)
        assert isinstance(msg, pb.StreamActionsResponse) and msg.WhichOneof("result") == "response", msg
        assert (msg.session_id, msg.seq) == (self.sid, self.seq)
        return msg.response


def test_calls_past_the_per_connection_stream_bound_wait_for_a_free_stream() -> None:
    """`--max-streams-per-connection 2` is the HTTP/2 MAX_CONCURRENT_STREAMS setting: grpcio's
    client queues calls past it on that connection (nothing is refused): a third stream, and a
    unary call, wait while two streams are open and keep working; the queued stream starts when
    one of them ends. A channel with a connection of its own is served meanwhile. (grpcio shares
    one connection between channels with the same target and arguments: such a channel waits
    too.)"""
    args = ["--model", f"{VARIED.name}={VARIED.checkpoint}", "--max-streams-per-connection", "2"]
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        sids = [open_session(stub) for _ in range(4)]
        streams = [_StreamCall(stub, sid) for sid in sids[:2]]
        for s in streams:
            s.send(0)
        assert [s.reply().action for s in streams] == [VARIED.greedy(0)[0]] * 2
        extra = _StreamCall(stub, sids[2])
        extra.send(0)
        with pytest.raises(queue.Empty):
            extra.replies.get(timeout=1.0)  # held back, not refused
        err = refused(lambda: stub.GetAction(request(sids[3], 1, steps_of(VARIED, 0, 0)), timeout=0.5))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # a unary call waits for a stream too
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.target, options=options) as own:
            other = pb_grpc.ActionServiceStub(own)
            assert other.GetAction(request(sids[3], 1, steps_of(VARIED, 0, 0)), timeout=10).context_steps == 1
            # the queued stream's request has not reached its session
            err = refused(lambda: other.GetAction(request(sids[2], 2, steps_of(VARIED, 0, 1)), timeout=10))
            info, _ = details(err)
            assert info.reason == "SEQ_GAP" and info.metadata["last_seq"] == "0"
        for step in range(1, 4):  # the two open streams keep working
            for s in streams:
                s.send(step)
            replies = [s.reply() for s in streams]
            assert [r.action for r in replies] == [VARIED.greedy(0)[step]] * 2
            assert [r.context_steps for r in replies] == [step + 1] * 2
        assert extra.replies.empty()
        streams[0].requests.put(None)  # the first stream ends: the queued one starts
        assert streams[0].replies.get(timeout=10) == "end"
        reply = extra.reply()
        assert (reply.context_steps, reply.action) == (1, VARIED.greedy(0)[0])
        extra.send(1)
        assert extra.reply().action == VARIED.greedy(0)[1]
        for s in (streams[1], extra):
            s.requests.put(None)
            assert s.replies.get(timeout=10) == "end"
