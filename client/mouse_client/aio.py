"""The asyncio client: `AsyncActionClient`, `AsyncSession`, `AsyncSessionStream` and
`AsyncSessionGroup`, the same surface and defaults as the blocking client with `await`.

A thin shell over `_core`: each method builds the same plan as the blocking client and runs its
operations on `grpc.aio`.
"""

from __future__ import annotations

import asyncio
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


class AsyncActionClient(ClientBase):
    """asyncio twin of `ActionClient`; use it as `async with AsyncActionClient(...) as client:`."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)
    _insecure_channel = staticmethod(grpc.aio.insecure_channel)

    async def _execute(self, op: Op) -> Any:
        if isinstance(op, Call):
            stub = self.stub(op.session_id, target=op.target, health=op.method == "Check")
            return await getattr(stub, op.method)(
                op.request,
                metadata=self.config.metadata(op.session_id),
                timeout=op.timeout,
                wait_for_ready=op.wait_for_ready or None,
            )
        if isinstance(op, StreamCall):
            return await op.stream.exchange(op.request, op.timeout)
        assert isinstance(op, Sleep)
        await asyncio.sleep(op.seconds)
        return None

    async def _run(self, plan: Plan[T]) -> T:
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
                value = await self._execute(op)
            except grpc.RpcError as err:
                error = ActionError.from_rpc(err)
            except ActionError as err:
                error = err

    async def close(self) -> None:
        for channel in self._forget_channels():
            await channel.close()

    async def __aenter__(self) -> AsyncActionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- server -------------------------------------------------------------------------------
    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every target serves the ActionService (standard health service);
        raises `ActionError` (DEADLINE_EXCEEDED) when one does not within `timeout` seconds."""
        await self._run(self._plan_wait_ready(timeout))

    async def list_models(self) -> list[pb.ModelInfo]:
        return await self._run(self._plan_list_models())

    async def model_info(self, model: str = "default") -> pb.ModelInfo:
        """The model's step schema (`fields`), action count, context and request limits."""
        return await self._run(self._plan_model_info(model))

    # -- weight updates (an admin token: `AsyncActionClient(target, token=<admin token>)`) -----------
    async def update_model(
        self, model: str = "default", *, source: str, revision: str | None = None, tag: str = ""
    ) -> int:
        """Replace `model`'s weights with a checkpoint the server can read (a folder on the server
        or a Hub repo id at `revision`); returns the new `model_version`. Needs an admin token."""
        return await self._run(self._plan_update_model(model, source, revision, tag))

    async def push_weights(
        self,
        model: str,
        weights: Any,
        *,
        tag: str = "",
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    ) -> int:
        """Stream new weights for `model` (a safetensors file or checkpoint folder, or a state
        dict when torch is installed); returns the new `model_version`. Needs an admin token."""
        return await self._run(self._plan_push_weights(model, weights, tag, chunk_bytes))

    # -- sessions -----------------------------------------------------------------------------
    async def open_session(
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
    ) -> AsyncSession:
        """Open a session. With `recover`, a session the server lost (restart, expiry) is
        reopened and its last `history_steps` steps (default: its context length) replayed."""
        options = SessionOptions(
            model, seed, temperature, num_actions, context_policy, max_context_steps, on_update
        )
        opened = await self._run(self._plan_open(options, session_id))
        return AsyncSession(self, options, opened, recover=recover, history_steps=history_steps)

    async def open_sessions(
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
    ) -> AsyncSessionGroup:
        """Open `n` sessions that share a routing key (`<group>.<i>`), for a vector of
        environments stepped with one `BatchGetAction` per step. Seeds are `seed + i`; `model`
        and `num_actions` may be given per session."""
        plan = self._plan_open_group(
            n, model, seed, temperature, num_actions, context_policy, max_context_steps, on_update
        )
        return self._group(await self._run(plan), recover=recover, history_steps=history_steps)

    def _group(
        self, opened: list[Any], *, recover: bool = True, history_steps: int | None = None
    ) -> AsyncSessionGroup:
        """A group of sessions from `_plan_open_group`'s result."""
        return AsyncSessionGroup(
            self, [AsyncSession(self, o, r, recover=recover, history_steps=history_steps) for o, r in opened]
        )


