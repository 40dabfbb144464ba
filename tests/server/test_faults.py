"""Faults: graceful shutdown, deadlines, kill -9 and restart, a client killed mid-stream, limits."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mouse_client import ActionClient, ActionError, RetryPolicy, encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from tests.helpers import golden_cases
from tests.server.conftest import LONG, slow_steps
from tests.server_process import REPO, ServerProcess, free_port, total

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")
NO_RETRY = RetryPolicy(max_attempts=1)


def test_graceful_shutdown(slow_checkpoint: Path) -> None:
    """SIGTERM: health NOT_SERVING, no new sessions, the in-flight request completes, exit 0."""
    server = ServerProcess("--model", str(slow_checkpoint), "--grace-period", "30").start()
    outcome: dict[str, object] = {}
    with ActionClient(server.target, retry=NO_RETRY) as client:
        session = client.open_session()

        def long_prefill() -> None:
            try:
                outcome["reply"] = session.get_reply(slow_steps(LONG))
            except ActionError as err:  # pragma: no cover - reported by the assert below
                outcome["error"] = err

        worker = threading.Thread(target=long_prefill)
        worker.start()
        time.sleep(0.3)  # the prefill is running
        started = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("shutting down")
        with pytest.raises(ActionError) as info:
            client.open_session()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        worker.join(timeout=60)
        assert "error" not in outcome, outcome
        assert outcome["reply"].context_steps == LONG  # type: ignore[attr-defined]
    assert server.proc.wait(timeout=60) == 0
    assert time.monotonic() - started < 30
    assert "stopped" in server.log


def test_health_reports_not_serving_while_draining(slow_checkpoint: Path) -> None:
    server = ServerProcess("--model", str(slow_checkpoint), "--grace-period", "30").start()
    with (
        ActionClient(server.target, retry=NO_RETRY) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="mouse.action.v1.ActionService"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        session = client.open_session()
        worker = threading.Thread(target=lambda: session.get_action(slow_steps(LONG)))
        worker.start()
        time.sleep(0.3)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # while the request in flight completes, health still answers, and says NOT_SERVING
        status = health.Check(health_pb2.HealthCheckRequest(service="mouse.action.v1.ActionService"))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert worker.is_alive()
        worker.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0


def test_expired_deadline_is_not_applied(slow_checkpoint: Path) -> None:
    """A step whose deadline passes while it waits for the busy model is never applied."""
    server = ServerProcess("--model", str(slow_checkpoint))
    with server, ActionClient(server.target, retry=NO_RETRY) as client:
        busy = client.open_session()
        worker = threading.Thread(target=lambda: busy.get_action(slow_steps(LONG)))
        worker.start()
        time.sleep(0.3)
        session = client.open_session(recover=False)
        req = pb.GetActionRequest(session_id=session.id, seq=1, steps=encode_steps(slow_steps(1)))
        stub = client.stub(session.id)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetAction(req, timeout=0.005)  # shorter than one chunk of the prefill
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert worker.is_alive()  # the model really was busy with the long prefill
        worker.join(timeout=60)
        reply = stub.GetAction(req)  # seq 1 again, same content: applied now, and only now
        assert reply.seq == 1 and reply.context_steps == 1
        assert stub.GetAction(req).context_steps == 1  # a retry: the cached reply


def test_a_step_not_applied_cuts_no_context(slow_checkpoint: Path) -> None:
    """A step that would slide a full context but expires while it waits for the busy model
    leaves the context and the eviction count alone; its retry cuts the context once."""
    # one chunk for the whole long prefill: the step waits for all of it
    server = ServerProcess("--model", str(slow_checkpoint), "--prefill-chunk-steps", str(LONG), metrics=True)
    with server, ActionClient(server.target, retry=NO_RETRY) as client:
        session = client.open_session(recover=False, context_policy="sliding", max_context_steps=2)
        session.get_action(slow_steps(2))
        busy = client.open_session()
        worker = threading.Thread(target=lambda: busy.get_action(slow_steps(LONG)))
        worker.start()
        time.sleep(0.3)
        req = pb.GetActionRequest(session_id=session.id, seq=2, steps=encode_steps(slow_steps(1)))
        stub = client.stub(session.id)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetAction(req, timeout=0.1)  # reaches the session, expires behind the prefill
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert worker.is_alive()
        worker.join(timeout=60)
        assert total(server.scrape(), "mouse_context_evictions_total") == 0
        reply = stub.GetAction(req)
        assert reply.seq == 2 and reply.context_truncated and reply.context_steps == 1
        assert total(server.scrape(), "mouse_context_evictions_total", policy="sliding") == 1


@pytest.mark.parametrize("path", ["session", "group"])
def test_an_earlier_request_refused_for_now_stays_pending(slow_checkpoint: Path, path: str) -> None:
    """A long prefill's call times out (in doubt) while the server still applies it. The next
    call re-sends it first, and the server refuses that re-send for now (SESSION_QUEUE_FULL: a
    stray request of the session waits too). The client keeps the prefill queued instead of
    dropping it, so the call after that gets its recorded reply and then applies the new step."""
    server = ServerProcess("--model", str(slow_checkpoint), "--max-pending-per-session", "1")
    with server, ActionClient(server.target, retry=NO_RETRY) as client:
        if path == "group":
            group = client.open_sessions(1, recover=False)
            session = group[0]
            step = lambda records: group.get_replies([records])[0]  # noqa: E731
        else:
            session = client.open_session(recover=False)
            step = session.get_reply
        client.timeout_s = 0.4
        with pytest.raises(ActionError) as info:
            step(slow_steps(LONG))  # the model starts it at once: it runs on (1.4 s when idle)
        assert info.value.in_doubt and session.in_doubt
        client.timeout_s = 10  # the refusal below comes at once; a loaded machine answers late
        stray = pb.GetActionRequest(session_id=session.id, seq=1, steps=encode_steps(slow_steps(1)))
        with ThreadPoolExecutor(1) as pool:
            stray_call = pool.submit(client.stub(session.id).GetAction, stray)
            time.sleep(0.2)  # the stray request waits for the session behind the prefill
            with pytest.raises(ActionError) as info:
                step(slow_steps(2))
            err = info.value
            assert err.reason == "SESSION_QUEUE_FULL" and err.earlier == "pending" and not err.in_doubt
            assert "the new records were not sent" in err.message and session.in_doubt
            refused = stray_call.exception(timeout=60)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION  # seq 1 was the prefill
        client.timeout_s = None
        reply = step(slow_steps(2))
        assert (reply.seq, reply.context_steps) == (2, LONG + 2) and not session.in_doubt


def test_kill_9_and_restart_loses_and_repeats_nothing() -> None:
    """A worker keeps stepping through a server crash: every action equals the golden one."""
    port = free_port()
    args = ["--model", str(CASE.checkpoint)]
    server = ServerProcess(*args, port=port).start()
    retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.2, timeout_s=60)
    with ActionClient(server.target, retry=retry) as client:
        sessions = [client.open_session(temperature=0.0) for _ in range(CASE.batch)]
        got: list[list[int]] = [[] for _ in sessions]
        half = CASE.steps // 2
        for s in range(half):
            for b, session in enumerate(sessions):
                got[b].append(session.get_action(CASE.step_record(b, s)))
        server.kill()  # no shutdown at all

        def restart_later() -> None:
            time.sleep(1.0)
            restarted.append(ServerProcess(*args, port=port).start())

        restarted: list[ServerProcess] = []
        thread = threading.Thread(target=restart_later)
        thread.start()
        try:
            for s in range(half, CASE.steps):  # the first call waits out the outage (UNAVAILABLE, retried)
                for b, session in enumerate(sessions):
                    got[b].append(session.get_action(CASE.step_record(b, s)))
        finally:
            thread.join()
            for proc in restarted:
                proc.stop()
    for b, session in enumerate(sessions):
        assert got[b] == CASE.greedy(b)
        assert session.recoveries == 1


def test_client_killed_mid_stream_leaves_the_server_healthy() -> None:
    with ServerProcess("--model", str(CASE.checkpoint)) as server:
        script = (
            "import sys, time\n"
            "from mouse_client import ActionClient\n"
            f"c = ActionClient({server.target!r})\n"
            "s = c.open_session()\n"
            "st = s.stream()\n"
            "step = {'action': 1, 'reward': 0.0, 'done': 0, 'time': 1}\n"
            "while True:\n"
            "    st.get_action(step)\n"
            "    print('step', flush=True)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for _ in range(20):
            assert proc.stdout.readline().startswith("step")
        proc.kill()
        proc.wait()
        with ActionClient(server.target) as client, client.open_session(temperature=0.0) as canary:
            assert [canary.get_action(CASE.step_record(0, s)) for s in range(CASE.steps)] == CASE.greedy(0)
        time.sleep(0.5)
        assert "Traceback" not in server.log and " ERROR " not in server.log


def test_message_and_step_limits() -> None:
    args = ["--model", str(CASE.checkpoint), "--max-message-bytes", "4096", "--max-steps-per-request", "50"]
    with ServerProcess(*args) as server, ActionClient(server.target, retry=NO_RETRY) as client:
        session = client.open_session(recover=False, temperature=0.0)
        with pytest.raises(ActionError) as info:
            session.get_action([CASE.step_record(0, 0)] * 60)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "carries 60 steps; at most 50" in info.value.message
        with pytest.raises(ActionError) as info:
            session.get_action([CASE.step_record(0, 0)] * 1000)  # about 8 KB on the wire
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert session.get_action(CASE.step_record(0, 0)) == CASE.greedy(0)[0]  # still usable
