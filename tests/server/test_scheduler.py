"""The scheduler on a real model runner, in-process: batching, stragglers, deadlines, order."""

from __future__ import annotations

import asyncio
import time

import pytest

from mouse_serve.config import ModelSpec
from mouse_serve.errors import ServiceError
from mouse_serve.runner import ModelRunner, WorkItem, WorkResult
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
        slots = [scheduler.allocate_slot() for _ in range(4)]
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
                scheduler.free_slot(s)
            await scheduler.stop()
        return sizes[2:]

    assert run(scenario(0.2, 0.02)) == [4]  # waited for the late two
    assert run(scenario(0.0, 0.02)) == [2, 2]  # never waits
    assert run(scenario(0.05, 0.3)) == [2, 2]  # waited 50 ms at most, then went ahead


def test_token_budget_splits_batches(runner: ModelRunner) -> None:
    async def scenario() -> list[BatchStats]:
        stats: list[BatchStats] = []
        tps = runner.model.tokens_per_step
        scheduler = Scheduler(runner, max_batch_tokens=2 * tps, on_batch=stats.append)
        slots = [scheduler.allocate_slot() for _ in range(5)]
        futures = [scheduler.submit(item(runner, s)) for s in slots]
        scheduler.start()
        try:
            await asyncio.gather(*futures)
        finally:
            for s in slots:
                scheduler.free_slot(s)
            await scheduler.stop()
        return stats

    assert [b.size for b in run(scenario())] == [2, 2, 1]


def test_long_prefills_advance_chunk_by_chunk_between_decode_steps(runner: ModelRunner) -> None:
    """Prefills run in chunks of `prefill_chunk_steps` (4 here), batched together; a decode step
    that arrives meanwhile runs between two chunks instead of waiting for the whole prefill."""

    async def scenario() -> tuple[list[BatchStats], list[str]]:
        stats: list[BatchStats] = []
        finished: list[str] = []
        decodes: list[asyncio.Future[WorkResult]] = []
        tps = runner.model.tokens_per_step

        def on_batch(batch: BatchStats) -> None:
            stats.append(batch)
            if len(stats) == 1:  # the first chunk ran: the decode arrives before the next batch
                decodes.append(scheduler.submit(item(runner, slots[2])))
                decodes[0].add_done_callback(lambda _: finished.append("decode"))

        scheduler = Scheduler(runner, max_batch_tokens=4096, on_batch=on_batch)
        slots = [scheduler.allocate_slot() for _ in range(3)]
        prefills = [scheduler.submit(item(runner, s, steps=10)) for s in slots[:2]]
        for name, future in zip(("prefill", "prefill"), prefills, strict=True):
            future.add_done_callback(lambda _, name=name: finished.append(name))
        scheduler.start()
        try:
            while not decodes:
                await asyncio.sleep(0.001)
            results = await asyncio.gather(*prefills, decodes[0])
            assert all(0 <= r.action < runner.model.max_num_actions for r in results)
            assert [runner.pool.lengths[s] for s in slots] == [10 * tps, 10 * tps, tps]
        finally:
            for s in slots:
                scheduler.free_slot(s)
            await scheduler.stop()
        return stats, finished

    stats, finished = run(scenario())
    assert finished == ["decode", "prefill", "prefill"]
    tps = runner.model.tokens_per_step
    kinds = ["decode" if b.size == 1 and b.tokens == tps else "prefill" for b in stats]
    assert kinds.count("decode") == 1 and kinds[0] == "prefill" and kinds[-1] == "prefill"
    assert all(b.tokens <= 2 * 4 * tps for b in stats)  # chunks of at most 4 steps per prefill
    assert sum(b.tokens for b in stats) == (2 * 10 + 1) * tps
    assert sum(b.actions for b in stats) == 3


def test_one_step_prefill_chunks_leave_the_event_loop_free(runner: ModelRunner) -> None:
    """A prefill cut into one-step chunks is still a prefill: its chunks run on the runner
    thread (not inline on the event loop, which then could not read the decode that arrives
    meanwhile until the whole prefill ran) and do not count as decode steps."""

    async def scenario() -> tuple[list[str], float]:
        finished: list[str] = []
        stats: list[BatchStats] = []
        scheduler = Scheduler(runner, max_batch_tokens=4096, on_batch=stats.append)
        scheduler.chunk_steps = 1
        slots = [scheduler.allocate_slot() for _ in range(2)]
        prefill = scheduler.submit(item(runner, slots[0], steps=12))
        prefill.add_done_callback(lambda _: finished.append("prefill"))
        scheduler.start()
        try:
            while not stats:  # the first chunk ran
                await asyncio.sleep(0.001)
            decode = scheduler.submit(item(runner, slots[1]))
            decode.add_done_callback(lambda _: finished.append("decode"))
            await asyncio.gather(prefill, decode)
        finally:
            for s in slots:
                scheduler.free_slot(s)
            await scheduler.stop()
        return finished, scheduler._decode_s

    finished, decode_s = run(scenario())
    assert finished == ["decode", "prefill"]
    assert decode_s > 0  # the one decode step, measured as one


