"""Sessions: one per environment stream, bound to a model and a KV-cache slot.

A session applies its requests strictly in order (a lock held from the sequence-number check
until the result is recorded, also when the caller stops waiting; a batch of distinct idle
sessions takes all their locks at once and is applied in one pass). Beside its last reply it
keeps a digest of the request that produced it, so a retry of that request (same seq, same
content) gets the same reply without touching the cache, and the same seq with other content is
refused. It keeps its recent steps for re-prefilling at the context limit and after a failed
forward, and expires when idle. Every status the server answers for a request means the request
was not applied.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from mouse_core import CacheFullError
from mouse_serve.errors import (
    ServiceError,
    already_exists,
    exhausted,
    failed_precondition,
    invalid,
    not_found,
    permission_denied,
    unavailable,
)
from mouse_serve.metrics import Metrics
from mouse_serve.runner import ModelRunner, StalePlan, WorkItem, WorkResult
from mouse_serve.scheduler import Scheduler

log = logging.getLogger(__name__)
SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
GONE_REMEMBERED = 65536  # closed/expired session ids remembered, to say why they are gone


def check_sampling(temperature: float | None, num_actions: int | None, max_num_actions: int) -> None:
    """INVALID_ARGUMENT unless the sampling settings are usable (None = keep the default)."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise invalid(f"temperature must be a finite number >= 0, got {temperature}.", field="temperature")
    if num_actions is not None and not 1 <= num_actions <= max_num_actions:
        raise invalid(
            f"num_actions must be in [1, {max_num_actions}], got {num_actions}.", field="num_actions"
        )


class ContextPolicy(IntEnum):
    """Mirrors mouse.action.v1.ContextPolicy."""

    UNSPECIFIED = 0
    SLIDING = 1
    RESET = 2
    REJECT = 3


class UpdatePolicy(IntEnum):
    """Mirrors mouse.action.v1.UpdatePolicy: what a session's cache does after a weight update."""

    UNSPECIFIED = 0
    REFILL = 1
    KEEP = 2
    RESET = 3


class StepHistory:
    """The most recent `capacity` steps of a session, per field."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._arrays: dict[str, np.ndarray] = {}
        self._end = 0  # steps stored in the arrays; the window is the last `capacity` of them

    def __len__(self) -> int:
        return min(self._end, self.capacity)

    def clear(self) -> None:
        self._end = 0

    def append(self, steps: dict[str, np.ndarray], n: int) -> None:
        if n >= self.capacity:
            steps = {k: v[n - self.capacity :] for k, v in steps.items()}
            self._end, n = 0, self.capacity
        if not self._arrays:  # twice the window, so appends shift rarely
            self._arrays = {k: np.empty((2 * self.capacity, *v.shape[1:]), v.dtype) for k, v in steps.items()}
        if self._end + n > 2 * self.capacity:
            keep = len(self)
            for a in self._arrays.values():
                a[:keep] = a[self._end - keep : self._end]
            self._end = keep
        for k, v in steps.items():
            self._arrays[k][self._end : self._end + n] = v
        self._end += n

    def recent(self, k: int) -> dict[str, np.ndarray]:
        k = min(k, len(self))
        return {name: a[self._end - k : self._end] for name, a in self._arrays.items()}


class SessionLock:
    """A FIFO asyncio lock that can also be taken without waiting (`try_acquire`), so that a batch
    takes the locks of all its sessions at once or none. A release hands the lock straight to the
    next waiter: it is never free while someone waits for it."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            else:  # handed over just as the wait was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass
class ActionResult:
    """What a GetAction answers (transport-independent)."""

    session_id: str
    seq: int
    action: int
    scores: np.ndarray | None
    context_steps: int
    context_truncated: bool
    model_version: int
    model_tag: str


