"""Exactly once on the client paths, against a real server: group calls with a bad entry (retry
and move on), a client-side deadline, closed sessions, whole-call timeouts, broken streams.
The golden rows' greedy actions prove each session's context: they match only when every step
was applied exactly once, in order."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from mouse_client import (
    ActionClient,
    ActionError,
    AsyncActionClient,
    GroupError,
    RetryPolicy,
    SessionClosedError,
)
from tests.client.conftest import VARIED
from tests.server_process import ServerProcess

NO_RETRY = RetryPolicy(max_attempts=1)


def row(b: int, s: int) -> dict[str, Any]:
    return VARIED.step_record(b % VARIED.batch, s)


def bad(b: int, s: int) -> dict[str, Any]:
    return {**row(b, s), "action": 99}


def test_group_entry_refused_then_retried_applies_every_record_once(server: ServerProcess) -> None:
    with (
        ActionClient(server.target) as client,
        client.open_sessions(4, VARIED.name, temperature=0.0) as group,
    ):
        got: list[list[int]] = [[] for _ in range(4)]
        for s in range(VARIED.steps):
            steps = [row(b, s) for b in range(4)]
            if s == 5:
                with pytest.raises(GroupError) as info:
                    group.get_actions([bad(b, s) if b == 1 else steps[b] for b in range(4)])
                err = info.value
                assert err.failed == [1] and sorted(err.applied) == [0, 2, 3]
                entry = err.outcomes[1]
                assert (entry.index, entry.session_id, entry.status) == (1, group[1].id, "refused")
                assert entry.code is grpc.StatusCode.INVALID_ARGUMENT and "action" in (entry.message or "")
                assert err.code is grpc.StatusCode.INVALID_ARGUMENT and err.entry == 1
                assert [group[b].seq for b in range(4)] == [6, 5, 6, 6]
            actions = group.get_actions(steps)  # at s == 5: the retry, entry 1 corrected
            assert actions.dtype == np.int64
            for b in range(4):
                got[b].append(int(actions[b]))
        assert [group[b].seq for b in range(4)] == [VARIED.steps] * 4
    for b in range(4):
        assert got[b] == VARIED.greedy(b % VARIED.batch)


def test_group_moves_on_after_a_refused_entry(server: ServerProcess) -> None:
    """Moving on: applied entries keep their record, the refused one never gets it."""
    with (
        ActionClient(server.target) as client,
        client.open_sessions(3, VARIED.name, temperature=0.0) as group,
    ):
        for s in range(3):
            group.get_actions([row(b, s) for b in range(3)])
        with pytest.raises(GroupError):
            group.get_actions([row(0, 3), bad(1, 3), row(2, 3)])
        replies = group.get_replies([row(b, 4) for b in range(3)])  # the next step for everyone
        assert [r.context_steps for r in replies] == [5, 4, 5]
        # stepping a subset is the unambiguous way to retry: only entry 1, with its fixed record
        with pytest.raises(GroupError):
            group.get_actions([row(0, 5), bad(1, 5), row(2, 5)])
        (fixed,) = group.get_replies([row(1, 5)], indices=[1])
        assert fixed.context_steps == 5
        replies = group.get_replies([row(b, 6) for b in range(3)], mask=np.array([True, True, True]))
        assert [r.context_steps for r in replies] == [7, 6, 7]


def test_client_deadline_then_next_step_applies_both(server: ServerProcess) -> None:
    """The in-doubt prefill is re-sent (same seq, same records) before the next step goes out,
    so the context holds both, whether the first attempt reached the server or not."""
    with ActionClient(server.target, retry=NO_RETRY) as client:
        session = client.open_session(VARIED.name, recover=False)
        n = min(600, session.model.max_context_steps // 4)
        prefill = [row(0, s % VARIED.steps) for s in range(n)]
        client.timeout_s = 0.002
        for _ in range(10):
            with pytest.raises(ActionError) as info:
                session.get_action(prefill)
            assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            if info.value.in_doubt:
                break
            # the server's own refusal ("not applied") came back before the client's deadline
            # fired: a definite answer, so nothing is in doubt and nothing advanced; try again
            assert not session.in_doubt and session.seq == 0
        assert session.in_doubt
        client.timeout_s = None
        reply = session.get_reply(row(0, 3))
        assert (reply.context_steps, reply.seq) == (n + 1, 2)
        # the same call again right after an in-doubt error is its retry: applied once
        client.timeout_s = 0.002
        with pytest.raises(ActionError):
            session.get_action(prefill)
        client.timeout_s = None
        session.get_action(prefill)
        reply = session.get_reply(row(0, 4))
        assert (reply.context_steps, reply.seq) == (2 * n + 2, 4)
        session.close()


def test_closed_session_raises_and_is_never_reopened(server: ServerProcess) -> None:
    with ActionClient(server.target) as client:
        session = client.open_session(VARIED.name)
        session.get_action(row(0, 0))
        session.close()
        for call in (lambda: session.get_action(row(0, 1)), session.reset, session.stream):
            with pytest.raises(SessionClosedError, match="is closed"):
                call()
        assert session.recoveries == 0
        group = client.open_sessions(2, VARIED.name)
        group.close()
        with pytest.raises(SessionClosedError):
            group.get_actions([row(0, 0), row(1, 0)])


def test_timeout_bounds_the_whole_call_retries_included() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ActionClient(f"127.0.0.1:{port}", retry=RetryPolicy(timeout_s=2.0)) as client:
        started = time.monotonic()
        with pytest.raises(ActionError) as info:
            client.list_models()
        assert time.monotonic() - started < 5.0
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        started = time.monotonic()
        with pytest.raises(ActionError):
            client.wait_ready(timeout=1.0)
        assert time.monotonic() - started < 4.0
    with ActionClient(f"127.0.0.1:{port}", timeout_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ActionError):
            client.model_info()
        assert time.monotonic() - started < 4.0


def test_wait_ready(server: ServerProcess) -> None:
    with ActionClient(server.target) as client:
        client.wait_ready(timeout=10)
        assert client.model_info(VARIED.name).max_num_actions == 4


def _request_threads_blocked() -> list[str]:
    """Threads parked in grpc's consumption of a request iterator."""
    out = []
    for ident, frame in sys._current_frames().items():
        f: Any = frame
        while f is not None:
            if f.f_code.co_name == "consume_request_iterator":
                out.append(str(ident))
                break
            f = f.f_back
    return out


