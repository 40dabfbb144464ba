"""The blocking client: `ActionClient`, `Session`, `SessionStream` and `SessionGroup`.

A thin shell over `_core`: each method builds a plan there and runs its operations with
blocking gRPC calls. `aio.py` is the same surface with `await`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from mouse_client._core import (
    UPLOAD_CHUNK_BYTES,
    Call,
    ClientBase,
    GroupCore,
    Op,
    Plan,
    SessionCore,
    SessionOptions,
    Sleep,
    StepParams,
    StreamCall,
    T,
    unary_send,
)
from mouse_client.errors import ActionError
from mouse_client.steps import StepRecords
from mouse_client.v1 import action_service_pb2 as pb


class ActionClient(ClientBase):
    """A blocking connection to one mouse-serve target, or several (sessions are then sharded
    over them); see `ClientBase` for the options. Use it as a context manager."""

    _secure_channel = staticmethod(grpc.secure_channel)
    _insecure_channel = staticmethod(grpc.insecure_channel)

    def _execute(self, op: Op) -> Any:
        if isinstance(op, Call):
            stub = self.stub(op.session_id, target=op.target, health=op.method == "Check")
            return getattr(stub, op.method)(
                op.request,
                metadata=self.config.metadata(op.session_id),
                timeout=op.timeout,
                wait_for_ready=op.wait_for_ready or None,
            )
        if isinstance(op, StreamCall):
            return op.stream.exchange(op.request, op.timeout)
        assert isinstance(op, Sleep)
        time.sleep(op.seconds)
        return None

    def _run(self, plan: Plan[T]) -> T:
        """Run a plan's operations until it returns (or raises)."""
        value: Any = None
        error: ActionError | None = None
        while True:
            try:
                op = plan.send(value) if error is None else plan.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = self._execute(op)
            except grpc.RpcError as err:
                error = ActionError.from_rpc(err)
            except ActionError as err:
                error = err

    def close(self) -> None:
        for channel in self._forget_channels():
            channel.close()

    def __enter__(self) -> ActionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server -------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every target serves the ActionService (standard health service);
        raises `ActionError` (DEADLINE_EXCEEDED) when one does not within `timeout` seconds."""
        self._run(self._plan_wait_ready(timeout))

    def list_models(self) -> list[pb.ModelInfo]:
        return self._run(self._plan_list_models())

    def model_info(self, model: str = "default") -> pb.ModelInfo:
        """The model's step schema (`fields`), action count, context and request limits."""
        return self._run(self._plan_model_info(model))

    # -- weight updates (an admin token: `ActionClient(target, token=<admin token>)`) -----------
    def update_model(
        self, model: str = "default", *, source: str, revision: str | None = None, tag: str = ""
    ) -> int:
        """Replace `model`'s weights with a checkpoint the server can read (a folder on the server
        or a Hub repo id at `revision`); returns the new `model_version`. Needs an admin token."""
        return self._run(self._plan_update_model(model, source, revision, tag))

    def push_weights(
        self,
        model: str,
        weights: Any,
        *,
        tag: str = "",
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    ) -> int:
        """Stream new weights for `model` (a safetensors file or checkpoint folder, or a state
        dict when torch is installed); returns the new `model_version`. Needs an admin token."""
        return self._run(self._plan_push_weights(model, weights, tag, chunk_bytes))

    # -- sessions -----------------------------------------------------------------------------
    def open_session(
        self,
        model: str = "default",
        *,
        seed: int | None = None,
        temperature: float | None = None,
        num_actions: int | None = None,
        context_policy: str | None = None,
        max_context_steps: int | None = None,
        on_update: str | None = None,
        session_id: str | None = None,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> Session:
        """Open a session. With `recover`, a session the server lost (restart, expiry) is
        reopened and its last `history_steps` steps (default: its context length) replayed."""
        options = SessionOptions(
            model, seed, temperature, num_actions, context_policy, max_context_steps, on_update
        )
        opened = self._run(self._plan_open(options, session_id))
        return Session(self, options, opened, recover=recover, history_steps=history_steps)

    def open_sessions(
        self,
        n: int,
        model: str | Sequence[str] = "default",
        *,
        seed: int | None = None,
        temperature: float | None = None,
        num_actions: int | Sequence[int | None] | None = None,
        context_policy: str | None = None,
        max_context_steps: int | None = None,
        on_update: str | None = None,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> SessionGroup:
        """Open `n` sessions that share a routing key (`<group>.<i>`), for a vector of
        environments stepped with one `BatchGetAction` per step. Seeds are `seed + i`; `model`
        and `num_actions` may be given per session."""
        plan = self._plan_open_group(
            n, model, seed, temperature, num_actions, context_policy, max_context_steps, on_update
        )
        return self._group(self._run(plan), recover=recover, history_steps=history_steps)

    def _group(
        self, opened: list[Any], *, recover: bool = True, history_steps: int | None = None
    ) -> SessionGroup:
        """A group of sessions from `_plan_open_group`'s result."""
        return SessionGroup(
            self, [Session(self, o, r, recover=recover, history_steps=history_steps) for o, r in opened]
        )


class Session(SessionCore):
    """One environment stream on the server. Not thread-safe: use one per worker thread."""

    def __init__(
        self,
        client: ActionClient,
        options: SessionOptions,
        opened: pb.OpenSessionResponse,
        *,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> None:
        super().__init__(options, opened, recover=recover, history_steps=history_steps)
        self.client = client

    def _step(
        self, records: StepRecords, params: StepParams, send: Callable[..., Op]
    ) -> pb.GetActionResponse:
        return self.client._run(self.step_plan(records, params, self.client.budget(), send))

    def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        """Append one step (a mapping) or several (a list: a prefill); return the next action."""
        return int(self._step(steps, StepParams(temperature, num_actions, False), unary_send).action)

    def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        """Like `get_action` but returns the whole reply (scores, context length, ...)."""
        return self._step(steps, StepParams(temperature, num_actions, return_scores), unary_send)

    def resolve(self) -> pb.GetActionResponse | None:
        """Settle a request whose outcome was unknown (after an in-doubt error) now; returns its
        reply, or None when nothing was pending. The next call then always sends new records."""
        return self.client._run(self.resolve_plan(self.client.budget()))

    def stream(self) -> SessionStream:
        """Step this session over one long-lived bidirectional stream (fewer per-call costs)."""
        self.check_open()
        return SessionStream(self)

    def reset(self) -> None:
        """Clear the session's context on the server (sequence numbers continue)."""
        self.client._run(self.reset_plan(self.client.budget()))

    def close(self) -> None:
        """Close the session; using it afterwards raises `SessionClosedError`."""
        self.client._run(self.close_plan(self.client.budget()))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class _Watchdog:
    """Cancels a call when the reply it waits for is overdue (one thread per stream)."""

    def __init__(self, on_expire: Callable[[], None]) -> None:
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._stopped = False
        self.fired = False
        threading.Thread(target=self._run, daemon=True, name="mouse-stream-watchdog").start()

    def arm(self, timeout: float | None) -> None:
        with self._cond:
            self.fired = False
            self._deadline = None if timeout is None else time.monotonic() + timeout
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline, self.fired = None, True
                self._on_expire()


class _Stream:
    """One `StreamActions` call: requests go through a queue that grpc's thread reads."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._requests: queue.SimpleQueue[Any] | None = None
        self._call: Any = None
        self._watchdog = _Watchdog(self._cancel)

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def _open(self) -> None:
        self._requests = queue.SimpleQueue()
        stub = self.session.client.stub(self.session.id)
        md = self.session.client.config.metadata(self.session.id)
        self._call = stub.StreamActions(iter(self._requests.get, _END), metadata=md)

    def exchange(self, req: pb.GetActionRequest, timeout: float | None) -> pb.GetActionResponse:
        if self._call is None:
            self._open()
        assert self._requests is not None
        self._requests.put(pb.StreamActionsRequest(request=req))
        self._watchdog.arm(timeout)
        try:
            reply = next(self._call)
        except grpc.RpcError as err:
            self.broken()
            if self._watchdog.fired:
                raise ActionError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "no reply on the stream before the deadline",
                    in_doubt=True,
                ) from None
            raise ActionError.from_rpc(err) from None
        except StopIteration:
            self.broken()
            raise ActionError(grpc.StatusCode.UNAVAILABLE, "the stream ended", in_doubt=True) from None
        finally:
            self._watchdog.disarm()
        if reply.seq != req.seq or reply.session_id != req.session_id:
            self.broken()
            raise ActionError(
                grpc.StatusCode.INTERNAL,
                f"the stream answered seq {reply.seq} of {reply.session_id!r} to seq {req.seq}",
                in_doubt=True,
            )
        if reply.HasField("error"):
            raise ActionError.from_status(reply.error)
        return reply.response

    def broken(self) -> None:
        """Drop the call: end its request iterator (so grpc's request thread is not left
        blocked) and cancel it; the next exchange opens a new one."""
        if self._requests is not None:
            self._requests.put(_END)
        if self._call is not None:
            self._call.cancel()
        self._requests = self._call = None

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)
        if self._call is not None:
            try:
                for _ in self._call:  # drain until the server ends the call
                    pass
            except grpc.RpcError:
                pass
        self._requests = self._call = None
        self._watchdog.stop()


class SessionStream:
    """A session stepped over one `StreamActions` call; a broken stream is reopened and an
    in-doubt request re-sent as on the unary path."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._stream = _Stream(session)

    @property
    def model(self) -> pb.ModelInfo:
        return self.session.model

    def _send(self, req: pb.GetActionRequest, timeout: float) -> Op:
        return StreamCall(self._stream, req, timeout)

    def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        return int(self.session._step(steps, StepParams(temperature, num_actions, False), self._send).action)

    def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        return self.session._step(steps, StepParams(temperature, num_actions, return_scores), self._send)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionGroup(GroupCore):
    """Sessions for a vector of environments, stepped together with one batched call.

    Actions come back as int64 numpy arrays. `indices` (or a boolean `mask`) steps a subset;
    `steps` then has one entry per stepped session. A failed entry raises `GroupError` after
    every other entry was applied; see `GroupCore` for the retry rule.
    """

    def __init__(self, client: ActionClient, sessions: Sequence[Session]) -> None:
        super().__init__(sessions)
        self.client = client
        self.sessions: list[Session] = list(sessions)

    def __getitem__(self, i: int) -> Session:
        return self.sessions[i]

    def get_replies(
        self,
        steps: Sequence[StepRecords],
        *,
        indices: Sequence[int] | None = None,
        mask: Any = None,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> list[pb.GetActionResponse]:
        """One step record (or prefill) per stepped session; returns the whole replies."""
        params = StepParams(temperature, num_actions, return_scores)
        return self.client._run(self.step_plan(steps, params, self.client.budget(), indices, mask))

    def get_actions(
        self,
        steps: Sequence[StepRecords],
        *,
        indices: Sequence[int] | None = None,
        mask: Any = None,
        temperature: float | None = None,
        num_actions: int | None = None,
    ) -> np.ndarray:
        """One step record (or prefill) per stepped session; returns the actions as int64."""
        params = StepParams(temperature, num_actions, False)
        replies = self.client._run(self.step_plan(steps, params, self.client.budget(), indices, mask))
        return np.fromiter((r.action for r in replies), dtype=np.int64, count=len(replies))

    def reset(self, *, indices: Sequence[int] | None = None, mask: Any = None) -> None:
        """Clear the context of every session (or of the selected ones)."""
        for plan in self.reset_plans(self.client.budget(), indices, mask):
            self.client._run(plan)

    def close(self) -> None:
        errors = []
        for s in self.sessions:
            try:
                s.close()
            except ActionError as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> SessionGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
