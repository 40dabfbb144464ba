"""The asyncio client: `AsyncActionClient` and `AsyncSession` (same behaviour as the blocking
client: retries reuse the sequence number, a lost session is reopened and replayed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

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


class AsyncActionClient(ClientBase):
    """asyncio twin of `ActionClient`; use it as `async with AsyncActionClient(...) as c:`."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)
    _insecure_channel = staticmethod(grpc.aio.insecure_channel)

    async def call(self, fn: Callable[[], Awaitable[T]], retry: RetryPolicy | None = None) -> T:
        policy = retry or self.retry
        pauses = policy.backoff()
        while True:
            try:
                return await fn()
            except grpc.RpcError as err:
                error = ActionError.from_rpc(err)
            except ActionError as err:
                error = err
            pause = next(pauses, None) if error.code in policy.codes else None
            if pause is None:
                raise error
            await asyncio.sleep(pause)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    async def __aenter__(self) -> AsyncActionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self) -> list[pb.ModelInfo]:
        stub = self.stub()
        reply = await self.call(
            lambda: stub.ListModels(
                pb.ListModelsRequest(), metadata=self.config.metadata(), timeout=self.timeout_s
            )
        )
        return list(reply.models)

    async def _open(self, options: SessionOptions, session_id: str) -> pb.OpenSessionResponse:
        req = options.request(session_id)
        stub = self.stub(session_id)
        md = self.config.metadata(session_id)
        return await self.call(lambda: stub.OpenSession(req, metadata=md, timeout=self.timeout_s))

    async def open_session(
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
    ) -> AsyncSession:
        options = SessionOptions(model, seed, temperature, num_actions, context_policy, max_context_steps)
        sid = session_id or new_session_id()
        opened = await self._open(options, sid)
        return AsyncSession(self, options, opened, recover=recover, history_steps=history_steps)

    async def get_actions(
        self,
        sessions: Sequence[AsyncSession],
        steps: Sequence[StepRecords],
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
    ) -> list[int]:
        """One `BatchGetAction` call stepping several sessions (of one target)."""
        if len(sessions) != len(steps):
            raise ValueError(f"{len(sessions)} sessions but {len(steps)} step entries.")
        if not sessions:
            return []
        if len({self.config.target_for(s.id) for s in sessions}) > 1:
            raise ValueError("a batch must stay on one target; give its sessions one routing key.")
        encoded = [encode(s) for s in steps]
        reqs = [
            action_request(s.id, s.seq + 1, enc, temperature, num_actions, False)
            for s, (enc, _) in zip(sessions, encoded, strict=True)
        ]
        stub = self.stub(sessions[0].id)
        md = self.config.metadata(sessions[0].id)
        batch = pb.BatchGetActionRequest(requests=reqs)
        reply = await self.call(lambda: stub.BatchGetAction(batch, metadata=md, timeout=self.timeout_s))
        actions = []
        for session, req, (enc, n), result in zip(sessions, reqs, encoded, reply.results, strict=True):
            if result.HasField("error"):
                try:
                    raise_item_error(result.error)
                except ActionError as err:
                    actions.append((await session._after_failure(err, req, enc, n)).action)
                    continue
            actions.append(session._applied(result.response, enc, n).action)
        return actions


class AsyncSession(SessionState):
    """asyncio twin of `Session`."""

    def __init__(
        self,
        client: AsyncActionClient,
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

    async def _unary(self, req: pb.GetActionRequest) -> pb.GetActionResponse:
        stub = self.client.stub(self.id)
        return await self.client.call(
            lambda: stub.GetAction(req, metadata=self._metadata(), timeout=self.client.timeout_s)
        )

    async def _reopen(self) -> pb.OpenSessionResponse:
        try:
            return await self.client._open(self.options, self.id)
        except ActionError as err:
            if err.code is not grpc.StatusCode.ALREADY_EXISTS:
                raise
            return await self.client._open(self.options, new_session_id())

    async def _after_failure(
        self, err: ActionError, req: pb.GetActionRequest, steps: pb.Steps, n: int
    ) -> pb.GetActionResponse:
        if not self._can_recover(err):
            raise err
        replay = self._reopened(await self._reopen(), req, steps)
        return self._applied(await self._unary(replay), steps, n)

    async def get_reply(
        self,
        steps: StepRecords,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        return_scores: bool = False,
    ) -> pb.GetActionResponse:
        enc, n = encode(steps)
        req = action_request(self.id, self.seq + 1, enc, temperature, num_actions, return_scores)
        try:
            reply = await self._unary(req)
        except ActionError as err:
            return await self._after_failure(err, req, enc, n)
        return self._applied(reply, enc, n)

    async def get_action(
        self, steps: StepRecords, *, temperature: float | None = None, num_actions: int | None = None
    ) -> int:
        return (await self.get_reply(steps, temperature=temperature, num_actions=num_actions)).action

    async def reset(self) -> None:
        stub = self.client.stub(self.id)
        req = pb.ResetSessionRequest(session_id=self.id)
        await self.client.call(
            lambda: stub.ResetSession(req, metadata=self._metadata(), timeout=self.client.timeout_s)
        )
        self.history.clear()

    async def close(self) -> None:
        stub = self.client.stub(self.id)
        req = pb.CloseSessionRequest(session_id=self.id)
        try:
            await self.client.call(
                lambda: stub.CloseSession(req, metadata=self._metadata(), timeout=self.client.timeout_s)
            )
        except ActionError as err:
            if err.code is not grpc.StatusCode.NOT_FOUND:
                raise

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
