"""End to end: every golden row as its own session returns exactly the reference's greedy actions."""

from __future__ import annotations

import asyncio

import pytest

from mouse_client import ActionClient, AsyncActionClient
from tests.helpers import GoldenCase
from tests.server.conftest import CASES
from tests.server_process import ServerProcess


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> GoldenCase:
    return request.param


def test_one_step_at_a_time(any_server: ServerProcess, case: GoldenCase) -> None:
    trim = case.meta["num_actions"]
    client = ActionClient(any_server.target)
    for b in range(case.batch):
        with (
            client.open_session(case.name, seed=0) as full,
            client.open_session(case.name, num_actions=trim) as cut,
        ):
            got = [full.get_action(case.step_record(b, s), temperature=0.0) for s in range(case.steps)]
            got_trim = [cut.get_action(case.step_record(b, s), temperature=0.0) for s in range(case.steps)]
        assert got == case.greedy(b)
        assert got_trim == case.greedy(b, trimmed=True)
    client.close()
    if "--decode-graphs" in any_server.args:  # the path under test really ran: built while
        # serving on the CPU, captured before serving on CUDA
        assert "fixed-shape decode for" in any_server.log or "decode graphs captured in" in any_server.log


def test_all_rows_concurrently(any_server: ServerProcess, case: GoldenCase) -> None:
    """Rows driven at once from the asyncio client share forward passes."""

    async def drive() -> tuple[list[list[int]], list[list[int]]]:
        async with AsyncActionClient(any_server.target) as ac:
            rows = range(case.batch)
            full = await asyncio.gather(*(ac.open_session(case.name, temperature=0.0) for _ in rows))
            cut = await asyncio.gather(
                *(
                    ac.open_session(case.name, temperature=0.0, num_actions=case.meta["num_actions"])
                    for _ in rows
                )
            )
            got: list[list[int]] = [[] for _ in rows]
            got_trim: list[list[int]] = [[] for _ in rows]
            for s in range(case.steps):
                actions = await asyncio.gather(
                    *(full[b].get_action(case.step_record(b, s)) for b in rows),
                    *(cut[b].get_action(case.step_record(b, s)) for b in rows),
                )
                for b in rows:
                    got[b].append(actions[b])
                    got_trim[b].append(actions[case.batch + b])
            await asyncio.gather(*(x.close() for x in full + cut))
            return got, got_trim

    got, got_trim = asyncio.run(drive())
    for b in range(case.batch):
        assert got[b] == case.greedy(b)
        assert got_trim[b] == case.greedy(b, trimmed=True)


def test_prefills_of_several_steps(client: ActionClient, case: GoldenCase) -> None:
    """Steps sent in the case's chunks: each reply is the greedy action of the chunk's last step."""
    for b in range(case.batch):
        with client.open_session(case.name, temperature=0.0) as session:
            start = 0
            for chunk in case.meta["chunks"]:
                records = [case.step_record(b, s) for s in range(start, start + chunk)]
                reply = session.get_reply(records)
                start += chunk
                assert reply.action == case.greedy(b)[start - 1]
                assert reply.context_steps == start


def test_batched_rpc_and_stream(client: ActionClient, case: GoldenCase) -> None:
    with client.open_sessions(case.batch, case.name, temperature=0.0) as group:
        got = [
            group.get_actions([case.step_record(b, s) for b in range(case.batch)]) for s in range(case.steps)
        ]
    for b in range(case.batch):
        assert [int(step[b]) for step in got] == case.greedy(b)
    for b in range(case.batch):
        with client.open_session(case.name, temperature=0.0) as session, session.stream() as stream:
            assert [stream.get_action(case.step_record(b, s)) for s in range(case.steps)] == case.greedy(b)
