"""A hypothesis state machine over a real server: random interleavings of good steps, bad steps,
retries, client-side timeouts, cancels, group calls with bad entries (retried or not) or cancelled, resets
and server restarts. After every operation the sessions' contexts must equal the records the
model believes were sent: every reply's action scores (`return_scores`) are compared with an
in-process, cache-free forward of `mouse_core` over those records (golden tolerance); an
operation that raised is followed by a probe step that checks the same way (except after an
in-doubt error, which the next operation settles and checks).

It runs the asyncio client (cancelling a task is the one way to cancel a call mid-flight); the
blocking client runs the same sans-I/O core.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mouse_client import ActionError, AsyncActionClient, GroupError, RetryPolicy
from tests.helpers import golden_cases
from tests.reference import Reference
from tests.server.test_exactly_once import restart
from tests.server_process import ServerProcess, free_port

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")
SESSIONS = 3
RESTARTS = 2  # server restarts per test run (each costs a server start-up)
MAX_TIME = 64


class World:
    """What outlives one example: the server, its port, the event loop, the reference model."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = ServerProcess("--model", str(CASE.checkpoint), port=self.port).start()
        self.loop = asyncio.new_event_loop()
        self.reference = Reference(CASE.checkpoint)
        self.restarts_left = RESTARTS
        self.client = AsyncActionClient(self.server.target, retry=RetryPolicy(timeout_s=30))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def restart(self) -> None:
        self.server.kill()
        self.server = restart(["--model", str(CASE.checkpoint)], self.port)
        self.restarts_left -= 1

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()
        self.server.stop()


WORLD: World | None = None


@pytest.fixture(scope="module", autouse=True)
def world() -> Iterator[World]:
    global WORLD
    WORLD = World()
    yield WORLD
    WORLD.close()
    WORLD = None


records = st.fixed_dictionaries(
    {
        "action": st.integers(0, 3),
        "reward": st.floats(-2, 2, allow_nan=False, width=32),
        "done": st.integers(0, 2),
        "time": st.integers(0, MAX_TIME - 1),
    }
)
prefills = st.lists(records, min_size=1, max_size=3)
session_index = st.integers(0, SESSIONS - 1)


def bad(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*recs[:-1], {**recs[-1], "action": 99}]


