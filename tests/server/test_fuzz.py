"""Fuzzing every RPC with random, malformed and garbage messages (hypothesis).

The server must answer each with a deliberate status (never INTERNAL or UNKNOWN), keep running,
and a canary session driven beside the fuzzing must keep returning exactly the golden actions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mouse_client import ActionClient
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from tests.helpers import golden_cases
from tests.server_process import ServerProcess

CASES = {c.name: c for c in golden_cases()}
CANARY = CASES["llama_gqa_long"]
EXAMPLES = 400  # per test; 7 tests -> 2,800 new cases per run (not derandomized), plus 2 x 200 for updates
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False
)
UPDATE_FUZZ = settings(FUZZ, max_examples=200)
SERVICE = "/mouse.action.v1.ActionService/"
ADMIN = (("authorization", "Bearer fuzz-admin"),)


class Canary:
    """Drives a golden row in a loop on its own session, recording any deviation."""

    def __init__(self, target: str) -> None:
        self.client = ActionClient(target)
        self.stop = threading.Event()
        self.rounds = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = self.client.open_session(CANARY.name, temperature=0.0, recover=False)
        while not self.stop.is_set():
            try:
                got = [session.get_action(CANARY.step_record(1, s)) for s in range(CANARY.steps)]
                if got != CANARY.greedy(1):
                    self.failures.append(f"round {self.rounds}: {got} != {CANARY.greedy(1)}")
                session.reset()
                self.rounds += 1
            except Exception as exc:
                self.failures.append(f"round {self.rounds}: {exc!r}")
                return

    def __enter__(self) -> Canary:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.client.close()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    admin = tmp_path_factory.mktemp("fuzz") / "admin.txt"
    admin.write_text("fuzz-admin\n")
    args = ["--max-sessions", "48", "--idle-timeout", "3", "--max-steps-per-request", "64"]
    args += ["--admin-token-file", str(admin)]
    for case in CASES.values():
        args += ["--model", f"{case.name}={case.checkpoint}"]
    with ServerProcess(*args) as server:
        with Canary(server.target) as canary:
            yield server
        assert server.proc is not None and server.proc.poll() is None, "the server died"
        assert canary.rounds > 0
        assert not canary.failures, canary.failures
    assert "Traceback" not in server.log, server.log[-4000:]


@pytest.fixture(scope="module")
def stub(fuzz_server: ServerProcess) -> Iterator[pb_grpc.ActionServiceStub]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield pb_grpc.ActionServiceStub(channel)


@pytest.fixture(scope="module")
def live_ids(stub: pb_grpc.ActionServiceStub) -> list[str]:
    """A few open sessions so fuzzed steps get past the session lookup."""
    return [stub.OpenSession(pb.OpenSessionRequest(model=name)).session_id for name in CASES]


def expect_handled(call: Any) -> Any:
    try:
        return call()
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, f"{err.code()}: {err.details()}"
        return None


# -- strategies -----------------------------------------------------------------------------------
ints = st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1))
int32s = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
texts = st.one_of(st.sampled_from(["", "default", *CASES]), st.text(max_size=200))


@st.composite
def steps(draw: st.DrawFn) -> pb.Steps:
    n = draw(st.integers(0, 6))
    msg = pb.Steps()
    for name in ("action", "time", "obs_discrete"):
        if draw(st.booleans()):
            getattr(msg, name).extend(draw(st.lists(ints, min_size=n, max_size=n + draw(st.integers(0, 2)))))
    if draw(st.booleans()):
        msg.done.extend(draw(st.lists(int32s | st.integers(-1, 3), min_size=n, max_size=n + 1)))
    for name, width in (("reward", 1), ("obs_continuous", 3)):
        if draw(st.booleans()):
            getattr(msg, name).extend(draw(st.lists(floats, min_size=n * width, max_size=n * width + 2)))
    if draw(st.booleans()):
        msg.obs_image = draw(st.binary(max_size=n * 6 + 3))
    if draw(st.integers(0, 9)) == 0:  # sometimes a very long prefill
        msg.action.extend([1] * 5000)
    return msg


@st.composite
def action_requests(draw: st.DrawFn, ids: list[str]) -> pb.GetActionRequest:
    req = pb.GetActionRequest(
        session_id=draw(st.one_of(st.sampled_from(ids), texts)),
        seq=draw(st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1))),
        steps=draw(steps()),
        return_scores=draw(st.booleans()),
    )
    if draw(st.booleans()):
        req.temperature = draw(floats)
    if draw(st.booleans()):
        req.num_actions = draw(int32s)
    return req


@st.composite
def open_requests(draw: st.DrawFn) -> pb.OpenSessionRequest:
    req = pb.OpenSessionRequest(
        model=draw(texts),
        context_policy=draw(st.integers(-5, 10)),
        session_id=draw(st.one_of(st.just(""), texts)),
    )
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        req.temperature = draw(floats)
    if draw(st.booleans()):
        req.num_actions = draw(int32s)
    if draw(st.booleans()):
        req.max_context_steps = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        req.start_seq = draw(st.integers(0, 2**64 - 1))
    req.on_update = draw(st.integers(-5, 10))
    return req


# -- the fuzz tests -------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_fuzz_get_action(stub: pb_grpc.ActionServiceStub, live_ids: list[str], data: st.DataObject) -> None:
    req = data.draw(action_requests(live_ids))
    expect_handled(lambda: stub.GetAction(req, timeout=30))


@FUZZ
@given(req=open_requests())
def test_fuzz_open_close_reset(stub: pb_grpc.ActionServiceStub, req: pb.OpenSessionRequest) -> None:
    reply = expect_handled(lambda: stub.OpenSession(req, timeout=30))
    target = reply.session_id if reply is not None else req.session_id
    expect_handled(lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=target), timeout=30))
    expect_handled(lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=target), timeout=30))


@FUZZ
@given(data=st.data())
def test_fuzz_batch(stub: pb_grpc.ActionServiceStub, live_ids: list[str], data: st.DataObject) -> None:
    reqs = data.draw(st.lists(action_requests(live_ids), max_size=5))
    reply = expect_handled(lambda: stub.BatchGetAction(pb.BatchGetActionRequest(requests=reqs), timeout=30))
    if reply is not None:
        assert len(reply.results) == len(reqs)
        for result in reply.results:
            if result.HasField("error"):
                assert result.error.code not in (13, 2), result.error.message


@FUZZ
@given(data=st.data())
def test_fuzz_stream(stub: pb_grpc.ActionServiceStub, live_ids: list[str], data: st.DataObject) -> None:
    reqs = data.draw(st.lists(action_requests(live_ids), max_size=4))
    replies = expect_handled(
        lambda: list(stub.StreamActions(iter(pb.StreamActionsRequest(request=r) for r in reqs), timeout=30))
    )
    if replies is not None:
        assert len(replies) == len(reqs)
        assert all(r.error.code not in (13, 2) for r in replies if r.HasField("error"))


@FUZZ
@given(model=texts)
def test_fuzz_model_info(stub: pb_grpc.ActionServiceStub, model: str) -> None:
    expect_handled(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=30))
    expect_handled(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30))


@UPDATE_FUZZ
@given(model=texts, source=texts, revision=texts, tag=texts, admin=st.booleans())
def test_fuzz_update_model(
    stub: pb_grpc.ActionServiceStub, model: str, source: str, revision: str, tag: str, admin: bool
) -> None:
    req = pb.UpdateModelRequest(model=model, source=source, revision=revision, tag=tag)
    expect_handled(lambda: stub.UpdateModel(req, metadata=ADMIN if admin else (), timeout=30))


@UPDATE_FUZZ
@given(
    chunks=st.lists(
        st.builds(
            pb.PushWeightsRequest,
            model=texts,
            tag=texts,
            total_bytes=st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1)),
            sha256=st.one_of(st.text(max_size=70), st.text("0123456789abcdef", min_size=64, max_size=64)),
            data=st.binary(max_size=200),
        ),
        max_size=4,
    )
)
def test_fuzz_push_weights(stub: pb_grpc.ActionServiceStub, chunks: list[pb.PushWeightsRequest]) -> None:
    expect_handled(lambda: stub.PushWeights(iter(chunks), metadata=ADMIN, timeout=30))


METHODS = [
    "ListModels",
    "GetModelInfo",
    "OpenSession",
    "GetAction",
    "BatchGetAction",
    "ResetSession",
    "CloseSession",
    "UpdateModel",
]


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=300))
def test_fuzz_raw_bytes(fuzz_server: ServerProcess, method: str, payload: bytes) -> None:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        call = channel.unary_unary(SERVICE + method)
        expect_handled(lambda: call(payload, timeout=30))


@FUZZ
@given(payloads=st.lists(st.binary(max_size=100), max_size=4))
def test_fuzz_raw_stream(fuzz_server: ServerProcess, payloads: list[bytes]) -> None:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        call = channel.stream_stream(SERVICE + "StreamActions")
        replies = expect_handled(lambda: list(call(iter(payloads), timeout=30)))
        if replies is not None:
            assert len(replies) == len(payloads)
            for raw in replies:
                reply = pb.StreamActionsResponse.FromString(raw)
                assert reply.error.code not in (13, 2), reply.error.message
