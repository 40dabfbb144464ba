"""The blocking client: `ActionClient`, `Session`, `SessionStream` and `SessionGroup`."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from mouse_client._core import (
    ClientBase,
    RetryPolicy,
    SessionOptions,
    SessionState,
    action_request,
    encode,
    raise_item_error,
)
from mouse_client.errors import ActionError
from mouse_client.routing import new_session_id
from mouse_client.steps import StepRecords
from mouse_client.v1 import action_service_pb2 as pb

T = TypeVar("T")


class ActionClient(ClientBase):
    """A blocking connection to one mouse-serve target, or several (sessions are then sharded
    over them); see `ClientBase` for the options."""

    _secure_channel = staticmethod(grpc.secure_channel)
    _insecure_channel = staticmethod(grpc.insecure_channel)

    def call(self, fn: Callable[[], T], retry: RetryPolicy | None = None) -> T:
        """Run `fn`, retrying transient failures; raises `ActionError`."""
        policy = retry or self.retry
        pauses = policy.backoff()
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                error = ActionError.from_rpc(err)
            except ActionError as err:
                error = err
            pause = next(pauses, None) if error.code in policy.codes else None
            if pause is None:
                raise error
            time.sleep(pause)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._stubs.clear()

    def __enter__(self) -> ActionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models -----------------------------------------------------------------------------
    def list_models(self) -> list[pb.ModelInfo]:
        stub = self.stub()
        reply = self.call(
            lambda: stub.ListModels(
                pb.ListModelsRequest(), metadata=self.config.metadata(), timeout=self.timeout_s
            )
        )
        return list(reply.models)

    def model_info(self, model: str = "default") -> pb.ModelInfo:
        stub = self.stub()
        req = pb.GetModelInfoRequest(model=model)
        return self.call(
            lambda: stub.GetModelInfo(req, metadata=self.config.metadata(), timeout=self.timeout_s)
        ).model

    # -- sessions ---------------------------------------------------------------------------
    def _open(self, options: SessionOptions, session_id: str) -> pb.OpenSessionResponse:
        req = options.request(session_id)
        stub = self.stub(session_id)
        md = self.config.metadata(session_id)
        return self.call(lambda: stub.OpenSession(req, metadata=md, timeout=self.timeout_s))

    def open_session(
        self,
        model: str = "default",
        *,
        seed: int | None = None,
        temperature: float | None = None,
        num_actions: int | None = None,
        context_policy: str | None = None,
        max_context_steps: int | None = None,
        session_id: str | None = None,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> Session:
        """Open a session. With `recover`, a session the server lost (restart, expiry) is
        reopened and its last `history_steps` steps (default: its context length) replayed."""
        options = SessionOptions(model, seed, temperature, num_actions, context_policy, max_context_steps)
        sid = session_id or new_session_id()
        return Session(self, options, self._open(options, sid), recover=recover, history_steps=history_steps)

    def open_sessions(
        self, n: int, model: str = "default", *, seed: int | None = None, **kwargs: Any
    ) -> SessionGroup:
        """Open `n` sessions that share a routing key (`<group>.<i>`), for a vector of
        environments stepped with one `BatchGetAction` per step. Seeds are `seed + i`."""
        group = new_session_id()
        sessions = [
            self.open_session(
                model, seed=None if seed is None else seed + i, session_id=f"{group}.{i}", **kwargs
            )
            for i in range(n)
        ]
        return SessionGroup(self, sessions)

    def get_actions(
        self,
        sessions: Sequence[Session],
        steps: Sequence[StepRecords],
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
    ) -> list[int]:
        """One `BatchGetAction` call stepping several sessions (of one target)."""
        return [
            r.action for r in self.batch(sessions, steps, temperature=temperature, num_actions=num_actions)
        ]

    def batch(
        self,
        sessions: Sequence[Session],
        steps: Sequence[StepRecords],
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = False,
    ) -> list[pb.GetActionResponse]:
        if len(sessions) != len(steps):
            raise ValueError(f"{len(sessions)} sessions but {len(steps)} step entries.")
        if not sessions:
            return []
        targets = {self.config.target_for(s.id) for s in sessions}
        if len(targets) > 1:
            raise ValueError(
                "a batch must stay on one target; use open_sessions() so sessions share a routing key."
            )
        encoded = [encode(s) for s in steps]
        reqs = [
            action_request(s.id, s.seq + 1, enc, temperature, num_actions, return_scores)
            for s, (enc, _) in zip(sessions, encoded, strict=True)
        ]
        stub = self.stub(sessions[0].id)
        md = self.config.metadata(sessions[0].id)
        batch = pb.BatchGetActionRequest(requests=reqs)
        reply = self.call(lambda: stub.BatchGetAction(batch, metadata=md, timeout=self.timeout_s))
        out = []
        for session, req, (enc, n), result in zip(sessions, reqs, encoded, reply.results, strict=True):
            if result.HasField("error"):
                try:
                    raise_item_error(result.error)
                except ActionError as err:
                    out.append(session._after_failure(err, req, enc, n))
                    continue
            out.append(session._applied(result.response, enc, n))
        return out


class Session(SessionState):
    """One environment stream on the server. Not thread-safe: use one per worker thread."""

    def __init__(
        self,
        client: ActionClient,
        options: SessionOptions,
        opened: pb.OpenSessionResponse,
        *,
        recover: bool,
        history_steps: int | None,
    ) -> None:
        super().__init__(options, opened, recover=recover, history_steps=history_steps)
        self.client = client

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.client.config.metadata(self.id)

    def _unary(self, req: pb.GetActionRequest) -> pb.GetActionResponse:
        stub = self.client.stub(self.id)
        return self.client.call(
            lambda: stub.GetAction(req, metadata=self._metadata(), timeout=self.client.timeout_s)
        )

    def _reopen(self) -> pb.OpenSessionResponse:
        try:
            return self.client._open(self.options, self.id)
        except ActionError as err:
            if err.code is not grpc.StatusCode.ALREADY_EXISTS:
                raise
            return self.client._open(self.options, new_session_id())

    def _after_failure(
        self, err: ActionError, req: pb.GetActionRequest, steps: pb.Steps, n: int
    ) -> pb.GetActionResponse:
        """Recover a lost session (NOT_FOUND) by reopening and replaying; else re-raise."""
        if not self._can_recover(err):
            raise err
        replay = self._reopened(self._reopen(), req, steps)
        return self._applied(self._unary(replay), steps, n)

    def _step(
        self,
        steps: StepRecords,
        send: Callable[[pb.GetActionRequest], pb.GetActionResponse],
        temperature: float | None,
        num_actions: int | None,
        return_scores: bool,
    ) -> pb.GetActionResponse:
        enc, n = encode(steps)
        req = action_request(self.id, self.seq + 1, enc, temperature, num_actions, return_scores)
        try:
            reply = send(req)
        except ActionError as err:
            return self._after_failure(err, req, enc, n)
        return self._applied(reply, enc, n)

    def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        """Append one step (a mapping) or several (a list: a prefill); return the next action."""
        return self._step(steps, self._unary, temperature, num_actions, False).action

    def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        """Like `get_action` but returns the whole reply (scores, context length, ...)."""
        return self._step(steps, self._unary, temperature, num_actions, return_scores)

    def stream(self) -> SessionStream:
        """Step this session over one long-lived bidirectional stream (fewer per-call costs)."""
        return SessionStream(self)

    def reset(self) -> None:
        stub = self.client.stub(self.id)
        req = pb.ResetSessionRequest(session_id=self.id)
        self.client.call(
            lambda: stub.ResetSession(req, metadata=self._metadata(), timeout=self.client.timeout_s)
        )
        self.history.clear()

    def close(self) -> None:
        """Close the session (a session the server already dropped counts as closed)."""
        stub = self.client.stub(self.id)
        req = pb.CloseSessionRequest(session_id=self.id)
        try:
            self.client.call(
                lambda: stub.CloseSession(req, metadata=self._metadata(), timeout=self.client.timeout_s)
            )
        except ActionError as err:
            if err.code is not grpc.StatusCode.NOT_FOUND:
                raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class SessionStream:
    """A `StreamActions` call carrying one session's steps; reopened when the stream breaks."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.model = session.model
        self._requests: queue.SimpleQueue[Any] | None = None
        self._replies: Iterator[pb.StreamActionsResponse] | None = None

    def _open(self) -> None:
        self._requests = queue.SimpleQueue()
        stub = self.session.client.stub(self.session.id)
        self._replies = stub.StreamActions(iter(self._requests.get, _END), metadata=self.session._metadata())

    def _send(self, req: pb.GetActionRequest) -> pb.GetActionResponse:
        def once() -> pb.GetActionResponse:
            if self._replies is None:
                self._open()
            assert self._requests is not None and self._replies is not None
            self._requests.put(pb.StreamActionsRequest(request=req))
            try:
                reply = next(self._replies)
            except (grpc.RpcError, StopIteration) as err:
                self._replies = None  # reopen on the next attempt
                if isinstance(err, StopIteration):
                    raise ActionError(grpc.StatusCode.UNAVAILABLE, "the stream ended") from None
                raise
            if reply.HasField("error"):
                raise_item_error(reply.error)
            return reply.response

        return self.session.client.call(once)

    def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        return self.session._step(steps, self._send, temperature, num_actions, False).action

    def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        return self.session._step(steps, self._send, temperature, num_actions, return_scores)

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)
        if self._replies is not None:
            for _ in self._replies:  # drain until the server ends the call
                pass
        self._requests = self._replies = None

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionGroup:
    """Sessions for a vector of environments, stepped together with one batched call."""

    def __init__(self, client: ActionClient, sessions: list[Session]) -> None:
        self.client = client
        self.sessions = sessions

    def __len__(self) -> int:
        return len(self.sessions)

    def __getitem__(self, i: int) -> Session:
        return self.sessions[i]

    def get_actions(
        self,
        steps: Sequence[StepRecords],
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
    ) -> np.ndarray:
        """One step record (or prefill) per session; returns the actions as int64 `[n]`."""
        replies = self.client.batch(self.sessions, steps, temperature=temperature, num_actions=num_actions)
        return np.array([r.action for r in replies], dtype=np.int64)

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def __enter__(self) -> SessionGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