def test_broken_stream_leaves_no_request_thread_blocked() -> None:
    before = set(_request_threads_blocked())
    server = ServerProcess("--model", str(VARIED.checkpoint))
    with server, ActionClient(server.target, retry=RetryPolicy(timeout_s=1.0)) as client:
        session = client.open_session(recover=False)
        with session.stream() as stream:
            stream.get_action(row(0, 0))
            server.kill()
            with pytest.raises(ActionError) as info:
                stream.get_action(row(0, 1))
            assert info.value.in_doubt
            deadline = time.monotonic() + 10
            while set(_request_threads_blocked()) - before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not set(_request_threads_blocked()) - before


def test_stream_and_unary_share_the_bookkeeping(server: ServerProcess) -> None:
    with ActionClient(server.target) as client, client.open_session(VARIED.name, temperature=0.0) as session:
        got = []
        with session.stream() as stream:
            got += [stream.get_action(row(1, s)) for s in range(10)]
        got += [session.get_action(row(1, s)) for s in range(10, VARIED.steps)]
        assert got == VARIED.greedy(1)


def test_async_group_retry(server: ServerProcess) -> None:
    async def run() -> list[list[int]]:
        client = AsyncActionClient(server.target)
        async with client, await client.open_sessions(2, VARIED.name, temperature=0.0) as group:
            got: list[list[int]] = [[], []]
            for s in range(VARIED.steps):
                steps = [row(b, s) for b in range(2)]
                if s == 2:
                    with pytest.raises(GroupError) as info:
                        await group.get_actions([steps[0], bad(1, s)])
                    assert info.value.failed == [1]
                actions = await group.get_actions(steps)
                for b in range(2):
                    got[b].append(int(actions[b]))
            return got

    got = asyncio.run(run())
    assert got == [VARIED.greedy(0), VARIED.greedy(1)]