@dataclass
class Session:
    id: str
    model: str
    slot: int
    owner: str | None
    seed: int
    temperature: float
    num_actions: int
    policy: ContextPolicy
    max_context_steps: int
    history: StepHistory
    on_update: UpdatePolicy = UpdatePolicy.REFILL
    cache_version: int = 0  # oldest model version whose K/V the cache holds (0: empty)
    start_seq: int = 0
    last_seq: int = 0
    last_digest: bytes = b""  # of the request that produced last_reply
    last_reply: ActionResult | None = None
    context_steps: int = 0  # steps in the KV cache
    empty_slot: bool = True  # the next forward must empty the slot first (new, reset, resync)
    resync: bool = False  # the cache may disagree with the history: re-prefill on next step
    closed: bool = False
    in_flight: int = 0  # requests applying or waiting for the lock
    last_used: float = field(default_factory=time.monotonic)
    lock: SessionLock = field(default_factory=SessionLock)


@dataclass
class StepRequest:
    """One GetAction for a session, decoded and validated."""

    session: Session
    seq: int  # 0: the session's next
    digest: bytes  # identifies the content (steps and reply options), for retries
    steps: dict[str, np.ndarray]
    num_steps: int
    temperature: float | None = None  # None: the session's
    num_actions: int | None = None
    want_scores: bool = False


@dataclass
class _Applying:
    """A request past its checks, with the work item that applies it."""

    request: StepRequest
    seq: int
    item: WorkItem
    truncated: bool
    drops_context: bool  # the session's context (stale after an update, policy RESET) goes


@dataclass(frozen=True)
class SessionSettings:
    """OpenSession parameters (None = default)."""

    model: str
    seed: int | None = None
    temperature: float | None = None
    num_actions: int | None = None
    policy: int = ContextPolicy.UNSPECIFIED
    max_context_steps: int | None = None
    session_id: str = ""
    start_seq: int = 0
    on_update: int = UpdatePolicy.UNSPECIFIED


