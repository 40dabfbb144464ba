"""ActionService behaviour on a real server: sessions, retries, errors, streams, batches."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mouse_client import ActionClient, ActionError, SessionClosedError, encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from tests.helpers import GoldenCase
from tests.server.conftest import CASES
from tests.server_process import ServerProcess

LLAMA = next(c for c in CASES if c.name == "llama_sum_dqn")
VARIED = next(c for c in CASES if c.name == "llama_gqa_long")  # greedy actions vary


@pytest.fixture
def stub(golden_server: ServerProcess) -> Iterator[pb_grpc.ActionServiceStub]:
    channel = grpc.insecure_channel(golden_server.target)
    yield pb_grpc.ActionServiceStub(channel)
    channel.close()


def open_raw(stub: pb_grpc.ActionServiceStub, model: str = LLAMA.name, **kw: object) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model, **kw)).session_id


def step_msg(case: GoldenCase, b: int, s: int, **overrides: object) -> pb.Steps:
    record = {**case.step_record(b, s), **overrides}
    return encode_steps({k: v for k, v in record.items() if v is not None})


def code_of(fn: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code(), info.value.details()


# -- models, health, reflection ---------------------------------------------------------------
def test_list_and_describe_models(client: ActionClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {c.name for c in CASES}
    info = client.model_info(LLAMA.name)
    assert [f.name for f in info.fields] == ["time", "action", "obs_continuous", "reward", "done"]
    assert info.max_num_actions == 4 and info.tokens_per_step == 3 and info.action_head == "dqn"
    assert info.backbone == "llama" and info.dtype == "float32" and info.device == "cpu"
    cont = next(f for f in info.fields if f.name == "obs_continuous")
    assert cont.kind == pb.FIELD_KIND_FLOAT and cont.width == 3
    assert next(f for f in info.fields if f.name == "time").max_value == 64
    with pytest.raises(ActionError, match="NOT_FOUND: model 'nope' is not served here"):
        client.model_info("nope")


def test_health_and_reflection(golden_server: ServerProcess) -> None:
    with grpc.insecure_channel(golden_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mouse.action.v1.ActionService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "mouse.action.v1.ActionService" in services
        assert "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol("mouse.action.v1.ActionService")
        assert desc.package == "mouse.action.v1"


# -- sequence numbers and retries ---------------------------------------------------------------
def test_retry_of_the_last_seq_returns_the_same_reply(stub: pb_grpc.ActionServiceStub) -> None:
    sid = open_raw(stub, VARIED.name, temperature=0.0)
    first = stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(VARIED, 0, 0)))
    again = stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(VARIED, 0, 0)))
    assert again == first and first.context_steps == 1
    second = stub.GetAction(pb.GetActionRequest(session_id=sid, seq=2, steps=step_msg(VARIED, 0, 1)))
    assert second.context_steps == 2  # the retry did not touch the cache
    assert [first.action, second.action] == VARIED.greedy(0)[:2]
    code, msg = code_of(
        lambda: stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(VARIED, 0, 2)))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "seq 1 was already applied; the session is at seq 2" in msg
    code, msg = code_of(
        lambda: stub.GetAction(pb.GetActionRequest(session_id=sid, seq=4, steps=step_msg(VARIED, 0, 2)))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "seq 4 skips ahead: the session is at seq 2; send seq 3" in msg
    auto = stub.GetAction(pb.GetActionRequest(session_id=sid, seq=0, steps=step_msg(VARIED, 0, 2)))
    assert auto.seq == 3 and auto.action == VARIED.greedy(0)[2]


# -- reset and close ----------------------------------------------------------------------------
def test_reset_clears_history_and_keeps_settings(client: ActionClient) -> None:
    with client.open_session(VARIED.name, temperature=0.0) as session:
        first = [session.get_action(VARIED.step_record(0, s)) for s in range(4)]
        session.reset()
        again = [session.get_action(VARIED.step_record(0, s)) for s in range(4)]
        assert first == again == VARIED.greedy(0)[:4]
        assert session.seq == 8  # sequence numbers continue across a reset


def test_close_frees_the_session(client: ActionClient) -> None:
    session = client.open_session(LLAMA.name, recover=False)
    session.close()
    with pytest.raises(SessionClosedError):  # the client refuses at once, and never reopens it
        session.get_action(LLAMA.step_record(0, 0))
    req = pb.GetActionRequest(session_id=session.id, seq=1, steps=encode_steps(LLAMA.step_record(0, 0)))
    with pytest.raises(grpc.RpcError) as info:
        client.stub(session.id).GetAction(req)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "was closed" in (info.value.details() or "")
    session.close()  # closing twice is harmless


# -- sampling -----------------------------------------------------------------------------------
def test_seeded_sampling_is_the_same_alone_and_batched(client: ActionClient) -> None:
    steps = [VARIED.step_record(0, s) for s in range(VARIED.steps)]
    with client.open_session(VARIED.name, seed=1234, temperature=1.0) as alone:
        solo = [alone.get_action(r) for r in steps]
    with client.open_sessions(6, VARIED.name, seed=1230, temperature=1.0) as group:  # member 4 has seed 1234
        batched = [group.get_actions([steps[s]] * 6) for s in range(VARIED.steps)]
    assert [int(b[4]) for b in batched] == solo
    assert len({tuple(int(b[i]) for b in batched) for i in range(6)}) > 1  # other seeds differ
    assert len(set(solo)) > 1  # temperature 1 really samples


def test_temperature_and_num_actions_per_request(client: ActionClient) -> None:
    with client.open_session(VARIED.name, seed=5) as session:
        reply = session.get_reply(VARIED.step_record(0, 0), temperature=0.0, num_actions=2)
        assert len(reply.scores) == 2 and reply.action == int(np.argmax(reply.scores))
        for s in range(1, VARIED.steps):
            assert session.get_action(VARIED.step_record(0, s), num_actions=1) == 0


# -- streams and batches ----------------------------------------------------------------------
def test_stream_answers_each_request_and_reports_errors_in_band(stub: pb_grpc.ActionServiceStub) -> None:
    sid = open_raw(stub, VARIED.name, temperature=0.0)
    requests = [
        pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(VARIED, 1, 0)),
        pb.GetActionRequest(session_id=sid, seq=2, steps=step_msg(VARIED, 1, 1, action=99)),  # bad
        pb.GetActionRequest(session_id=sid, seq=2, steps=step_msg(VARIED, 1, 1)),
        pb.GetActionRequest(session_id="missing", seq=1, steps=step_msg(VARIED, 1, 1)),
        pb.GetActionRequest(session_id=sid, seq=3, steps=step_msg(VARIED, 1, 2)),
    ]
    replies = list(stub.StreamActions(iter(pb.StreamActionsRequest(request=r) for r in requests)))
    assert len(replies) == 5
    by_seq = {(r.session_id, r.seq, r.HasField("error")): r for r in replies}
    assert by_seq[(sid, 1, False)].response.action == VARIED.greedy(1)[0]
    bad = by_seq[(sid, 2, True)].error
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "steps.action: got 99" in bad.message
    assert by_seq[(sid, 2, False)].response.action == VARIED.greedy(1)[1]
    assert by_seq[("missing", 1, True)].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_seq[(sid, 3, False)].response.action == VARIED.greedy(1)[2]


def test_batch_reports_per_item_errors_in_order(stub: pb_grpc.ActionServiceStub) -> None:
    a, b = open_raw(stub, VARIED.name, temperature=0.0), open_raw(stub, VARIED.name, temperature=0.0)
    reply = stub.BatchGetAction(
        pb.BatchGetActionRequest(
            requests=[
                pb.GetActionRequest(session_id=a, seq=1, steps=step_msg(VARIED, 0, 0)),
                pb.GetActionRequest(session_id=b, seq=1, steps=step_msg(VARIED, 1, 0, reward=float("nan"))),
                pb.GetActionRequest(session_id=b, seq=1, steps=step_msg(VARIED, 1, 0)),
            ]
        )
    )
    first, bad, ok = reply.results
    assert first.response.action == VARIED.greedy(0)[0]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "steps.reward: got nan; expected finite floats" in bad.error.message
    assert ok.response.action == VARIED.greedy(1)[0] and ok.response.context_steps == 1


def test_batch_entries_of_one_session_apply_in_order(stub: pb_grpc.ActionServiceStub) -> None:
    """Entries of distinct idle sessions are applied together; a batch that names a session
    twice applies each entry in its order (the second waits for the first), and an entry that
    repeats the one before it is its retry."""
    a, b = open_raw(stub, VARIED.name, temperature=0.0), open_raw(stub, VARIED.name, temperature=0.0)

    def entry(session: str, seq: int, row: int, s: int) -> pb.GetActionRequest:
        return pb.GetActionRequest(session_id=session, seq=seq, steps=step_msg(VARIED, row, s))

    reply = stub.BatchGetAction(
        pb.BatchGetActionRequest(
            requests=[entry(a, 1, 0, 0), entry(b, 1, 1, 0), entry(a, 2, 0, 1), entry(a, 2, 0, 1)]
        )
    )
    first, other, second, retried = (r.response for r in reply.results)
    assert [first.action, second.action] == VARIED.greedy(0)[:2]
    assert (first.context_steps, second.context_steps) == (1, 2)
    assert other.action == VARIED.greedy(1)[0] and other.context_steps == 1
    assert retried == second
    # the sessions go on from there, now together again
    reply = stub.BatchGetAction(pb.BatchGetActionRequest(requests=[entry(a, 3, 0, 2), entry(b, 2, 1, 1)]))
    assert [r.response.action for r in reply.results] == [VARIED.greedy(0)[2], VARIED.greedy(1)[1]]
    assert [r.response.context_steps for r in reply.results] == [3, 2]


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "code", "message"),
    [
        (pb.Steps(), grpc.StatusCode.INVALID_ARGUMENT, "steps is empty"),
        (
            {"obs_image": b"\x01"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "steps.obs_image is set but model 'llama_sum_dqn' does not use it",
        ),
        (
            {"obs_continuous": [0.0] * 4},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"steps.obs_continuous has 4 values; expected 3",
        ),
        ({"obs_continuous": []}, grpc.StatusCode.INVALID_ARGUMENT, "steps.obs_continuous is missing"),
        (
            {"time": [64]},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"steps.time: got 64; expected an integer in \[0, 64\)",
        ),
        (
            {"done": [3]},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"steps.done: got 3; expected an integer in \[0, 3\)",
        ),
        ({"action": [-1]}, grpc.StatusCode.INVALID_ARGUMENT, r"steps.action: got -1"),
        ({"reward": [float("inf")]}, grpc.StatusCode.INVALID_ARGUMENT, "steps.reward: got inf"),
        ({"action": [1, 2]}, grpc.StatusCode.INVALID_ARGUMENT, r"steps.action has 2 values; expected 1"),
    ],
)
def test_bad_steps_are_refused_and_the_session_stays_usable(
    stub: pb_grpc.ActionServiceStub, steps: object, code: grpc.StatusCode, message: str
) -> None:
    sid = open_raw(stub, LLAMA.name, temperature=0.0)
    msg = steps if isinstance(steps, pb.Steps) else step_msg(LLAMA, 0, 0)
    if isinstance(steps, dict):
        for name, value in steps.items():
            if name == "obs_image":
                msg.obs_image = value
            else:
                getattr(msg, name)[:] = value
    got_code, details = code_of(lambda: stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=msg)))
    assert got_code == code
    assert re.search(message, details), details
    good = stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(LLAMA, 0, 0)))
    assert good.context_steps == 1 and good.action == LLAMA.greedy(0)[0]


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.OpenSessionRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served here"),
        (
            pb.OpenSessionRequest(model=LLAMA.name, temperature=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature must be",
        ),
        (
            pb.OpenSessionRequest(model=LLAMA.name, num_actions=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"num_actions must be in \[1, 4\]",
        ),
        (
            pb.OpenSessionRequest(model=LLAMA.name, max_context_steps=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_context_steps must be in",
        ),
        (
            pb.OpenSessionRequest(model=LLAMA.name, session_id="bad id!"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "session_id 'bad id!' is malformed",
        ),
        (
            pb.OpenSessionRequest(model=LLAMA.name, context_policy=7),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context_policy 7 is unknown",
        ),
    ],
)
def test_bad_open_requests(
    stub: pb_grpc.ActionServiceStub, request_: pb.OpenSessionRequest, code: grpc.StatusCode, message: str
) -> None:
    got_code, details = code_of(lambda: stub.OpenSession(request_))
    assert got_code == code
    assert re.search(message, details), details


def test_colliding_session_id_and_header_mismatch(stub: pb_grpc.ActionServiceStub) -> None:
    open_raw(stub, session_id="fixed-id-1")
    code, msg = code_of(lambda: open_raw(stub, session_id="fixed-id-1"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already in use" in msg
    code, msg = code_of(
        lambda: stub.GetAction(
            pb.GetActionRequest(session_id="fixed-id-1", seq=1, steps=step_msg(LLAMA, 0, 0)),
            metadata=(("mouse-session-id", "other"),),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in msg


def test_unknown_session_and_bad_overrides(stub: pb_grpc.ActionServiceStub) -> None:
    code, msg = code_of(
        lambda: stub.GetAction(pb.GetActionRequest(session_id="nope", seq=1, steps=step_msg(LLAMA, 0, 0)))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "session 'nope' does not exist" in msg
    code, msg = code_of(lambda: stub.GetAction(pb.GetActionRequest(seq=1, steps=step_msg(LLAMA, 0, 0))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id is empty" in msg
    sid = open_raw(stub)
    code, msg = code_of(
        lambda: stub.GetAction(
            pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(LLAMA, 0, 0), num_actions=0)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_actions must be in [1, 4], got 0" in msg
    code, msg = code_of(
        lambda: stub.GetAction(
            pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(LLAMA, 0, 0), temperature=float("nan"))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature must be a finite number" in msg
    assert stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=step_msg(LLAMA, 0, 0))).seq == 1


# -- limits: pool, expiry, context --------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerProcess]:
    args = [
        "--model",
        str(VARIED.checkpoint),
        "--max-sessions",
        "2",
        "--idle-timeout",
        "1.5",
        "--max-context-steps",
        "8",
    ]
    with ServerProcess(*args) as server:
        yield server


def test_pool_full_is_resource_exhausted(small_server: ServerProcess) -> None:
    with ActionClient(small_server.target) as client:
        a, b = client.open_session(), client.open_session()
        with pytest.raises(
            ActionError, match="RESOURCE_EXHAUSTED: all 2 sessions of model 'default' are in use"
        ):
            client.open_session()
        assert a.get_action(VARIED.step_record(0, 0), temperature=0.0) == VARIED.greedy(0)[0]
        a.close()
        c = client.open_session()
        b.close()
        c.close()


def test_idle_sessions_expire(small_server: ServerProcess) -> None:
    with ActionClient(small_server.target) as client:
        session = client.open_session(recover=False)
        busy = client.open_session(recover=False)
        for s in range(6):  # keeps `busy` active past the timeout
            busy.get_action(VARIED.step_record(0, s))
            time.sleep(0.5)
        with pytest.raises(ActionError, match="NOT_FOUND"):
            session.get_action(VARIED.step_record(0, 0))
        busy.get_action(VARIED.step_record(0, 6))
        busy.close()
        client.open_session().close()  # the expired slot is free again


def _scores(session: object, records: list[dict[str, object]]) -> list[float]:
    return list(session.get_reply(records, temperature=0.0).scores)  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", ["sliding", "reset", "reject"])
def test_context_limit_policies(small_server: ServerProcess, policy: str) -> None:
    """At 8 steps the session re-prefills its last 4 (sliding), starts over (reset) or refuses."""
    records = [VARIED.step_record(0, s) for s in range(VARIED.steps)]
    with ActionClient(small_server.target) as client:
        session = client.open_session(context_policy=policy, temperature=0.0)
        reference = client.open_session(temperature=0.0)
        for s in range(8):
            session.get_action(records[s])
        if policy == "reject":
            with pytest.raises(
                ActionError, match="FAILED_PRECONDITION: session .* holds 8 of 8 context steps"
            ):
                session.get_action(records[8])
            session.reset()
            with pytest.raises(ActionError, match="INVALID_ARGUMENT: steps carries 9 steps") as info:
                session.get_action(records[:9])  # longer than the whole context: never fits
            assert info.value.reason == "STEPS_EXCEED_CONTEXT" and info.value.field == "steps"
            assert session.get_reply(records[8]).context_steps == 1
        else:
            reply = session.get_reply(records[8])
            assert reply.context_truncated
            window = records[5:9] if policy == "sliding" else records[8:9]
            assert reply.context_steps == len(window)
            assert list(reply.scores) == pytest.approx(_scores(reference, window), rel=1e-4, abs=1e-5)
            nxt = session.get_reply(records[9])
            assert not nxt.context_truncated and nxt.context_steps == len(window) + 1
        session.close()
        reference.close()


def test_prefill_longer_than_the_context_keeps_its_tail(small_server: ServerProcess) -> None:
    records = [VARIED.step_record(1, s) for s in range(12)]
    with ActionClient(small_server.target) as client:
        long = client.open_session(temperature=0.0)
        reply = long.get_reply(records)
        assert reply.context_steps == 8 and reply.context_truncated
        reference = client.open_session(temperature=0.0)
        assert list(reply.scores) == pytest.approx(_scores(reference, records[4:]), rel=1e-4, abs=1e-5)
        long.close()
        reference.close()


def test_many_threads_one_session_each(client: ActionClient) -> None:
    """Concurrent workers never see each other's actions."""
    errors: list[BaseException] = []

    def worker(b: int) -> None:
        try:
            with client.open_session(VARIED.name, temperature=0.0) as s:
                assert [s.get_action(VARIED.step_record(b, t)) for t in range(VARIED.steps)] == VARIED.greedy(
                    b
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i % VARIED.batch,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
