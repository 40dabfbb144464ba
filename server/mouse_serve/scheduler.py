"""Scheduler: owns a model's KV slots and batches every pending step into forwards on the runner
thread.

Sessions get their KV slot from the scheduler (`allocate_slot`, `free_slot`); a slot is emptied
by the runner as part of the next batch that uses it (`WorkItem.reset`), so the pool is only
written by the runner thread, in forward order.

Whenever the model is free, the scheduler forms one batch and runs it on the runner thread
(one thread shared by every model of the server, so CPU thread settings never interleave);
the event loop keeps accepting requests meanwhile. A batch is either the queued single-step
items (decode steps, in arrival order, within a padded-token budget) or the next chunk of every
waiting multi-step item (prefills). The two kinds alternate when both wait, so a prefill is never
starved, and a decode step waits for at most one prefill batch. Chunks are at most
`prefill_chunk_steps` steps; while sessions are stepping, they shrink so that a prefill batch
takes about as long as a decode batch (both measured as they run), which keeps every stepping
session's latency within about twice its own forward whatever the prefills around it.

Before a decode batch it may wait briefly for stragglers. Each session's turnaround (from its
reply to its next step) is tracked; sessions whose next step is due within `max_batch_wait_s`
(at most half a typical forward) are waited for, so a population of workers converges on full
batches instead of alternating half batches, while a client that steps its sessions one after
another (whose next steps are not due yet) is never kept waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

from mouse_serve.errors import deadline_exceeded
from mouse_serve.runner import ModelRunner, RunnerExecutor, StalePlan, WorkItem, WorkResult

log = logging.getLogger(__name__)
OVERDUE = 2.0  # a session later than twice its usual turnaround has stopped stepping for now
DECODE_ACTIVE_S = 1.0  # sessions count as stepping for this long after a decode batch


@dataclass
class BatchStats:
    """Reported after every forward (for metrics)."""

    model: str
    size: int  # sessions in the forward
    tokens: int
    queue_wait_s: list[float]  # of the requests it finished
    model_time_s: float
    actions: int  # requests it finished (the others were a prefill's leading chunks)
    stages: dict[str, float] = field(default_factory=dict)  # handoff and the runner's stages


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future[WorkResult]
    deadline: float | None  # time.monotonic() deadline; only checked before the first chunk
    queued_at: float  # time.monotonic()
    done_steps: int = 0  # steps already applied (chunks of a prefill)
    oldest_version: int = 0  # model version of its first chunk (weights may change between chunks)

    @property
    def started(self) -> bool:
        return self.done_steps > 0


class Scheduler:
    """Per-model slot owner and batching loop in front of a `ModelRunner`."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_tokens: int,
        max_batch_wait_s: float = 0.0,
        executor: Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.pool = runner.pool
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait_s = max_batch_wait_s
        self.chunk_steps = runner.prefill_chunk_steps
        self._replied: dict[int, float] = {}  # slot -> when its last step was answered
        self._turnaround: dict[int, float] = {}  # slot -> moving average of reply-to-next-step
        self._forward_s = 0.0  # moving average of one forward
        self._decode_s = 0.0  # moving average of one decode batch
        self._prefill_token_s = 0.0  # moving average of a prefill batch's time per token
        self._last_decode = -float("inf")  # when the last decode batch finished
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._decodes: deque[_Pending] = deque()  # single-step items
        self._prefills: deque[_Pending] = deque()  # multi-step items, chunk by chunk
        self._prefill_next = False  # alternate between the two kinds when both wait
        self._wake = asyncio.Event()
        self._own_executor = executor is None
        self._executor = executor or RunnerExecutor()
        self._task: asyncio.Task[None] | None = None

    # -- slots ----------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.pool.num_free

    def allocate_slot(self) -> int:
        """Claim an empty KV slot for a new session (`CacheFullError` when none is free)."""
        return self.pool.allocate()

    def free_slot(self, slot: int) -> None:
        """Give a closed session's slot back; its statistics go with it."""
        self._replied.pop(slot, None)
        self._turnaround.pop(slot, None)
        self.pool.free(slot)

    # -- queue ----------------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._decodes) + len(self._prefills)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"scheduler-{self.runner.spec.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def submit(self, item: WorkItem, deadline: float | None = None) -> asyncio.Future[WorkResult]:
        """Queue `item`; the future resolves once all its steps have been applied."""
        return self.submit_many([item], deadline)[0]

    def submit_many(
        self, items: Sequence[WorkItem], deadline: float | None = None
    ) -> list[asyncio.Future[WorkResult]]:
        """Queue `items` in order (one wake-up for all); a future per item, as `submit`."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for item in items:
            future: asyncio.Future[WorkResult] = loop.create_future()
            futures.append(future)
            (self._decodes if item.num_steps == 1 else self._prefills).append(
                _Pending(item, future, deadline, now)
            )
            replied = self._replied.pop(item.slot, None)
            if replied is not None:
                gap = now - replied
                previous = self._turnaround.get(item.slot, gap)
                self._turnaround[item.slot] = 0.5 * previous + 0.5 * gap
        self._queue_changed()
        self._wake.set()
        return futures

    def cancel(self, future: asyncio.Future[WorkResult]) -> bool:
        """Withdraw an item none of whose steps ran yet; False once it has started."""
        for queue in (self._decodes, self._prefills):
            for pending in queue:
                if pending.future is future:
                    if pending.started:
                        return False
                    queue.remove(pending)
                    future.cancel()
                    self._queue_changed()
                    return True
        return future.cancelled()

    def _queue_changed(self) -> None:
        if self._on_queue is None:
            return
        try:
            self._on_queue(self.queue_length)
        except Exception:  # a metrics bug must not fail `submit_many` after it queued the items
            log.exception("reporting the queue length failed")

    def _tokens(self, steps: int) -> int:
        return steps * self.runner.model.tokens_per_step

    def _live(self, queue: deque[_Pending], now: float) -> list[_Pending]:
        """Drop finished items and refuse those whose deadline passed before they started."""
        live = []
        for pending in queue:
            if pending.future.done():
                continue
            if not pending.started and pending.deadline is not None and now > pending.deadline:
                pending.future.set_exception(
                    deadline_exceeded("the request's deadline passed before it ran; it was not applied.")
                )
                continue
            live.append(pending)
        queue.clear()
        queue.extend(live)
        return live

    def _take(self) -> tuple[list[_Pending], list[WorkItem]]:
        """The next batch: (pending entries, the work items to run for them)."""
        now = time.monotonic()
        decodes, prefills = self._live(self._decodes, now), self._live(self._prefills, now)
        use_prefills = bool(prefills) and (self._prefill_next or not decodes)
        self._prefill_next = not use_prefills
        queue = self._prefills if use_prefills else self._decodes
        chunk = self._chunk_limit(len(queue), now) if use_prefills else 1
        batch: list[_Pending] = []
        widest = 0
        while queue:
            pending = queue[0]
            steps = min(pending.item.num_steps - pending.done_steps, chunk)
            tokens = self._tokens(steps)
            if batch and (len(batch) + 1) * max(widest, tokens) > self.max_batch_tokens:
                break
            widest = max(widest, tokens)
            batch.append(queue.popleft())
        return batch, [self._chunk(p, chunk) for p in batch]

    def _chunk_limit(self, items: int, now: float) -> int:
        """Steps per prefill item in the next prefill batch: `prefill_chunk_steps`, or while
        sessions are stepping, what makes the batch about as long as a decode batch."""
        if now - self._last_decode > DECODE_ACTIVE_S or not (self._decode_s and self._prefill_token_s):
            return self.chunk_steps
        tokens = self._decode_s / self._prefill_token_s
        return max(1, min(self.chunk_steps, int(tokens / (items * self.runner.model.tokens_per_step))))

    def _chunk(self, pending: _Pending, chunk: int) -> WorkItem:
        item = pending.item
        if item.num_steps == 1 or (pending.done_steps == 0 and item.num_steps <= chunk):
            return item
        start = pending.done_steps
        stop = min(start + chunk, item.num_steps)
        steps = {k: v[start:stop] for k, v in item.steps.items()}
        return replace(item, steps=steps, num_steps=stop - start, reset=item.reset and start == 0)

    @staticmethod
    def _drop_stale(
        batch: list[_Pending], items: list[WorkItem], results: list[WorkResult | None]
    ) -> tuple[list[_Pending], list[WorkItem], list[WorkResult]]:
        """Fail the items the runner did not run (planned for weights replaced since: their
        sessions plan them again); the rest of the batch."""
        kept: list[tuple[_Pending, WorkItem, WorkResult]] = []
        for pending, item, result in zip(batch, items, results, strict=True):
            if result is not None:
                kept.append((pending, item, result))
            elif not pending.future.done():
                pending.future.set_exception(StalePlan())
        return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]

    def _run_inline(self, batch: list[_Pending]) -> bool:
        """Whether to run this batch on the event loop's thread: one decode step while nothing
        else waits and the runner thread is idle (a single session stepping alone), where the
        hand-offs to and from the runner thread would cost more than blocking the loop briefly.
        Never a prefill's chunk, even of one step: its next chunk follows at once, and the loop
        would not read another request until the whole prefill ran."""
        executor = self._executor
        return (
            len(batch) == 1
            and batch[0].item.num_steps == 1
            and not self.queue_length
            and isinstance(executor, RunnerExecutor)
            and executor.idle
        )

    async def _await_stragglers(self) -> None:
        """Wait (briefly) for sessions whose next step is due about now."""
        budget = min(self.max_batch_wait_s, 0.5 * self._forward_s)
        if budget <= 0 or not self._decodes:
            return
        now = time.monotonic()
        due = 0
        for slot, replied in list(self._replied.items()):
            turnaround = self._turnaround.get(slot, float("inf"))
            if replied + OVERDUE * turnaround < now - budget:
                del self._replied[slot]
            elif replied + turnaround <= now + budget:
                due += 1
        wanted, deadline = len(self._decodes) + due, now + budget
        while len(self._decodes) < wanted and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue_length:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._prefills or not self._prefill_next:
                await self._await_stragglers()
            batch, items = self._take()
            self._queue_changed()
            if not batch:
                continue
            started = time.monotonic()
            handed = time.perf_counter()
            try:
                if self._run_inline(batch):
                    results = self.runner.run(items)
                else:
                    results = await loop.run_in_executor(self._executor, self.runner.run, items)
            except Exception as exc:
                log.exception("forward of %d item(s) failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            if any(result is None for result in results):
                batch, items, results = self._drop_stale(batch, items, results)
                if not batch:
                    continue
            back = time.perf_counter()
            done = time.monotonic()
            elapsed = done - started
            timing = self.runner.timing
            stages = {**timing.stages, "handoff": (timing.started - handed) + (back - timing.ended)}
            self._forward_s = _average(self._forward_s, elapsed)
            if all(p.item.num_steps == 1 for p in batch):  # decodes, not one-step prefill chunks
                self._decode_s = _average(self._decode_s, elapsed)
                self._last_decode = done
            else:
                tokens = sum(self._tokens(i.num_steps) for i in items)
                self._prefill_token_s = _average(self._prefill_token_s, elapsed / tokens)
            finished = []
            for p, item, result in zip(batch, items, results, strict=True):
                p.done_steps += item.num_steps
                p.oldest_version = p.oldest_version or result.model_version
                if p.done_steps < p.item.num_steps:
                    self._prefills.append(p)  # its next chunk runs in a later batch
                    continue
                finished.append(p)
                self._replied[p.item.slot] = done
                result.oldest_version = p.oldest_version
                if not p.future.done():
                    p.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(
                    BatchStats(
                        self.runner.spec.name,
                        len(items),
                        sum(self._tokens(i.num_steps) for i in items),
                        [started - p.queued_at for p in finished],
                        elapsed,
                        len(finished),
                        stages,
                    )
                )


def _average(average: float, sample: float) -> float:
    """An exponential moving average that starts at its first sample."""
    return sample if not average else 0.9 * average + 0.1 * sample