def test_concurrent_sessions_in_threads(server: ServerProcess) -> None:
    """Sessions are independent: one per thread, on one client."""
    results: dict[int, list[int]] = {}
    with ActionClient(server.target) as client:

        def play(b: int) -> None:
            with client.open_session(VARIED.name, temperature=0.0) as s:
                results[b] = [s.get_action(row(b, i)) for i in range(VARIED.steps)]

        threads = [threading.Thread(target=play, args=(b,)) for b in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(results[b] == VARIED.greedy(b % 2) for b in range(4))


def _under_deadline(client: ActionClient, call: Any, attempts: int = 10) -> tuple[Any, int]:
    """`call()` under a 2 ms client deadline until its outcome is unknown: returns the in-doubt
    `ActionError`, or the call's result when the server answered in time (a definite outcome:
    applied), and how many attempts the server refused first (not applied: tried again, as
    the retry of the same records)."""
    client.timeout_s = 0.002
    try:
        for refusals in range(attempts):
            try:
                return call(), refusals
            except ActionError as err:
                if err.in_doubt:
                    return err, refusals
                # the server's refusal ("not applied", its deadline passed while queued) came
                # back before the client's deadline fired: nothing is in doubt
                assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED, err
        pytest.fail(f"no call of {attempts} was left in doubt or applied")
    finally:
        client.timeout_s = None


def test_group_call_in_doubt_is_resent_and_applied_once(server: ServerProcess) -> None:
    """A BatchGetAction whose own outcome is unknown (the client's deadline): every entry is
    `in_doubt`; the next group call re-sends each in-doubt request unchanged before its own
    records (moving on), or is the retry (same records) and gets the settled replies. Context
    lengths, sequence numbers and the golden greedy actions prove each record applied once.
    Whether the server had applied an in-doubt call (about a third of them) varies from run to
    run; the seqs pin the client's side either way (a resend under a new seq, or a dropped one,
    shows in them), and the server's answer to a repeated seq has its own tests
    (tests/server/test_rpcs.py::test_retry_of_the_last_seq_returns_the_same_reply)."""
    n = 4
    first, second = 8, 6  # prefill lengths (steps 0..7, then 9..14)
    in_doubt_calls = 0

    def check_in_doubt(attempt: tuple[Any, int], seq: int, group: Any) -> bool:
        out, refusals = attempt
        if not isinstance(out, ActionError):
            return False  # answered before the deadline: applied, a definite outcome
        assert isinstance(out, GroupError) and out.in_doubt
        assert out.code is grpc.StatusCode.DEADLINE_EXCEEDED
        # every entry is in doubt (an entry the server applied in an earlier, partly refused
        # attempt of the same records gets its recorded reply instead)
        doubtful = [o.index for o in out.outcomes if o.status == "in_doubt"]
        assert doubtful == out.failed and (refusals or doubtful == list(range(n)))
        assert sorted([*doubtful, *out.applied]) == list(range(n))
        assert [(o.index, o.session_id) for o in out.outcomes] == list(enumerate(group.ids))
        for o in out.outcomes:
            if o.status == "in_doubt":
                assert (
                    o.code is grpc.StatusCode.DEADLINE_EXCEEDED and o.error is not None and o.error.in_doubt
                )
                assert group[o.index].in_doubt and group[o.index].seq == seq  # nothing known applied
        return True

    with (
        ActionClient(server.target, retry=NO_RETRY) as client,
        client.open_sessions(n, VARIED.name, temperature=0.0, recover=False) as group,
    ):
        # 1. in doubt, then moving on: the in-doubt prefill goes out (again) before the new step
        prefill = [[row(b, s) for s in range(first)] for b in range(n)]
        out = _under_deadline(client, lambda: group.get_replies(prefill))
        in_doubt_calls += check_in_doubt(out, 0, group)
        replies = group.get_replies([row(b, first) for b in range(n)])
        assert [(r.seq, r.context_steps) for r in replies] == [(2, first + 1)] * n
        assert [r.action for r in replies] == [VARIED.greedy(b % VARIED.batch)[first] for b in range(n)]
        assert not any(group[b].in_doubt for b in range(n))
        # 2. in doubt, then the same call again: its retry, answered with the settled replies
        start = first + 1
        prefill = [[row(b, s) for s in range(start, start + second)] for b in range(n)]
        out = _under_deadline(client, lambda: group.get_replies(prefill))
        doubted = check_in_doubt(out, 2, group)
        in_doubt_calls += doubted
        replies = group.get_replies(prefill) if doubted else out[0]
        assert [(r.seq, r.context_steps) for r in replies] == [(3, start + second)] * n
        last = start + second - 1
        assert [r.action for r in replies] == [VARIED.greedy(b % VARIED.batch)[last] for b in range(n)]
        # 3. the rest one step at a time: the greedy actions hold only if every record is there once
        for s in range(start + second, VARIED.steps):
            replies = group.get_replies([row(b, s) for b in range(n)])
            assert [r.context_steps for r in replies] == [s + 1] * n
            assert [r.action for r in replies] == [VARIED.greedy(b % VARIED.batch)[s] for b in range(n)]
        assert [group[b].seq for b in range(n)] == [3 + VARIED.steps - start - second] * n
    if not in_doubt_calls:  # a machine fast enough to answer within 2 ms: nothing was in doubt
        pytest.skip("the server answered every call before the 2 ms deadline")


def test_stream_call_in_doubt_is_resent_and_applied_once(server: ServerProcess) -> None:
    """A request on `Session.stream()` whose reply is overdue (the client's deadline cancels the
    stream call) leaves the session in doubt; the session's next call, unary or on the stream,
    re-sends it unchanged on a live server, and the context holds every record once."""
    with ActionClient(server.target, retry=NO_RETRY) as client:
        session = client.open_session(VARIED.name, temperature=0.0, recover=False)
        in_doubt_calls = 0

        def in_doubt(out: Any, seq: int) -> bool:
            """Whether the call was left in doubt (then nothing moved): else it was answered."""
            if not isinstance(out, ActionError):
                return False
            assert out.code is grpc.StatusCode.DEADLINE_EXCEEDED and out.in_doubt
            assert session.in_doubt and session.seq == seq
            return True

        with session.stream() as stream:
            reply = stream.get_reply(row(0, 0))
            assert (reply.seq, reply.context_steps, reply.action) == (1, 1, VARIED.greedy(0)[0])
            # 1. in doubt on the stream, then the next unary get_action moves on
            prefill = [row(0, s) for s in range(1, 9)]
            out, _ = _under_deadline(client, lambda: stream.get_reply(prefill))
            if in_doubt(out, 1):
                in_doubt_calls += 1
            else:
                assert (out.seq, out.context_steps) == (2, 9)
            assert session.get_action(row(0, 9)) == VARIED.greedy(0)[9]
            assert (session.seq, session.in_doubt) == (3, False)
            # 2. in doubt again, then the same records on the stream: the retry (a new call)
            prefill = [row(0, s) for s in range(10, 16)]
            out, _ = _under_deadline(client, lambda: stream.get_reply(prefill))
            if in_doubt(out, 3):
                in_doubt_calls += 1
                out = stream.get_reply(prefill)
            assert (out.seq, out.context_steps, out.action) == (4, 16, VARIED.greedy(0)[15])
            assert not session.in_doubt
            for s in range(16, VARIED.steps):
                reply = stream.get_reply(row(0, s))
                assert (reply.context_steps, reply.action) == (s + 1, VARIED.greedy(0)[s])
        assert session.seq == 4 + VARIED.steps - 16
        session.close()
    if not in_doubt_calls:  # a machine fast enough to answer within 2 ms: nothing was in doubt
        pytest.skip("the server answered every call before the 2 ms deadline")