class SessionManager:
    """All sessions of all models; the only place session state changes."""

    def __init__(
        self,
        runners: dict[str, ModelRunner],
        schedulers: dict[str, Scheduler],
        *,
        default_policy: ContextPolicy,
        idle_timeout_s: float,
        default_on_update: UpdatePolicy = UpdatePolicy.REFILL,
        max_sessions_per_owner: int = 0,
        max_pending_per_session: int = 4,
        metrics: Metrics | None = None,
    ) -> None:
        self.runners = runners
        self.schedulers = schedulers
        self.default_policy = default_policy
        self.default_on_update = default_on_update
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions_per_owner = max_sessions_per_owner
        self.max_pending_per_session = max_pending_per_session
        self._sessions: dict[str, Session] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> "closed" | "expired"
        self._counts = dict.fromkeys(runners, 0)
        self.metrics = metrics or Metrics()

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, model: str) -> int:
        return self._counts.get(model, 0)

    def runner(self, model: str) -> ModelRunner:
        name = model or "default"
        if name not in self.runners:
            raise not_found(
                f"model {name!r} is not served here; available: {sorted(self.runners)}.",
                "MODEL_NOT_FOUND",
                model=name,
            )
        return self.runners[name]

    def _count(self, model: str, delta: int) -> None:
        self._counts[model] += delta
        count = self._counts[model]
        self.metrics.sessions_changed(model, count, count * self.runners[model].pool.bytes_per_slot)

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, settings: SessionSettings, owner: str | None) -> Session:
        runner = self.runner(settings.model)
        model = runner.model
        check_sampling(settings.temperature, settings.num_actions, model.max_num_actions)
        limit = runner.max_context_steps
        if settings.max_context_steps is not None and not 1 <= settings.max_context_steps <= limit:
            raise invalid(
                f"max_context_steps must be in [1, {limit}] for model {runner.spec.name!r}, "
                f"got {settings.max_context_steps}.",
                field="max_context_steps",
            )
        if settings.policy not in ContextPolicy._value2member_map_:
            raise invalid(
                f"context_policy {settings.policy} is unknown; expected 0-3 (see ContextPolicy).",
                field="context_policy",
            )
        if settings.on_update not in UpdatePolicy._value2member_map_:
            raise invalid(
                f"on_update {settings.on_update} is unknown; expected 0-3 (see UpdatePolicy).",
                field="on_update",
            )
        session_id = settings.session_id or secrets.token_urlsafe(16)
        if not SESSION_ID.match(session_id):
            raise invalid(
                f"session_id {session_id!r} is malformed; expected 1-128 characters of [A-Za-z0-9._-].",
                field="session_id",
            )
        if session_id in self._sessions:
            raise already_exists(
                f"session_id {session_id!r} is already in use; propose another.",
                "SESSION_ID_IN_USE",
                session_id=session_id,
            )
        if self.max_sessions_per_owner and owner is not None:
            owned = sum(1 for s in self._sessions.values() if s.owner == owner)
            if owned >= self.max_sessions_per_owner:
                raise exhausted(
                    f"this token already holds {owned} sessions (limit {self.max_sessions_per_owner}); "
                    "close some first.",
                    "TOKEN_SESSION_LIMIT",
                )
        scheduler = self.schedulers[runner.spec.name]
        try:
            slot = scheduler.allocate_slot()
        except CacheFullError:
            raise exhausted(
                f"all {runner.pool.num_slots} sessions of model {runner.spec.name!r} are in use; "
                "close idle sessions, wait for them to expire or raise --max-sessions.",
                "POOL_FULL",
                model=runner.spec.name,
            ) from None
        session = Session(
            id=session_id,
            model=runner.spec.name,
            slot=slot,
            owner=owner,
            seed=settings.seed if settings.seed is not None else secrets.randbits(63),
            temperature=1.0 if settings.temperature is None else float(settings.temperature),
            num_actions=settings.num_actions or model.max_num_actions,
            policy=ContextPolicy(settings.policy) or self.default_policy,
            max_context_steps=settings.max_context_steps or limit,
            history=StepHistory(settings.max_context_steps or limit),
            on_update=UpdatePolicy(settings.on_update) or self.default_on_update,
            start_seq=settings.start_seq,
            last_seq=settings.start_seq,
        )
        self._sessions[session_id] = session
        self._gone.pop(session_id, None)
        self._count(session.model, +1)
        self.metrics.session_event("opened", session.model)
        return session

    def get(self, session_id: str, owner: str | None) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            if not session_id:
                raise invalid("session_id is empty; open a session first.", field="session_id")
            raise self._gone_error(session_id)
        if session.owner != owner:
            raise permission_denied(
                f"session {session_id!r} belongs to another token.", session_id=session_id
            )
        return session

    def _gone_error(self, session_id: str) -> ServiceError:
        how = self._gone.get(session_id)
        if how == "closed":
            return not_found(
                f"session {session_id!r} was closed; open a new one.", "SESSION_CLOSED", session_id=session_id
            )
        if how == "expired":
            return not_found(
                f"session {session_id!r} expired after {self.idle_timeout_s:g}s idle; open a new one.",
                "SESSION_EXPIRED",
                session_id=session_id,
            )
        return not_found(
            f"session {session_id!r} does not exist (never opened here, or the server restarted); "
            "open a new one.",
            "SESSION_NOT_FOUND",
            session_id=session_id,
        )

    def _drop(self, session: Session, event: str) -> None:
        session.closed = True
        self._sessions.pop(session.id, None)
        self._gone[session.id] = event
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)
        self.schedulers[session.model].free_slot(session.slot)
        self._count(session.model, -1)
        self.metrics.session_event(event, session.model)

    async def close(self, session: Session) -> None:
        async with session.lock:
            if not session.closed:
                self._drop(session, "closed")

    async def reset(self, session: Session) -> None:
        """Start the session's context over; the slot is emptied by its next forward."""
        async with session.lock:
            if session.closed:
                raise self._gone_error(session.id)
            session.history.clear()
            session.context_steps = 0
            session.empty_slot = True
            session.resync = False
            session.last_used = time.monotonic()

    def expire_idle(self, now: float | None = None) -> int:
        """Close sessions idle for longer than the timeout; returns how many."""
        now = time.monotonic() if now is None else now
        idle = [
            s for s in self._sessions.values() if now - s.last_used > self.idle_timeout_s and s.in_flight == 0
        ]
        for session in idle:
            self._drop(session, "expired")
        if idle:
            log.info("expired %d idle session(s)", len(idle))
        return len(idle)

    # -- steps --------------------------------------------------------------------------------
    async def step(
        self, request: StepRequest, *, deadline: float | None = None, bounded: bool = True
    ) -> ActionResult:
        """Apply the request's steps to its session in order and return the action for the last one.

        A retry of the session's last applied seq (same `digest`) gets the same reply; the same
        seq with other content is refused. With `bounded`, a request that would wait behind more
        than `max_pending_per_session` others of the session is refused (a stream's requests are
        bounded by the stream instead, which stops reading).
        """
        session = request.session
        if bounded and session.in_flight > self.max_pending_per_session:
            raise exhausted(
                f"session {session.id!r} already has {session.in_flight} requests in flight "
                f"(limit {self.max_pending_per_session} waiting behind the one being applied); "
                "wait for their replies.",
                "SESSION_QUEUE_FULL",
            )
        session.in_flight += 1
        try:
            await session.lock.acquire()
        except BaseException:
            session.in_flight -= 1
            raise
        (outcome,) = await self._apply([request], deadline)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def step_many(
        self, requests: Sequence[StepRequest], *, deadline: float | None = None
    ) -> list[ActionResult | Exception]:
        """Each request's reply or error, as if each ran `step` concurrently (a BatchGetAction).

        When the requests are of distinct sessions with nothing in flight (a group of environments
        stepping together), they are applied together: one pass over the requests, their work
        items queued at once, one wake-up when all are answered. Otherwise each runs as `step`.
        """
        sessions = [r.session for r in requests]
        if len({id(s) for s in sessions}) == len(sessions):
            locked = []
            for session in sessions:
                if not session.lock.try_acquire():
                    break
                locked.append(session)
            if len(locked) == len(sessions):
                for session in sessions:
                    session.in_flight += 1
                return await self._apply(requests, deadline)
            for session in locked:
                session.lock.release()
        return list(await asyncio.gather(*(self._step_outcome(r, deadline) for r in requests)))

    async def _step_outcome(self, request: StepRequest, deadline: float | None) -> ActionResult | Exception:
        try:
            return await self.step(request, deadline=deadline)
        except Exception as exc:
            return exc

    async def _apply(
        self, requests: Sequence[StepRequest], deadline: float | None
    ) -> list[ActionResult | Exception]:
        """Apply requests whose sessions' locks the caller holds (with `in_flight` counted).

        Each request's outcome is recorded, and its session released, as soon as it is final:
        at once for a refused request or a retry's reply, when its forward finishes for the
        others. That holds even when the caller is cancelled while waiting: requests still queued
        are then withdrawn (nothing applied), and those already running are recorded when they
        finish, so a retry of their seq gets their reply. A request the runner skipped because
        the weights changed after it was planned is planned again and queued anew (`_conclude`).
        """
        outcomes: list[Any] = [None] * len(requests)
        waiting: list[tuple[Scheduler, asyncio.Future[WorkResult]]] = []
        queued: dict[str, list[tuple[int, _Applying]]] = {}
        for i, request in enumerate(requests):
            try:
                begun = self._begin(request)
            except Exception as exc:  # refused (ServiceError); anything else must not keep the lock
                begun = exc
            if isinstance(begun, _Applying):
                queued.setdefault(request.session.model, []).append((i, begun))
            else:
                outcomes[i] = begun
                self._release(request.session)
        if not queued:
            return outcomes
        all_done = asyncio.get_running_loop().create_future()
        left = sum(map(len, queued.values()))
        cancelled = False

        def submit(model: str, items: list[tuple[int, _Applying]]) -> None:
            scheduler = self.schedulers[model]
            futures = scheduler.submit_many([applying.item for _, applying in items], deadline)
            for (i, applying), future in zip(items, futures, strict=True):
                future.add_done_callback(functools.partial(finished, i, applying))
                waiting.append((scheduler, future))

        def finished(i: int, applying: _Applying, future: asyncio.Future[WorkResult]) -> None:
            nonlocal left
            session = applying.request.session
            try:
                outcome = self._conclude(applying, future, cancelled)
                if isinstance(outcome, _Applying):  # planned again, for weights swapped in since
                    submit(session.model, [(i, outcome)])
                    return
            except Exception as exc:  # a bug here must not leave the caller waiting forever
                log.exception("recording a step failed")
                session.resync = True
                outcome = exc
            outcomes[i] = outcome
            self._release(session)
            left -= 1
            if not left and not all_done.done():
                all_done.set_result(None)

        for model, items in queued.items():
            submit(model, items)
        try:
            await all_done
        except asyncio.CancelledError:
            # Withdraw the items still queued (nothing applied); `finished` records the running ones.
            cancelled = True
            for scheduler, future in waiting:
                scheduler.cancel(future)
            raise
        return outcomes

    def _release(self, session: Session) -> None:
        session.in_flight -= 1
        session.last_used = time.monotonic()
        session.lock.release()

    def _begin(self, request: StepRequest) -> ActionResult | _Applying:
        """Checks and the work item of a request whose session's lock is held: a retry of the last
        seq gets its reply back (the cache untouched); a refused one raises ServiceError. Nothing
        in the session changes here: `_record` changes it once the item was applied."""
        session, seq = request.session, request.seq
        if session.closed:
            raise self._gone_error(session.id)
        last = session.last_seq
        if seq == 0:
            seq = last + 1
        elif seq == last and session.last_reply is not None:
            if request.digest == session.last_digest:
                return session.last_reply  # a retry: same reply, cache untouched
            raise failed_precondition(
                f"seq {seq} was already applied with other steps or options; a retry must repeat the "
                f"request unchanged, a new request must carry seq {last + 1}.",
                "SEQ_CONTENT_MISMATCH",
                last_seq=last,
            )
        elif seq <= last:
            raise failed_precondition(
                f"seq {seq} was already applied; the session is at seq {last} and only the last one "
                "can be retried.",
                "SEQ_ALREADY_APPLIED",
                last_seq=last,
            )
        elif seq != last + 1:
            raise failed_precondition(
                f"seq {seq} skips ahead: the session is at seq {last}; send seq {last + 1}.",
                "SEQ_GAP",
                last_seq=last,
            )

        version = self.runners[session.model].version
        stale = session.context_steps > 0 and session.cache_version < version
        drop = stale and session.on_update == UpdatePolicy.RESET
        rebuild = not drop and (session.resync or (stale and session.on_update == UpdatePolicy.REFILL))
        window, total, reset, truncated = self._window(
            session, request.steps, request.num_steps, rebuild, drop
        )
        item = WorkItem(
            slot=session.slot,
            steps=window,
            num_steps=total,
            reset=reset,
            temperature=session.temperature if request.temperature is None else float(request.temperature),
            num_actions=request.num_actions or session.num_actions,
            seed=session.seed,
            seq=seq,
            want_scores=request.want_scores,
            # run only with these weights (else plan again): refill and reset never mix versions
            version=0 if session.on_update == UpdatePolicy.KEEP else version,
        )
        return _Applying(request, seq, item, truncated, drop)

    def _conclude(
        self, applying: _Applying, future: asyncio.Future[WorkResult], cancelled: bool
    ) -> ActionResult | Exception | _Applying:
        """The outcome of a finished work item; records it in the session if it was applied. An
        item the runner did not run because the weights changed is planned again (unless its
        caller is gone): the new plan is returned, to be submitted. That happens once: updates
        closer together than a session's refill would otherwise restart it forever, so a new
        plan runs on through a second update (as under `keep`; the next step refills)."""
        session = applying.request.session
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or (isinstance(exc, StalePlan) and cancelled):  # nothing was applied
            return unavailable("the request was cancelled before it ran; it was not applied.", "CANCELLED")
        if isinstance(exc, StalePlan):
            try:
                again = self._begin(applying.request)
            except ServiceError as err:
                session.resync = True  # its slot may hold leading chunks: rebuild from history next time
                return err
            if isinstance(again, _Applying):
                again.item.version = 0  # runs with whatever weights serve when its turn comes
            return again
        if isinstance(exc, ServiceError):
            return exc  # refused before it ran (e.g. its deadline passed): nothing was applied
        if exc is not None:
            session.resync = True  # the cache may hold part of it: rebuild from history next time
            return exc
        return self._record(applying, future.result())

    def _record(self, applying: _Applying, result: WorkResult) -> ActionResult:
        request, item = applying.request, applying.item
        session = request.session
        if applying.truncated:  # counted once applied: a withdrawn or failed item cut nothing
            self.metrics.context_eviction(session.model, session.policy.name.lower())
        if applying.drops_context:
            session.history.clear()
        session.history.append(request.steps, request.num_steps)
        if item.reset:
            session.context_steps = item.num_steps
            session.cache_version = result.oldest_version or result.model_version
        else:
            session.context_steps += request.num_steps
            session.cache_version = min(session.cache_version, result.oldest_version or result.model_version)
        session.resync = session.empty_slot = False
        session.last_seq = applying.seq
        session.last_digest = request.digest
        session.last_reply = ActionResult(
            session.id,
            applying.seq,
            result.action,
            result.scores,
            session.context_steps,
            applying.truncated,
            result.model_version,
            result.model_tag,
        )
        return session.last_reply

    @staticmethod
    def _window(
        session: Session, steps: dict[str, np.ndarray], n: int, rebuild: bool, drop: bool
    ) -> tuple[dict[str, np.ndarray], int, bool, bool]:
        """The steps to feed for `n` new ones: (steps, count, empty the slot first, truncated).

        `rebuild` re-prefills the session's context from its kept history in front of the new
        steps (after a failed forward, or to refill the cache with updated weights); `drop` starts
        the context over with them. At the context limit the history is re-prefilled per the
        session's context policy.
        """
        limit = session.max_context_steps
        held = 0 if drop else session.context_steps
        kept = held if rebuild else 0  # context steps replayed from the history
        truncated = held + n > limit
        if truncated:
            if session.policy == ContextPolicy.REJECT:
                if n > limit:
                    raise invalid(
                        f"steps carries {n} steps but session {session.id!r} holds at most {limit} "
                        f"(policy REJECT), so they can never fit; send at most {limit} steps per "
                        "request, or open the session with a larger max_context_steps or another "
                        "context policy.",
                        "STEPS_EXCEED_CONTEXT",
                        field="steps",
                    )
                raise failed_precondition(
                    f"session {session.id!r} holds {held} of {limit} context steps and "
                    f"cannot take {n} more (policy REJECT); call ResetSession or open it with another policy.",
                    "CONTEXT_FULL",
                    last_seq=session.last_seq,
                )
            kept = max(limit // 2 - n, 0) if session.policy == ContextPolicy.SLIDING else 0
        kept = min(kept, len(session.history))
        reset = rebuild or truncated or drop or session.empty_slot
        if kept:
            old = session.history.recent(kept)
            steps = {k: np.concatenate([old[k], v]) for k, v in steps.items()}
        total = kept + n
        if total > limit:  # a prefill longer than the context keeps its most recent steps
            steps = {k: v[total - limit :] for k, v in steps.items()}
            total, reset, truncated = limit, True, True
        return steps, total, reset, truncated
