"""The Prometheus endpoint, scraped during real traffic."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from mouse_client import ActionClient, ActionError, encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from tests.helpers import golden_cases
from tests.server_process import ServerProcess, total

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--model", str(CASE.checkpoint), "--max-sessions", "8", metrics=True) as proc:
        yield proc


def test_metrics_move_with_traffic(server: ServerProcess) -> None:
    before = server.scrape()
    assert total(before, "mouse_active_sessions", model="default") == 0
    pool = total(before, "mouse_kv_pool_bytes", model="default", state="total")
    assert pool > 0 and total(before, "mouse_kv_pool_bytes", model="default", state="used") == 0
    assert (
        total(
            before,
            "mouse_model_info",
            model="default",
            source=str(CASE.checkpoint),
            backbone="llama",
            dtype="float32",
            device="cpu",
            action_head="dqn",
        )
        == 1
    )
    assert total(before, "mouse_model_parameters", model="default") > 0

    with ActionClient(server.target) as client:
        group = client.open_sessions(3, temperature=0.0)
        for s in range(5):
            group.get_actions([CASE.step_record(0, s)] * 3)
        during = server.scrape()
        assert total(during, "mouse_active_sessions", model="default") == 3
        used = total(during, "mouse_kv_pool_bytes", model="default", state="used")
        assert used == pytest.approx(pool * 3 / (8 + 1))  # 8 sessions plus the scratch slot
        assert total(during, "mouse_session_events_total", model="default", event="opened") == 3
        assert total(during, "mouse_actions_total", model="default") == 15
        assert total(during, "mouse_requests_total", method="BatchGetAction", code="OK") == 15
        assert total(during, "mouse_requests_total", method="BatchGetActionCall", code="OK") == 5
        assert total(during, "mouse_queue_wait_seconds_count", model="default") == 15
        assert (
            total(during, "mouse_batch_size_count", model="default") == 5
        )  # the 3 sessions shared each forward
        assert total(during, "mouse_batch_size_sum", model="default") == 15
        assert total(during, "mouse_model_seconds_count", model="default") == 5
        assert total(during, "mouse_model_seconds_sum", model="default") > 0
        assert total(during, "mouse_request_seconds_count", method="OpenSession") == 3
        # stages count each batch entry as a request; buckets are cumulative up to the count
        for stage in ("validate", "step", "reply"):
            assert total(during, "mouse_request_stage_seconds_count", stage=stage) == 15
            buckets = sorted(
                (float(dict(labels)["le"]), v)
                for (name, labels), v in during.items()
                if name == "mouse_request_stage_seconds_bucket" and dict(labels)["stage"] == stage
            )
            counts = [v for _, v in buckets]
            assert buckets[-1] == (float("inf"), 15) and counts == sorted(counts)

        with pytest.raises(ActionError):
            group[0].get_action({**CASE.step_record(0, 5), "done": 7})
        group[0].close()
        after = server.scrape()
        assert total(after, "mouse_requests_total", method="GetAction", code="INVALID_ARGUMENT") == 1
        assert total(after, "mouse_active_sessions", model="default") == 2
        assert total(after, "mouse_session_events_total", model="default", event="closed") == 1
        group.close()


def test_scrapes_never_fail_while_sessions_come_and_go(server: ServerProcess) -> None:
    """Metrics are pushed from the event loop; the HTTP thread never walks live server state."""
    stop = threading.Event()
    scrapes: list[int] = []
    errors: list[Exception] = []

    def scraper() -> None:
        while not stop.is_set():
            try:
                server.scrape()
                scrapes.append(1)
            except Exception as exc:  # an HTTP 500 from a failed collection
                errors.append(exc)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ActionServiceStub(channel)
            steps = encode_steps(CASE.step_record(0, 0))
            for _ in range(150):
                sid = stub.OpenSession(pb.OpenSessionRequest()).session_id
                stub.GetAction(pb.GetActionRequest(session_id=sid, seq=1, steps=steps))
                stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    finally:
        stop.set()
        thread.join()
    assert not errors and len(scrapes) > 20
    assert total(server.scrape(), "mouse_active_sessions", model="default") == 0


def test_context_evictions_count_applied_cuts(server: ServerProcess) -> None:
    """Counted per applied request that cut the context: the sliding re-prefill, a request longer
    than the context (reset), never a refused request."""
    records = [CASE.step_record(0, s) for s in range(6)]
    before = server.scrape()
    with ActionClient(server.target) as client:
        sliding = client.open_session(context_policy="sliding", max_context_steps=4)
        for record in records[:5]:
            sliding.get_action(record)
        reset = client.open_session(context_policy="reset", max_context_steps=4)
        assert reset.get_reply(records[:6]).context_truncated  # 6 steps into a context of 4
        reject = client.open_session(context_policy="reject", max_context_steps=4)
        reject.get_action(records[:4])
        with pytest.raises(ActionError, match="FAILED_PRECONDITION"):
            reject.get_action(records[4])
        for session in (sliding, reset, reject):
            session.close()
    after = server.scrape()
    for policy, cuts in (("sliding", 1), ("reset", 1), ("reject", 0)):
        name, labels = "mouse_context_evictions_total", {"model": "default", "policy": policy}
        assert total(after, name, **labels) - total(before, name, **labels) == cuts, policy