class SessionMachine(RuleBasedStateMachine):
    """The model: per session, the records in its context, and the records of a call whose
    outcome is unknown (they will be applied by the next call, exactly once)."""

    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.w = WORLD
        self.context: list[list[dict[str, Any]]] = [[] for _ in range(SESSIONS)]
        self.pending: list[list[dict[str, Any]] | None] = [None] * SESSIONS
        self.failed_call: tuple[list[list[dict[str, Any]]], list[int]] | None = None
        # the group's memory of a failed call: entries applied in it, while nothing else changed
        # their session; the group's next call with the same records gets their recorded reply
        self.memory: dict[int, list[dict[str, Any]]] = {}

    @initialize()
    def open_group(self) -> None:
        self.group = self.w.run(self.w.client.open_sessions(SESSIONS, "default", seed=0))

    def teardown(self) -> None:
        if hasattr(self, "group"):
            self.w.client.timeout_s = None
            self.w.run(self.group.close())

    # -- checks -------------------------------------------------------------------------------
    def check(self, k: int, reply: Any) -> None:
        records = self.context[k]
        assert reply.context_steps == len(records), (k, reply.context_steps, len(records))
        ref = self.w.reference.scores(records)
        assert list(reply.scores) == pytest.approx(list(ref), rel=1e-4, abs=1e-5)

    def add(self, k: int, recs: list[dict[str, Any]]) -> None:
        self.context[k] += recs
        self.memory.pop(k, None)

    def settle(self, k: int, recs: list[dict[str, Any]] | None = None) -> None:
        """The next call on session k applied its pending records (unless it is their retry)."""
        pending, self.pending[k] = self.pending[k], None
        if pending is not None and pending != recs:
            self.add(k, pending)

    def probe(self, k: int, rec: dict[str, Any]) -> None:
        self.settle(k, [rec])
        self.add(k, [rec])
        self.check(k, self.w.run(self.group[k].get_reply(rec)))

    def step(self, k: int, recs: list[dict[str, Any]]) -> None:
        retry = self.pending[k] is not None and self.pending[k] == recs
        self.settle(k, recs)
        self.add(k, recs)
        reply = self.w.run(self.group[k].get_reply(recs))
        assert retry or reply.seq == self.group[k].seq
        self.check(k, reply)

    # -- rules --------------------------------------------------------------------------------
    @rule(k=session_index, recs=prefills)
    def good_step(self, k: int, recs: list[dict[str, Any]]) -> None:
        self.failed_call = None
        self.step(k, recs)

    @rule(k=session_index, recs=prefills, probe=records)
    def bad_step(self, k: int, recs: list[dict[str, Any]], probe: dict[str, Any]) -> None:
        self.failed_call = None
        self.settle(k)
        with pytest.raises(ActionError) as info:
            self.w.run(self.group[k].get_reply(bad(recs)))
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and not info.value.in_doubt
        self.probe(k, probe)

    @rule(k=session_index, recs=prefills)
    def retry_in_doubt(self, k: int, recs: list[dict[str, Any]]) -> None:
        """The same records and options again right after an in-doubt error: their retry (a
        good step when session k has nothing in doubt)."""
        self.failed_call = None
        self.step(k, self.pending[k] or recs)

    @rule(k=session_index, recs=prefills, timeout=st.sampled_from([0.0005, 0.002, 0.01]))
    def timeout_step(self, k: int, recs: list[dict[str, Any]], timeout: float) -> None:
        """A client deadline that may hit before, while or after the server applies the step."""
        self.failed_call = None
        if self.pending[k] is not None:
            self.settle_now(k)
        self.w.client.timeout_s = timeout
        try:
            reply = self.w.run(self.group[k].get_reply(recs))
        except ActionError as err:
            assert err.in_doubt or err.code is grpc.StatusCode.DEADLINE_EXCEEDED
            if self.group[k].in_doubt:
                self.pending[k] = recs
            return
        finally:
            self.w.client.timeout_s = None
        self.add(k, recs)
        self.check(k, reply)

    @rule(k=session_index, recs=prefills, after=st.sampled_from([0.0, 0.001, 0.005]))
    def cancelled_step(self, k: int, recs: list[dict[str, Any]], after: float) -> None:
        """A call cancelled mid-flight (its asyncio task)."""
        self.failed_call = None
        if self.pending[k] is not None:
            self.settle_now(k)

        reply = self.cancelled_after(self.group[k].get_reply(recs), after)
        if reply is not None:
            self.add(k, recs)
            self.check(k, reply)
        elif self.group[k].in_doubt:
            self.pending[k] = recs

    def cancelled_after(self, call: Any, after: float) -> Any:
        """Run `call` (a coroutine) and cancel its task after `after` s: its result, or None if
        the cancel came first."""

        async def cancel_soon() -> Any:
            task = asyncio.ensure_future(call)
            await asyncio.sleep(after)
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return None

        return self.w.run(cancel_soon())

    def settle_now(self, k: int) -> None:
        """Settle session k's in-doubt request (`resolve`), so a new call starts clean."""
        reply = self.w.run(self.group[k].resolve())
        pending, self.pending[k] = self.pending[k], None
        assert pending is not None
        self.add(k, pending)
        if reply is not None:
            self.check(k, reply)

    def group_call(self, sent: list[list[dict[str, Any]]]) -> None:
        memory, self.memory = self.memory, {}
        hits = set()
        for k in range(SESSIONS):
            if self.pending[k] is not None:
                self.settle(k, sent[k])
            elif memory.get(k) == sent[k]:
                hits.add(k)  # the retry of an entry the failed call applied
        refused = sorted(k for k in range(SESSIONS) if sent[k][-1]["action"] == 99)
        try:
            replies = self.w.run(self.group.get_replies(sent))
        except GroupError as err:
            assert sorted(err.failed) == refused
            for k in range(SESSIONS):
                if k not in refused:
                    assert err.outcomes[k].status == "applied" and err.outcomes[k].action is not None
                    if k not in hits:
                        self.add(k, sent[k])
                    self.memory[k] = sent[k]
            self.failed_call = (sent, refused)
            return
        assert not refused
        for k in range(SESSIONS):
            if k not in hits:
                self.add(k, sent[k])
            self.check(k, replies[k])

    @rule(steps=st.lists(prefills, min_size=SESSIONS, max_size=SESSIONS), bad_entries=st.sets(session_index))
    def group_step(self, steps: list[list[dict[str, Any]]], bad_entries: set[int]) -> None:
        self.failed_call = None
        self.group_call([bad(s) if k in bad_entries else s for k, s in enumerate(steps)])

    @rule(
        steps=st.lists(prefills, min_size=SESSIONS, max_size=SESSIONS),
        after=st.sampled_from([0.0, 0.001, 0.005]),
    )
    def cancelled_group_step(self, steps: list[list[dict[str, Any]]], after: float) -> None:
        """A group call cancelled mid-flight: on the server, entries still queued are withdrawn
        and those already running are recorded; each session is in doubt and its next call
        settles it."""
        self.failed_call = None
        for k in range(SESSIONS):
            if self.pending[k] is not None:
                self.settle_now(k)
        self.memory = {}

        replies = self.cancelled_after(self.group.get_replies(steps), after)
        for k in range(SESSIONS):
            if replies is not None:
                self.add(k, steps[k])
                self.check(k, replies[k])
            elif self.group[k].in_doubt:
                self.pending[k] = steps[k]

    @precondition(lambda self: self.failed_call is not None)
    @rule(fix=st.booleans())
    def group_retry(self, fix: bool) -> None:
        """The failed group call again, its bad entries corrected (or still bad)."""
        assert self.failed_call is not None
        sent, refused = self.failed_call
        self.failed_call = None
        self.group_call(
            [[*s[:-1], {**s[-1], "action": 0}] if fix and k in refused else s for k, s in enumerate(sent)]
        )

    @rule(k=session_index)
    def reset(self, k: int) -> None:
        self.failed_call = None
        self.settle(k)
        self.w.run(self.group[k].reset())
        self.context[k] = []
        self.memory.pop(k, None)

    @rule(probe=records)
    def restart_server(self, probe: dict[str, Any]) -> None:
        """kill -9 and restart (while the run's budget lasts): every session is reopened and
        replayed on its next call; then a probe step on each."""
        self.failed_call = None
        if self.w.restarts_left > 0:
            self.w.restart()
            self.w.run(self.w.client.wait_ready(timeout=60))
        for k in range(SESSIONS):
            self.probe(k, probe)

    @invariant()
    def in_doubt_as_modelled(self) -> None:
        if hasattr(self, "group"):
            assert [s.in_doubt for s in self.group.sessions] == [p is not None for p in self.pending]


SessionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MOUSE_STATE_MACHINE_EXAMPLES", "300")),
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # no shrinking by default: each replay runs against the real server (slow); a failure shows
    # its whole sequence of at most `stateful_step_count` operations
    phases=list(Phase) if os.environ.get("MOUSE_STATE_MACHINE_SHRINK") else [Phase.explicit, Phase.generate],
)


def test_session_state_machine() -> None:
    SessionMachine.TestCase("runTest").runTest()