def test_freed_slot_forgets_its_statistics(runner: ModelRunner) -> None:
    async def scenario() -> None:
        scheduler = Scheduler(runner, max_batch_tokens=4096)
        scheduler.start()
        slot = scheduler.allocate_slot()
        try:
            await scheduler.submit(item(runner, slot))
            await scheduler.submit(item(runner, slot))
            assert slot in scheduler._turnaround and slot in scheduler._replied
        finally:
            scheduler.free_slot(slot)
            await scheduler.stop()
        assert slot not in scheduler._turnaround and slot not in scheduler._replied

    run(scenario())


def test_expired_deadline_is_refused_without_running(runner: ModelRunner) -> None:
    async def scenario() -> None:
        scheduler = Scheduler(runner, max_batch_tokens=4096)
        slot = scheduler.allocate_slot()
        try:
            late = scheduler.submit(item(runner, slot), deadline=time.monotonic() - 1)
            scheduler.start()
            with pytest.raises(ServiceError, match="deadline passed before it ran"):
                await late
            assert runner.pool.lengths[slot] == 0
        finally:
            scheduler.free_slot(slot)
            await scheduler.stop()

    run(scenario())


def test_cancelled_queued_item_is_withdrawn(runner: ModelRunner) -> None:
    async def scenario() -> None:
        scheduler = Scheduler(runner, max_batch_tokens=4096)
        slot, other = scheduler.allocate_slot(), scheduler.allocate_slot()
        try:
            pending = scheduler.submit(item(runner, slot))
            assert scheduler.cancel(pending) and pending.cancelled()
            assert scheduler.queue_length == 0
            scheduler.start()
            await asyncio.sleep(0.05)
            assert runner.pool.lengths[slot] == 0
            # once a prefill's first chunk ran, it is applied whole: it cannot be withdrawn
            started = scheduler.submit(item(runner, other, steps=10))
            while runner.pool.lengths[other] == 0:
                await asyncio.sleep(0.001)
            assert not scheduler.cancel(started)
            await started
            assert runner.pool.lengths[other] == 10 * runner.model.tokens_per_step
        finally:
            scheduler.free_slot(slot)
            scheduler.free_slot(other)
            await scheduler.stop()

    run(scenario())


def test_every_model_of_a_server_runs_on_one_runner_thread() -> None:
    """Forwards of different models never overlap, so one model's per-forward CPU thread
    setting (`torch.set_num_threads` is process-wide) cannot change another's mid-forward."""
    from mouse_serve.config import parse_args
    from mouse_serve.server import Server, load_runners

    config = parse_args(["--model", f"a={CASE.checkpoint}", "--model", f"b={CASE.checkpoint}"], environ={})
    runners = load_runners(config)

    async def scenario() -> None:
        server = Server(config, runners)  # grpc.aio needs a running loop
        try:
            executors = {id(s._executor) for s in server.schedulers.values()}
            assert len(server.schedulers) == 2 and executors == {id(server.executor)}
            assert server.executor._max_workers == 1
        finally:
            server.executor.shutdown()

    run(scenario())


def test_a_failing_queue_callback_fails_no_submission(
    runner: ModelRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """Items are queued before the queue length is reported: if reporting raised out of
    `submit_many`, the caller would hold no future for items that still run (applied, never
    recorded)."""

    def broken(length: int) -> None:
        raise RuntimeError("metrics bug")

    async def scenario() -> list[WorkResult]:
        scheduler = Scheduler(runner, max_batch_tokens=4096, on_queue=broken)
        slots = [scheduler.allocate_slot() for _ in range(2)]
        scheduler.start()
        try:
            return list(await asyncio.gather(*scheduler.submit_many([item(runner, s) for s in slots])))
        finally:
            for s in slots:
                scheduler.free_slot(s)
            await scheduler.stop()

    results = run(scenario())
    assert len(results) == 2 and all(0 <= r.action < runner.model.max_num_actions for r in results)
    assert "reporting the queue length failed" in caplog.text
