"""The scheduler on a real model runner, in-process: batching, stragglers, deadlines, order."""

from __future__ import annotations

import asyncio
import time

import pytest

from mouse_serve.config import ModelSpec
from mouse_serve.errors import ServiceError
from mouse_serve.runner import ModelRunner, WorkItem
from mouse_serve.scheduler import BatchStats, Scheduler
from tests.helpers import golden_cases

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    spec = ModelSpec("default", str(CASE.checkpoint))
    return ModelRunner.load(
        spec, device="cpu", dtype="float32", max_sessions=8, max_context_steps=64, prefill_chunk_steps=4
    )


def item(runner: ModelRunner, slot: int, s: int = 0, steps: int = 1) -> WorkItem:
    fields = {k: v[0, s : s + steps].copy() for k, v in CASE.input_arrays.items()}
    return WorkItem(slot, fields, steps, True, 0.0, runner.model.max_num_actions, 0, 1, False)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_waits_for_stragglers_then_runs_one_batch(runner: ModelRunner) -> None:
    """Sessions that answer fast are waited for; a session whose next step is not due is not."""

    async def scenario(wait_s: float, late_s: float) -> list[int]:
        sizes: list[int] = []
        scheduler = Scheduler(
            runner, max_batch_tokens=4096, max_batch_wait_s=wait_s, on_batch=lambda b: sizes.append(b.size)
        )
        scheduler.start()
        slots = [runner.pool.allocate() for _ in range(4)]
        try:
            for _ in range(2):  # two quick rounds: every session's turnaround is ~0
                await asyncio.gather(*(scheduler.submit(item(runner, s)) for s in slots))
            scheduler._forward_s = 1.0  # a slow model: waiting is worth up to wait_s
            first = [scheduler.submit(item(runner, s)) for s in slots[:2]]
            await asyncio.sleep(late_s)  # two workers are late
            rest = [scheduler.submit(item(runner, s)) for s in slots[2:]]
            await asyncio.gather(*first, *rest)
        finally:
            for s in slots:
                runner.pool.free(s)
            await scheduler.stop()
        return sizes[2:]

    assert run(scenario(0.2, 0.02)) == [4]  # waited for the late two
    assert run(scenario(0.0, 0.02)) == [2, 2]  # never waits
    assert run(scenario(0.05, 0.3)) == [2, 2]  # waited 50 ms at most, then went ahead


def test_token_budget_splits_batches_and_long_prefills_run_in_chunks(runner: ModelRunner) -> None:
    async def scenario() -> list[BatchStats]:
        stats: list[BatchStats] = []
        tps = runner.model.tokens_per_step
        scheduler = Scheduler(runner, max_batch_tokens=2 * 2 * tps, on_batch=stats.append)
        slots = [runner.pool.allocate() for _ in range(5)]
        futures = [scheduler.submit(item(runner, s, steps=10)) for s in slots]  # each: chunks of 4, 4, then 2
        scheduler.start()
        try:
            results = await asyncio.gather(*futures)
        finally:
            await scheduler.stop()
        for s in slots:
            assert runner.pool.lengths[s] == 10 * tps
            runner.pool.free(s)
        assert all(0 <= r.action < runner.model.max_num_actions for r in results)
        return stats

    stats = run(scenario())
    # each item's last chunk (2 steps) is batched; 2 items x 2 steps fill the budget
    assert [b.size for b in stats] == [2, 2, 1]


def test_expired_deadline_is_refused_without_running(runner: ModelRunner) -> None:
    async def scenario() -> None:
        scheduler = Scheduler(runner, max_batch_tokens=4096)
        slot = runner.pool.allocate()
        try:
            late = scheduler.submit(item(runner, slot), deadline=time.monotonic() - 1)
            scheduler.start()
            with pytest.raises(ServiceError, match="deadline passed before it ran"):
                await late
            assert runner.pool.lengths[slot] == 0
        finally:
            runner.pool.free(slot)
            await scheduler.stop()

    run(scenario())


def test_cancelled_queued_item_is_withdrawn(runner: ModelRunner) -> None:
    async def scenario() -> None:
        scheduler = Scheduler(runner, max_batch_tokens=4096)
        slot = runner.pool.allocate()
        try:
            pending = scheduler.submit(item(runner, slot))
            assert scheduler.cancel(pending) and pending.cancelled()
            assert scheduler.queue_length == 0
            scheduler.start()
            await asyncio.sleep(0.05)
            assert runner.pool.lengths[slot] == 0
        finally:
            runner.pool.free(slot)
            await scheduler.stop()

    run(scenario())
