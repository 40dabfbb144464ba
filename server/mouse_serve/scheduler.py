"""Scheduler: batches every pending step of a model into one forward on the runner thread.

Whenever the model is free, the scheduler takes the queued work items in arrival order (one per
session at most: a session lock keeps a second one out until the first is answered) up to a
padded-token budget, runs them as one ragged batch on the runner's thread, and resolves each
item's future. The event loop keeps accepting and queueing requests meanwhile.

Before a forward it may wait briefly for stragglers. Each session's turnaround (from its reply
to its next step) is tracked; sessions whose next step is due within `max_batch_wait_s` (at
most half a typical forward) are waited for, so a population of workers converges on full
batches instead of alternating half batches, while a client that steps its sessions one after
another (whose next steps are not due yet) is never kept waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mouse_serve.errors import deadline_exceeded
from mouse_serve.runner import ModelRunner, WorkItem, WorkResult

log = logging.getLogger(__name__)
OVERDUE = 2.0  # a session later than twice its usual turnaround has stopped stepping for now


@dataclass
class BatchStats:
    """Reported after every forward (for metrics)."""

    model: str
    size: int
    tokens: int
    queue_wait_s: list[float]
    model_time_s: float


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future[WorkResult]
    deadline: float | None  # time.monotonic() deadline
    queued_at: float = field(default_factory=time.monotonic)


class Scheduler:
    """Per-model batching loop in front of a `ModelRunner`."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch_tokens: int,
        max_batch_wait_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_wait_s = max_batch_wait_s
        self._replied: dict[int, float] = {}  # slot -> when its last step was answered
        self._turnaround: dict[int, float] = {}  # slot -> moving average of reply-to-next-step
        self._forward_s = 0.0  # moving average of one forward
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"runner-{runner.spec.name}")
        self._task: asyncio.Task[None] | None = None
        self.busy = False

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"scheduler-{self.runner.spec.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, item: WorkItem, deadline: float | None = None) -> asyncio.Future[WorkResult]:
        """Queue `item`; the future resolves once it has been applied."""
        future: asyncio.Future[WorkResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, deadline)
        self._queue.append(pending)
        replied = self._replied.pop(item.slot, None)
        if replied is not None:
            gap = pending.queued_at - replied
            previous = self._turnaround.get(item.slot, gap)
            self._turnaround[item.slot] = 0.5 * previous + 0.5 * gap
        self._wake.set()
        return future

    def cancel(self, future: asyncio.Future[WorkResult]) -> bool:
        """Withdraw a still-queued item; False when it is already being computed."""
        for pending in self._queue:
            if pending.future is future:
                self._queue.remove(pending)
                future.cancel()
                return True
        return future.cancelled()

    def _tokens(self, item: WorkItem) -> int:
        steps_in_batch = (item.num_steps - 1) % self.runner.prefill_chunk_steps + 1
        return steps_in_batch * self.runner.model.tokens_per_step

    def _take(self) -> list[_Pending]:
        """Pop a batch in arrival order within the padded-token budget (always at least one)."""
        batch: list[_Pending] = []
        widest = 0
        now = time.monotonic()
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():
                self._queue.popleft()
                continue
            if pending.deadline is not None and now > pending.deadline:
                self._queue.popleft()
                pending.future.set_exception(
                    deadline_exceeded("the request's deadline passed before it ran; it was not applied.")
                )
                continue
            tokens = self._tokens(pending.item)
            if batch and (len(batch) + 1) * max(widest, tokens) > self.max_batch_tokens:
                break
            widest = max(widest, tokens)
            batch.append(self._queue.popleft())
        return batch

    async def _await_stragglers(self) -> None:
        """Wait (briefly) for sessions whose next step is due about now."""
        budget = min(self.max_batch_wait_s, 0.5 * self._forward_s)
        if budget <= 0:
            return
        now = time.monotonic()
        due = 0
        for slot, replied in list(self._replied.items()):
            turnaround = self._turnaround.get(slot, float("inf"))
            if replied + OVERDUE * turnaround < now - budget:
                del self._replied[slot]
            elif replied + turnaround <= now + budget:
                due += 1
        wanted, deadline = len(self._queue) + due, now + budget
        while len(self._queue) < wanted and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._await_stragglers()
            batch = self._take()
            if not batch:
                continue
            started = time.monotonic()
            self.busy = True
            try:
                results = await loop.run_in_executor(self._executor, self.runner.run, [p.item for p in batch])
            except Exception as exc:
                log.exception("forward of %d item(s) failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.busy = False
            done = time.monotonic()
            elapsed = done - started
            self._forward_s = elapsed if not self._forward_s else 0.9 * self._forward_s + 0.1 * elapsed
            for p, result in zip(batch, results, strict=True):
                self._replied[p.item.slot] = done
                if not p.future.done():
                    p.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(
                    BatchStats(
                        self.runner.spec.name,
                        len(batch),
                        sum(self._tokens(p.item) for p in batch),
                        [started - p.queued_at for p in batch],
                        elapsed,
                    )
                )
