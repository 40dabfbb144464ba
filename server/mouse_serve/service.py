"""gRPC transport: `mouse.action.v1.ActionService` on grpc.aio.

Each handler decodes and validates its request, hands it to the session manager and encodes the
reply. A `ServiceError` becomes the call's status with its rich details (or, inside
StreamActions and BatchGetAction, that item's `RequestError`); anything unexpected is logged and
answered with INTERNAL while the server keeps serving. A stream holds at most
`max_requests_per_stream` requests between reading them and writing their replies: a client
that does not read its replies stops being read from.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from mouse_serve.auth import TokenAuth
from mouse_serve.codec import action_reply, decode_many, decode_steps, model_info, open_reply
from mouse_serve.errors import (
    ServiceError,
    failed_precondition,
    internal,
    invalid,
    permission_denied,
    unavailable,
)
from mouse_serve.runner import ModelRunner
from mouse_serve.sessions import (
    ActionResult,
    Session,
    SessionManager,
    SessionSettings,
    StepRequest,
    check_sampling,
)
from mouse_serve.updates import ModelUpdater, UpdateOutcome, upload_limit

log = logging.getLogger(__name__)
SESSION_HEADER = "mouse-session-id"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


def _status(exc: Exception) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    log.error("unexpected error while serving a request", exc_info=exc)
    return internal(
        f"internal error ({type(exc).__name__}); the request was not applied, the server keeps serving."
    )


def request_digest(req: pb.GetActionRequest) -> bytes:
    """Identifies a GetAction's content: its steps and every option that changes the reply."""
    options = (
        req.temperature if req.HasField("temperature") else None,
        req.num_actions if req.HasField("num_actions") else None,
        req.return_scores,
    )
    digest = hashlib.blake2b(repr(options).encode(), digest_size=16)
    digest.update(req.steps.SerializeToString(deterministic=True))
    return digest.digest()


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _header(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None


class Malformed:
    """A request whose bytes did not parse; it is answered with INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.error = invalid(
            f"the request is not a valid {type_name} message ({error}).", "MALFORMED_MESSAGE"
        )


def _parser(
    message: type[Message], observe: Callable[[str, float], None]
) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        started = time.perf_counter()
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Malformed(message.DESCRIPTOR.full_name, exc)
        finally:
            observe("decode", time.perf_counter() - started)

    return parse


def _serializer(observe: Callable[[str, float], None]) -> Callable[[Message], bytes]:
    def serialize(reply: Message) -> bytes:
        started = time.perf_counter()
        data = reply.SerializeToString()
        observe("encode", time.perf_counter() - started)
        return data

    return serialize


def add_to_server(service: ActionService, server: grpc.aio.Server) -> None:
    """Register `service` like the generated helper, but parse requests with `_parser` so corrupt
    bytes get INVALID_ARGUMENT instead of an unhandled decoding error."""
    descriptor = pb.DESCRIPTOR.services_by_name["ActionService"]
    handlers = {}
    for method in descriptor.methods:
        request = getattr(pb, method.input_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(service, method.name),
            request_deserializer=_parser(request, service.metrics.observe_stage),
            response_serializer=_serializer(service.metrics.observe_stage),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


class ActionService(pb_grpc.ActionServiceServicer):
    def __init__(
        self,
        sessions: SessionManager,
        *,
        max_steps_per_request: int,
        max_requests_per_stream: int = 16,
        auth: TokenAuth | None = None,
        admin: TokenAuth | None = None,
        updater: ModelUpdater | None = None,
    ) -> None:
        self.sessions = sessions
        self.metrics = sessions.metrics
        self.admin = admin
        self.updater = updater
        self.max_steps_per_request = max_steps_per_request
        self.max_requests_per_stream = max_requests_per_stream
        self.auth = auth
        self.draining = False
        self.in_flight = 0  # requests being handled (unary calls, stream items)
        self._idle = asyncio.Event()
        self._idle.set()

    # -- helpers ------------------------------------------------------------------------------
    def _begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is being handled."""
        await self._idle.wait()

    async def _unary(
        self,
        method: str,
        request: object,
        context: grpc.aio.ServicerContext,
        handler: Callable[[str | None], Awaitable[T]],
    ) -> T:
        """Authenticate, run `handler(owner)`, count and time it, turn errors into the status."""
        started = time.perf_counter()
        self._begin()
        try:
            owner = self._owner(context)
            if isinstance(request, Malformed):
                raise request.error
            reply = await handler(owner)
        except Exception as exc:
            err = _status(exc)
            self.metrics.observe_request(method, err.code.name, time.perf_counter() - started)
            await context.abort(err.code, err.message, err.trailing_metadata())
        finally:
            self._end()
        self.metrics.observe_request(method, "OK", time.perf_counter() - started)
        return reply

    async def _stream_item(
        self, req: pb.GetActionRequest, owner: str | None
    ) -> pb.GetActionResponse | pb.RequestError:
        """One GetAction inside a stream (bounded by the stream, not per session): its response,
        or its error."""
        started = time.perf_counter()
        self._begin()
        try:
            reply = await self._get_action(req, owner, None, bounded=False)
        except Exception as exc:
            err = _status(exc)
            self.metrics.observe_request("StreamActions", err.code.name, time.perf_counter() - started)
            return err.request_error()
        finally:
            self._end()
        self.metrics.observe_request("StreamActions", "OK", time.perf_counter() - started)
        return reply

    def _owner(self, context: grpc.aio.ServicerContext) -> str | None:
        """The session owner of the call's bearer token (None without authentication)."""
        return self.auth.owner(_header(context, "authorization")) if self.auth else None

    def _check_admin(self, context: grpc.aio.ServicerContext) -> None:
        """Weight updates need an admin token (--admin-token-file); a worker token is not one."""
        if self.admin is None or self.updater is None:
            raise failed_precondition(
                "model updates are disabled on this server; start it with --admin-token-file.",
                "UPDATES_DISABLED",
            )
        header = _header(context, "authorization")
        try:
            self.admin.owner(header)
        except ServiceError:
            if self.auth is not None:
                try:
                    self.auth.owner(header)
                except ServiceError:
                    pass
                else:
                    raise permission_denied(
                        "this token may act but not update models; use an admin token."
                    ) from None
            raise

    async def _admin_call(
        self, method: str, context: grpc.aio.ServicerContext, handler: Callable[[], Awaitable[T]]
    ) -> T:
        """An admin RPC: admin token, counted and timed, errors as statuses."""
        started = time.perf_counter()
        self._begin()
        try:
            self._check_admin(context)
            reply = await handler()
        except Exception as exc:
            err = _status(exc)
            self.metrics.observe_request(method, err.code.name, time.perf_counter() - started)
            await context.abort(err.code, err.message, err.trailing_metadata())
        finally:
            self._end()
        self.metrics.observe_request(method, "OK", time.perf_counter() - started)
        return reply

    @staticmethod
    def _check_header(context: grpc.aio.ServicerContext, session_id: str) -> None:
        header = _header(context, SESSION_HEADER)
        if header is not None and session_id and header != session_id:
            raise invalid(
                f"metadata {SESSION_HEADER}={header!r} does not match the request's session_id {session_id!r}.",
                field=SESSION_HEADER,
            )

    def _prepare(self, req: pb.GetActionRequest, owner: str | None) -> StepRequest:
        """Decode and validate a GetAction before it touches its session."""
        session = self.sessions.get(req.session_id, owner)
        model = self.sessions.runners[session.model].model
        steps, n = decode_steps(req.steps, model.step_schema, session.model, self.max_steps_per_request)
        return self._request(req, session, steps, n)

    def _prepare_all(
        self, entries: Sequence[pb.GetActionRequest], owner: str | None
    ) -> list[StepRequest | ServiceError]:
        """`_prepare` of each entry (its request or its error); the steps of each model's entries
        are decoded together (`decode_many`)."""
        sessions: list[Session | ServiceError] = []
        for req in entries:
            try:
                sessions.append(self.sessions.get(req.session_id, owner))
            except ServiceError as err:
                sessions.append(err)
        by_model: dict[str, list[int]] = {}
        for i, session in enumerate(sessions):
            if isinstance(session, Session):
                by_model.setdefault(session.model, []).append(i)
        decoded: dict[int, tuple[dict[str, np.ndarray], int] | ServiceError] = {}
        for name, indices in by_model.items():
            schema = self.sessions.runners[name].model.step_schema
            messages = [entries[i].steps for i in indices]
            decoded.update(
                zip(indices, decode_many(messages, schema, name, self.max_steps_per_request), strict=True)
            )
        out: list[StepRequest | ServiceError] = []
        for i, (req, session) in enumerate(zip(entries, sessions, strict=True)):
            if isinstance(session, ServiceError):
                out.append(session)
                continue
            steps = decoded[i]
            if isinstance(steps, ServiceError):
                out.append(steps)
                continue
            try:
                out.append(self._request(req, session, *steps))
            except ServiceError as err:
                out.append(err)
        return out

    def _request(
        self, req: pb.GetActionRequest, session: Session, steps: dict[str, np.ndarray], n: int
    ) -> StepRequest:
        temperature = req.temperature if req.HasField("temperature") else None
        num_actions = req.num_actions if req.HasField("num_actions") else None
        check_sampling(temperature, num_actions, self.sessions.runners[session.model].model.max_num_actions)
        return StepRequest(
            session, req.seq, request_digest(req), steps, n, temperature, num_actions, req.return_scores
        )

    async def _get_action(
        self, req: pb.GetActionRequest, owner: str | None, deadline: float | None, bounded: bool = True
    ) -> pb.GetActionResponse:
        started = time.perf_counter()
        try:
            request = self._prepare(req, owner)
            validated = time.perf_counter()
            result = await self.sessions.step(request, deadline=deadline, bounded=bounded)
        except ServiceError as err:
            err.add(session_id=req.session_id or None, seq=req.seq)
            raise
        stepped = time.perf_counter()
        reply = action_reply(result)
        observe = self.metrics.observe_stage
        observe("validate", validated - started)
        observe("step", stepped - validated)
        observe("reply", time.perf_counter() - stepped)
        return reply

    def _model_info(self, name: str) -> pb.ModelInfo:
        return model_info(self.sessions.runner(name), self.max_steps_per_request)

    # -- RPCs ---------------------------------------------------------------------------------
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def handle(owner: str | None) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[self._model_info(name) for name in self.sessions.runners])

        return await self._unary("ListModels", request, context, handle)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async def handle(owner: str | None) -> pb.GetModelInfoResponse:
            return pb.GetModelInfoResponse(model=self._model_info(request.model))

        return await self._unary("GetModelInfo", request, context, handle)

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        async def handle(owner: str | None) -> pb.OpenSessionResponse:
            if self.draining:
                raise unavailable(
                    "the server is shutting down and opens no new sessions; retry on another replica.",
                    "SERVER_DRAINING",
                )
            header = _header(context, SESSION_HEADER)
            if header is not None and request.session_id and header != request.session_id:
                raise invalid(
                    f"metadata {SESSION_HEADER}={header!r} does not match session_id {request.session_id!r}.",
                    field=SESSION_HEADER,
                )
            settings = SessionSettings(
                model=request.model,
                seed=request.seed if request.HasField("seed") else None,
                temperature=request.temperature if request.HasField("temperature") else None,
                num_actions=request.num_actions if request.HasField("num_actions") else None,
                policy=request.context_policy,
                max_context_steps=request.max_context_steps
                if request.HasField("max_context_steps")
                else None,
                session_id=request.session_id or header or "",
                start_seq=request.start_seq,
                on_update=request.on_update,
            )
            session = self.sessions.open(settings, owner)
            return open_reply(session, self._model_info(session.model))

        return await self._unary("OpenSession", request, context, handle)

    async def GetAction(
        self, request: pb.GetActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetActionResponse:
        async def handle(owner: str | None) -> pb.GetActionResponse:
            self._check_header(context, request.session_id)
            return await self._get_action(request, owner, _deadline(context))

        return await self._unary("GetAction", request, context, handle)

    async def StreamActions(
        self, request_iterator: AsyncIterator[pb.StreamActionsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamActionsResponse]:
        try:
            owner = self._owner(context)
        except ServiceError as err:
            self.metrics.observe_request("StreamActions", err.code.name, 0.0)
            await context.abort(err.code, err.message, err.trailing_metadata())
        # A permit per request between reading it and writing its reply: when replies are not
        # consumed, writes stall on flow control, no permit comes back and reading stops.
        permits = asyncio.Semaphore(self.max_requests_per_stream)
        replies: asyncio.Queue[pb.StreamActionsResponse | None] = asyncio.Queue()

        async def answer(msg: pb.StreamActionsRequest | Malformed) -> None:
            if isinstance(msg, Malformed):
                self.metrics.observe_request("StreamActions", "INVALID_ARGUMENT", 0.0)
                replies.put_nowait(pb.StreamActionsResponse(error=msg.error.request_error()))
                return
            req = msg.request
            result = await self._stream_item(req, owner)
            reply = (
                pb.StreamActionsResponse(response=result)
                if isinstance(result, pb.GetActionResponse)
                else pb.StreamActionsResponse(error=result)
            )
            reply.session_id, reply.seq = req.session_id, req.seq
            replies.put_nowait(reply)

        async def read() -> None:
            pending: set[asyncio.Task[None]] = set()
            try:
                async for msg in request_iterator:
                    await permits.acquire()
                    task = asyncio.create_task(answer(msg))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                permits.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    async def BatchGetAction(
        self, request: pb.BatchGetActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetActionResponse:
        async def handle(owner: str | None) -> pb.BatchGetActionResponse:
            started = time.perf_counter()
            entries = request.requests
            prepared = self._prepare_all(entries, owner)
            valid = [p for p in prepared if isinstance(p, StepRequest)]
            validated = time.perf_counter()
            outcomes = iter(await self.sessions.step_many(valid, deadline=_deadline(context)))
            stepped = time.perf_counter()
            reply = pb.BatchGetActionResponse()
            observe = self.metrics.observe_request
            for i, (req, p) in enumerate(zip(entries, prepared, strict=True)):
                outcome = next(outcomes) if isinstance(p, StepRequest) else p
                if isinstance(outcome, ActionResult):
                    action_reply(outcome, reply.results.add().response)
                    code = "OK"
                else:
                    err = _status(outcome).add(session_id=req.session_id or None, seq=req.seq, entry=i)
                    reply.results.add(error=err.request_error())
                    code = err.code.name
                observe("BatchGetAction", code, time.perf_counter() - started)
            if entries:  # per request as for GetAction: each entry's share of validation and reply
                n, done = len(entries), time.perf_counter()
                for stage, seconds in (
                    ("validate", (validated - started) / n),
                    ("step", stepped - validated),
                    ("reply", (done - stepped) / n),
                ):
                    self.metrics.observe_stage(stage, seconds, n)
            return reply

        return await self._unary("BatchGetActionCall", request, context, handle)

    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetSessionResponse:
        async def handle(owner: str | None) -> pb.ResetSessionResponse:
            self._check_header(context, request.session_id)
            await self.sessions.reset(self.sessions.get(request.session_id, owner))
            return pb.ResetSessionResponse()

        return await self._unary("ResetSession", request, context, handle)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        async def handle(owner: str | None) -> pb.CloseSessionResponse:
            self._check_header(context, request.session_id)
            await self.sessions.close(self.sessions.get(request.session_id, owner))
            return pb.CloseSessionResponse()

        return await self._unary("CloseSession", request, context, handle)

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        async def handle() -> pb.UpdateModelResponse:
            if isinstance(request, Malformed):
                raise request.error
            assert self.updater is not None
            runner = self.sessions.runner(request.model)
            done = await self.updater.from_source(runner, request.source, request.revision, request.tag)
            return pb.UpdateModelResponse(**_update_reply(done))

        return await self._admin_call("UpdateModel", context, handle)

    async def PushWeights(
        self, request_iterator: AsyncIterator[pb.PushWeightsRequest], context: grpc.aio.ServicerContext
    ) -> pb.PushWeightsResponse:
        async def handle() -> pb.PushWeightsResponse:
            assert self.updater is not None
            with tempfile.TemporaryDirectory(prefix="mouse-serve-upload-") as folder:
                path = Path(folder) / "weights.safetensors"
                runner, tag = await self._receive_upload(request_iterator, path, time.perf_counter())
                done = await self.updater.from_upload(runner, path, tag)
            return pb.PushWeightsResponse(**_update_reply(done))

        return await self._admin_call("PushWeights", context, handle)

    async def _receive_upload(
        self, chunks: AsyncIterator[pb.PushWeightsRequest | Malformed], path: Path, started: float
    ) -> tuple[ModelRunner, str]:
        """Write a PushWeights upload to `path`, checking its declared size and SHA-256."""
        header: pb.PushWeightsRequest | None = None
        runner: ModelRunner | None = None
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("wb") as out:
                async for chunk in chunks:
                    if isinstance(chunk, Malformed):
                        raise chunk.error
                    if header is None:
                        header = chunk
                        runner = self.sessions.runner(chunk.model)
                        _check_upload_header(chunk, runner)
                    elif (chunk.model, chunk.total_bytes, chunk.sha256) not in (
                        ("", 0, ""),
                        (header.model, header.total_bytes, header.sha256),
                    ):
                        raise invalid("a later chunk names another model, size or sha256 than the first.")
                    size += len(chunk.data)
                    if size > header.total_bytes:
                        raise invalid(
                            f"the upload is longer than its total_bytes {header.total_bytes}.",
                            "UPLOAD_TOO_LONG",
                        )
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if header is None or runner is None:
                raise invalid("PushWeights carried no chunk; the first one names the model, size and sha256.")
            if size < header.total_bytes:
                raise invalid(
                    f"the upload is truncated: {size} of {header.total_bytes} bytes arrived.",
                    "UPLOAD_TRUNCATED",
                )
            if digest.hexdigest() != header.sha256:
                raise invalid(
                    f"the upload's SHA-256 is {digest.hexdigest()}, not the declared {header.sha256}; it was "
                    "corrupted on the way.",
                    "UPLOAD_CHECKSUM_MISMATCH",
                )
        except ServiceError:
            if runner is not None:  # the upload named a model: count its refusal
                self.metrics.model_update(
                    runner.spec.name, "refused", time.perf_counter() - started, runner.version
                )
            raise
        return runner, header.tag


def _check_upload_header(first: pb.PushWeightsRequest, runner: ModelRunner) -> None:
    limit = upload_limit(runner)
    if not 0 < first.total_bytes <= limit:
        raise invalid(
            f"total_bytes must be in [1, {limit}] for model {runner.spec.name!r}, got {first.total_bytes}.",
            field="total_bytes",
        )
    if not SHA256_HEX.match(first.sha256):
        raise invalid(f"sha256 must be 64 lower-case hex digits, got {first.sha256!r}.", field="sha256")


def _update_reply(done: UpdateOutcome) -> dict[str, object]:
    return {
        "model": done.model,
        "model_version": done.version,
        "model_tag": done.tag,
        "seconds": done.seconds,
    }
