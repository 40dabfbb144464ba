"""Scale-out with session affinity: two real mouse-serve replicas on loopback, reached through a
real nginx running the repo's proxy configuration, and through client-side sharding.

A session lives in one replica (its KV cache), and sessions are opened with `recover=False`: a
call that reached the other replica would fail with NOT_FOUND instead of being repaired by the
client. Every action is checked against the reference's greedy actions, and each replica's
metrics must show exactly the sessions and calls routed to it.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mouse_client import ActionClient, RetryPolicy, Session
from mouse_client.routing import routing_key
from tests.helpers import GoldenCase, golden_cases
from tests.ops.deploy import DEPLOY, Nginx, requests_not_ok
from tests.server_process import ServerProcess, free_port, total

pytestmark = pytest.mark.timeout(180)

CASES = golden_cases()
ROWS = [(case, b) for case in CASES for b in range(case.batch)]
N_SESSIONS = 16
GROUP_CASE = max(CASES, key=lambda c: c.batch)
NO_RETRY = RetryPolicy(max_attempts=1)  # a failed call must surface, not be retried


def start_replica() -> ServerProcess:
    args = ["--max-sessions", "24"]
    for case in CASES:
        args += ["--model", f"{case.name}={case.checkpoint}"]
    return ServerProcess(*args, metrics=True).start()


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_replica) for _ in range(2)]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        yield started
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.stop(), started))


@pytest.fixture(scope="module")
def nginx(replicas: list[ServerProcess]) -> Iterator[Nginx]:
    with Nginx([r.target for r in replicas]) as proxy:
        yield proxy


def open_golden_sessions(client: ActionClient) -> dict[str, tuple[GoldenCase, int, Session]]:
    """16 sessions over every golden row (model = case), greedy, without recovery."""
    out = {}
    for i in range(N_SESSIONS):
        case, b = ROWS[i % len(ROWS)]
        session = client.open_session(case.name, temperature=0.0, recover=False)
        out[session.id] = (case, b, session)
    return out


def drive(sessions: dict[str, tuple[GoldenCase, int, Session]]) -> dict[str, list[int]]:
    """Feed every session its golden row one step at a time, sessions interleaved."""
    actions: dict[str, list[int]] = {sid: [] for sid in sessions}
    for s in range(max(case.steps for case, _, _ in sessions.values())):
        for sid, (case, b, session) in sessions.items():
            if s < case.steps:
                actions[sid].append(session.get_action(case.step_record(b, s), temperature=0.0))
    return actions


def check_replicas(
    replicas: list[ServerProcess],
    before: list[dict],
    placement: dict[str, str],
    sessions: dict[str, tuple[GoldenCase, int, Session]],
) -> None:
    """Each replica holds exactly the sessions placed on it and served exactly their calls."""
    assert set(placement.values()) == {r.target for r in replicas}, (
        f"all 16 sessions landed on one replica: {Counter(placement.values())}"
    )
    held = 0
    for replica, old in zip(replicas, before, strict=True):
        now = replica.scrape()
        mine = [sid for sid, target in placement.items() if target == replica.target]
        per_model = Counter(sessions[sid][0].name for sid in mine)
        for case in CASES:
            assert total(now, "mouse_active_sessions", model=case.name) == per_model[case.name], case.name
        active = total(now, "mouse_active_sessions")
        assert active == len(mine) > 0
        held += active

        opened = total(now, "mouse_requests_total", method="OpenSession", code="OK")
        opened -= total(old, "mouse_requests_total", method="OpenSession", code="OK")
        assert opened == len(mine)
        stepped = total(now, "mouse_requests_total", method="GetAction", code="OK")
        stepped -= total(old, "mouse_requests_total", method="GetAction", code="OK")
        assert stepped == sum(sessions[sid][0].steps for sid in mine)
        assert requests_not_ok(now) == requests_not_ok(old), f"failed calls on {replica.target}"
    assert held == N_SESSIONS


def check_golden(sessions: dict[str, tuple[GoldenCase, int, Session]], actions: dict[str, list[int]]) -> None:
    for sid, (case, b, _) in sessions.items():
        assert actions[sid] == case.greedy(b), f"{case.name} row {b} (session {sid})"


def close_all(sessions: dict[str, tuple[GoldenCase, int, Session]]) -> None:
    for _, _, session in sessions.values():
        session.close()


def placement_from_log(nginx: Nginx, sessions: dict, extra_calls: int = 0) -> dict[str, str]:
    """The replica each session's calls reached, from nginx's access log; every call of a
    session must have reached the same one, with its routing key, and succeeded."""
    calls = sum(1 + case.steps for case, _, _ in sessions.values()) + extra_calls
    by_session = nginx.calls_by_session(list(sessions), calls)
    assert sum(len(v) for v in by_session.values()) == calls, nginx.error_log
    placement = {}
    for sid in sessions:
        lines = by_session[sid]
        upstreams = {line["upstream"] for line in lines}
        assert len(upstreams) == 1, f"session {sid} reached {upstreams}"
        assert {line["key"] for line in lines} == {routing_key(sid)}
        assert {(line["status"], line["grpc_status"]) for line in lines} == {("200", "0")}
        placement[sid] = upstreams.pop()
    return placement


def test_proxy_routes_every_call_of_a_session_to_its_replica(
    replicas: list[ServerProcess], nginx: Nginx
) -> None:
    before = [r.scrape() for r in replicas]
    with ActionClient(nginx.target, retry=NO_RETRY, timeout_s=30) as client:
        # calls without a session are spread over the replicas, each with all models
        assert {m.name for m in client.list_models()} == {c.name for c in CASES}
        sessions = open_golden_sessions(client)
        try:
            actions = drive(sessions)
            placement = placement_from_log(nginx, sessions)
            check_replicas(replicas, before, placement, sessions)
        finally:
            close_all(sessions)
    check_golden(sessions, actions)


def test_proxy_keeps_a_session_group_on_one_replica(replicas: list[ServerProcess], nginx: Nginx) -> None:
    """`open_sessions` ids share a routing key: one BatchGetAction per step, all on one replica."""
    case = GROUP_CASE
    before = [r.scrape() for r in replicas]
    with (
        ActionClient(nginx.target, retry=NO_RETRY, timeout_s=30) as client,
        client.open_sessions(case.batch, case.name, temperature=0.0, recover=False) as group,
    ):
        got = [
            group.get_actions([case.step_record(b, s) for b in range(case.batch)]) for s in range(case.steps)
        ]
        ids = [group[i].id for i in range(case.batch)]
        # OpenSession of each member, then the batches (sent with the first member's id)
        calls = nginx.calls_by_session(ids, case.batch + case.steps)
        lines = [line for sid in ids for line in calls[sid]]
        assert len(lines) == case.batch + case.steps
        assert len({routing_key(sid) for sid in ids}) == 1
        assert {line["key"] for line in lines} == {routing_key(ids[0])}
        assert {(line["status"], line["grpc_status"]) for line in lines} == {("200", "0")}
        upstreams = {line["upstream"] for line in lines}
        assert len(upstreams) == 1, upstreams
        holder = upstreams.pop()
        for replica, old in zip(replicas, before, strict=True):
            now = replica.scrape()
            mine = replica.target == holder
            assert total(now, "mouse_active_sessions", model=case.name) == (case.batch if mine else 0)
            calls_now = total(now, "mouse_requests_total", method="BatchGetActionCall", code="OK")
            calls_old = total(old, "mouse_requests_total", method="BatchGetActionCall", code="OK")
            assert calls_now - calls_old == (case.steps if mine else 0)
    for b in range(case.batch):
        assert [int(step[b]) for step in got] == case.greedy(b)


def test_client_side_sharding_without_a_proxy(replicas: list[ServerProcess]) -> None:
    targets = [r.target for r in replicas]
    before = [r.scrape() for r in replicas]
    with ActionClient(targets, retry=NO_RETRY, timeout_s=30) as client:
        sessions = open_golden_sessions(client)
        try:
            actions = drive(sessions)
            placement = {sid: client.config.target_for(sid) for sid in sessions}
            check_replicas(replicas, before, placement, sessions)
        finally:
            close_all(sessions)
        check_golden(sessions, actions)

        # a group shares a routing key, so its batches go to one target
        case = GROUP_CASE
        with client.open_sessions(case.batch, case.name, temperature=0.0, recover=False) as group:
            holder = {client.config.target_for(group[i].id) for i in range(case.batch)}
            assert len(holder) == 1
            got = [
                group.get_actions([case.step_record(b, s) for b in range(case.batch)])
                for s in range(case.steps)
            ]
            for replica in replicas:
                active = total(replica.scrape(), "mouse_active_sessions", model=case.name)
                assert active == (case.batch if replica.target in holder else 0)
        for b in range(case.batch):
            assert [int(step[b]) for step in got] == case.greedy(b)
    for replica in replicas:
        assert total(replica.scrape(), "mouse_active_sessions") == 0


def healthcheck(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), target], capture_output=True, text=True, timeout=30
    )


def test_container_healthcheck(replicas: list[ServerProcess], nginx: Nginx) -> None:
    """The image's HEALTHCHECK script: 0 when SERVING (directly and through the proxy), else 1."""
    for target in (replicas[0].target, nginx.target):
        done = healthcheck(target)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout
    done = healthcheck(f"127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_unrouted_calls_spread_over_replicas(replicas: list[ServerProcess], nginx: Nginx) -> None:
    """Calls without a session header get a random key (nginx's $request_id)."""
    seen: defaultdict[str, int] = defaultdict(int)
    start = len(nginx.access_log())
    with ActionClient(nginx.target, retry=NO_RETRY, timeout_s=30) as client:
        for _ in range(24):
            client.list_models()
    lines = nginx.calls_to("ListModels", start, 24)
    assert len(lines) == 24, lines
    for line in lines:
        assert line["session"] == "-", line
        seen[line["upstream"]] += 1
    # 24 random keys on two replicas: all on one has probability 2**-23
    assert set(seen) == {r.target for r in replicas}, dict(seen)