class AsyncSession(SessionCore):
    """asyncio twin of `Session`."""

    def __init__(
        self,
        client: AsyncActionClient,
        options: SessionOptions,
        opened: pb.OpenSessionResponse,
        *,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> None:
        super().__init__(options, opened, recover=recover, history_steps=history_steps)
        self.client = client

    async def _step(
        self, records: StepRecords, params: StepParams, send: Callable[..., Op]
    ) -> pb.GetActionResponse:
        return await self.client._run(self.step_plan(records, params, self.client.budget(), send))

    async def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        """Append one step (a mapping) or several (a list: a prefill); return the next action."""
        return int((await self._step(steps, StepParams(temperature, num_actions, False), unary_send)).action)

    async def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        """Like `get_action` but returns the whole reply (scores, context length, ...)."""
        return await self._step(steps, StepParams(temperature, num_actions, return_scores), unary_send)

    async def resolve(self) -> pb.GetActionResponse | None:
        """Settle a request whose outcome was unknown (after an in-doubt error) now; returns its
        reply, or None when nothing was pending. The next call then always sends new records."""
        return await self.client._run(self.resolve_plan(self.client.budget()))

    def stream(self) -> AsyncSessionStream:
        """Step this session over one long-lived bidirectional stream (fewer per-call costs)."""
        self.check_open()
        return AsyncSessionStream(self)

    async def reset(self) -> None:
        """Clear the session's context on the server (sequence numbers continue)."""
        await self.client._run(self.reset_plan(self.client.budget()))

    async def close(self) -> None:
        """Close the session; using it afterwards raises `SessionClosedError`."""
        await self.client._run(self.close_plan(self.client.budget()))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _AsyncStream:
    """One `StreamActions` call on grpc.aio."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._call: Any = None

    async def exchange(self, req: pb.GetActionRequest, timeout: float | None) -> pb.GetActionResponse:
        if self._call is None:
            stub = self.session.client.stub(self.session.id)
            self._call = stub.StreamActions(metadata=self.session.client.config.metadata(self.session.id))
        try:
            await self._call.write(pb.StreamActionsRequest(request=req))
            reply = await asyncio.wait_for(self._call.read(), timeout)
        except asyncio.TimeoutError:
            self.broken()
            raise ActionError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no reply on the stream before the deadline", in_doubt=True
            ) from None
        except (grpc.RpcError, asyncio.InvalidStateError) as err:
            self.broken()
            if isinstance(err, grpc.RpcError):
                raise ActionError.from_rpc(err) from None
            raise ActionError(
                grpc.StatusCode.UNAVAILABLE, f"the stream broke ({err})", in_doubt=True
            ) from None
        if reply is grpc.aio.EOF:
            self.broken()
            raise ActionError(grpc.StatusCode.UNAVAILABLE, "the stream ended", in_doubt=True)
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
        if self._call is not None:
            self._call.cancel()
        self._call = None

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            try:
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                pass


class AsyncSessionStream:
    """asyncio twin of `SessionStream`."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._stream = _AsyncStream(session)

    @property
    def model(self) -> pb.ModelInfo:
        return self.session.model

    def _send(self, req: pb.GetActionRequest, timeout: float) -> Op:
        return StreamCall(self._stream, req, timeout)

    async def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        reply = await self.session._step(steps, StepParams(temperature, num_actions, False), self._send)
        return int(reply.action)

    async def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = True,
    ) -> pb.GetActionResponse:
        return await self.session._step(
            steps, StepParams(temperature, num_actions, return_scores), self._send
        )

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> AsyncSessionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSessionGroup(GroupCore):
    """asyncio twin of `SessionGroup`."""

    def __init__(self, client: AsyncActionClient, sessions: Sequence[AsyncSession]) -> None:
        super().__init__(sessions)
        self.client = client
        self.sessions: list[AsyncSession] = list(sessions)

    def __getitem__(self, i: int) -> AsyncSession:
        return self.sessions[i]

    async def get_replies(
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
        return await self.client._run(self.step_plan(steps, params, self.client.budget(), indices, mask))

    async def get_actions(
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
        replies = await self.client._run(self.step_plan(steps, params, self.client.budget(), indices, mask))
        return np.fromiter((r.action for r in replies), dtype=np.int64, count=len(replies))

    async def reset(self, *, indices: Sequence[int] | None = None, mask: Any = None) -> None:
        """Clear the context of every session (or of the selected ones)."""
        for plan in self.reset_plans(self.client.budget(), indices, mask):
            await self.client._run(plan)

    async def close(self) -> None:
        errors = []
        for s in self.sessions:
            try:
                await s.close()
            except ActionError as err:
                errors.append(err)
        if errors:
            raise errors[0]

    async def __aenter__(self) -> AsyncSessionGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
