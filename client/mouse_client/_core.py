"""The sans-I/O core shared by the blocking and the asyncio client.

Everything that decides something lives here: options and channel settings, request building,
sequence numbers, the in-doubt bookkeeping, retries, recovery of a lost session and the group
rules. A call is a *plan*: a generator that yields operations (`Call`, `StreamCall`, `Sleep`)
and receives their results, or has an `ActionError` thrown in. The two shells (`client.py`,
`aio.py`) only run the operations, blocking or with `await`.

The exactly-once rules, per session:
- `seq` is the last sequence number the server applied; `outbox` holds the requests that have
  a number but are not known to be applied (its head may be *in doubt*: sent, no answer).
- Every call first delivers the outbox, re-sending an in-doubt request unchanged (same seq, same
  content: the server answers its cached reply if it had applied it, or applies it now). If the
  new call carries the same records and options, it is that request's retry and gets its reply;
  otherwise its records go out with the next number.
- Any status the server answers means "not applied": the request leaves the outbox, except
  when a call re-sends an earlier in-doubt request and the server refuses it only for now
  (`_NOT_YET`): it stays at the head, so its records still go out before any later ones.
- A session the server lost is reopened with `start_seq` so that its history, replayed in
  requests of at most `max_steps_per_request` steps, ends at the number it would have had.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mouse_client.errors import ActionError, EntryOutcome, GroupError, SessionClosedError, ValidationError
from mouse_client.routing import SESSION_HEADER, HashRing, new_session_id, routing_key
from mouse_client.steps import StepRecords, encode
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc

T = TypeVar("T")

POLICIES = {
    None: pb.CONTEXT_POLICY_UNSPECIFIED,
    "sliding": pb.CONTEXT_POLICY_SLIDING,
    "reset": pb.CONTEXT_POLICY_RESET,
    "reject": pb.CONTEXT_POLICY_REJECT,
}
UPDATE_POLICIES = {
    None: pb.UPDATE_POLICY_UNSPECIFIED,
    "refill": pb.UPDATE_POLICY_REFILL,
    "keep": pb.UPDATE_POLICY_KEEP,
    "reset": pb.UPDATE_POLICY_RESET,
}
UPLOAD_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HEALTH_SERVICE = "mouse.action.v1.ActionService"
_LOST_REASONS = (None, "SESSION_NOT_FOUND", "SESSION_EXPIRED")
_RECOVERIES_PER_CALL = 3
# Refusals of a request that was not applied but would be if sent again later.
_NOT_YET = frozenset({"DEADLINE_NOT_APPLIED", "SESSION_QUEUE_FULL"})


# -- operations the shells run ----------------------------------------------------------------
@dataclass
class Call:
    """A unary RPC: `stub.<method>(request)` on the target of `session_id` (or `target`)."""

    method: str
    request: Message
    session_id: str | None
    timeout: float | None
    target: str | None = None  # a health check of one target
    wait_for_ready: bool = False


@dataclass
class StreamCall:
    """One request over a session's `StreamActions` call; the result is its `GetActionResponse`
    (an error reply is thrown in as an `ActionError`)."""

    stream: Any
    request: pb.GetActionRequest
    timeout: float | None


@dataclass
class Sleep:
    seconds: float


Op = Union[Call, StreamCall, Sleep]  # noqa: UP007 (py3.10 runtime alias)
Plan = Generator[Op, Any, T]


# -- retries and the call budget --------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed with a transient status, re-sending the same request.

    `timeout_s` bounds a whole call, attempts and sleeps included (the client's `timeout_s`,
    when smaller, bounds it instead). Backoff grows from `initial_backoff_s` by `multiplier` up to
    `max_backoff_s` (with jitter); at most `max_attempts` attempts.
    """

    max_attempts: int = 60
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    timeout_s: float = 60.0
    codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def backoff(self) -> Iterator[float]:
        """The sleeps between attempts, drawn lazily (only when a call failed)."""
        delay = self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * self.multiplier, self.max_backoff_s)


class Budget:
    """The time and attempts one call may spend."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None) -> None:
        limit = policy.timeout_s if timeout_s is None else min(policy.timeout_s, timeout_s)
        self.deadline = time.monotonic() + limit
        self.policy = policy
        self._pauses = policy.backoff()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def pause(self, err: ActionError) -> float | None:
        """How long to sleep before the next attempt, or None to give up."""
        if err.code not in self.policy.codes:
            return None
        pause = next(self._pauses, None)
        if pause is None or pause >= self.remaining():
            return None
        return pause


def rpc(budget: Budget, make_op: Callable[[float], Op]) -> Plan[Any]:
    """Run one operation with retries: transient failures are re-sent unchanged."""
    while True:
        try:
            return (yield make_op(budget.remaining()))
        except ActionError as err:
            pause = budget.pause(err)
            if pause is None:
                raise
            yield Sleep(pause)


# -- options and channels ---------------------------------------------------------------------
@dataclass(frozen=True)
class SessionOptions:
    """What `open_session` asks for; kept so a lost session can be reopened the same way."""

    model: str = "default"
    seed: int | None = None
    temperature: float | None = None
    num_actions: int | None = None
    context_policy: str | None = None
    max_context_steps: int | None = None
    on_update: str | None = None

    def __post_init__(self) -> None:
        if self.context_policy not in POLICIES:
            raise ValidationError(
                f"context_policy must be one of {[p for p in POLICIES if p]} or None, got {self.context_policy!r}."
            )
        if self.on_update not in UPDATE_POLICIES:
            raise ValidationError(
                f"on_update must be one of {[p for p in UPDATE_POLICIES if p]} or None, got {self.on_update!r}."
            )

    def request(self, session_id: str, start_seq: int = 0) -> pb.OpenSessionRequest:
        req = pb.OpenSessionRequest(
            model=self.model,
            session_id=session_id,
            context_policy=POLICIES[self.context_policy],
            on_update=UPDATE_POLICIES[self.on_update],
        )
        for name in ("seed", "temperature", "num_actions", "max_context_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(req, name, value)
        if start_seq:
            req.start_seq = start_seq
        return req


@dataclass
class ChannelConfig:
    """How to reach the server(s): targets, auth token, credentials, options, compression."""

    targets: list[str]
    token: str | None = None
    credentials: grpc.ChannelCredentials | None = None
    options: list[tuple[str, Any]] = field(default_factory=list)
    compression: grpc.Compression | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValidationError("at least one target (host:port) is needed.")
        self.ring = HashRing(self.targets)

    def metadata(self, session_id: str | None = None) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if session_id:
            md.append((SESSION_HEADER, session_id))
        return tuple(md)

    def target_for(self, session_id: str | None) -> str:
        return self.ring.target(routing_key(session_id)) if session_id else self.targets[0]


class ClientBase:
    """Connection settings and per-target channels, shared by the blocking and asyncio client.

    - `target`: "host:port", or a list of them (sessions are then sharded by consistent hashing
      of their routing key).
    - `token`: sent as `authorization: Bearer <token>`.
    - TLS: `credentials` (any `grpc.ChannelCredentials`), or `tls=True` / PEM bytes in
      `root_certificates`, `private_key`, `certificate_chain`.
    - `channel_options`: extra gRPC channel arguments; `compression`: a `grpc.Compression`.
    - `retry`: the `RetryPolicy`; `timeout_s`: bounds every call, retries included.
    """

    _secure_channel: Callable[..., Any]
    _insecure_channel: Callable[..., Any]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        compression: grpc.Compression | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        targets = [target] if isinstance(target, str) else list(target)
        pem = root_certificates or private_key or certificate_chain
        if credentials is None and (tls or (tls is None and pem)):
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        if timeout_s is not None and not timeout_s > 0:
            raise ValidationError(f"timeout_s must be > 0 or None, got {timeout_s}.")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        self.config = ChannelConfig(targets, token, credentials, options, compression)
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self._channels: dict[str, Any] = {}
        self._stubs: dict[tuple[bool, str], Any] = {}

    def _channel(self, target: str) -> Any:
        if target not in self._channels:
            cfg = self.config
            if cfg.credentials is not None:
                channel = self._secure_channel(target, cfg.credentials, cfg.options, cfg.compression)
            else:
                channel = self._insecure_channel(target, cfg.options, cfg.compression)
            self._channels[target] = channel
        return self._channels[target]

    def stub(self, session_id: str | None = None, *, target: str | None = None, health: bool = False) -> Any:
        """The ActionService (or health) stub of the target that holds `session_id` (the first
        target when None)."""
        target = target or self.config.target_for(session_id)
        key = (health, target)
        if key not in self._stubs:
            factory = health_pb2_grpc.HealthStub if health else pb_grpc.ActionServiceStub
            self._stubs[key] = factory(self._channel(target))
        return self._stubs[key]

    def _forget_channels(self) -> list[Any]:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        return channels

    def budget(self) -> Budget:
        return Budget(self.retry, self.timeout_s)

    # -- plans of the client's own calls ------------------------------------------------------
    def _plan_list_models(self) -> Plan[list[pb.ModelInfo]]:
        reply = yield from rpc(self.budget(), lambda t: Call("ListModels", pb.ListModelsRequest(), None, t))
        return list(reply.models)

    def _plan_model_info(self, model: str) -> Plan[pb.ModelInfo]:
        req = pb.GetModelInfoRequest(model=model)
        reply = yield from rpc(self.budget(), lambda t: Call("GetModelInfo", req, None, t))
        return reply.model

    def _plan_open(self, options: SessionOptions, session_id: str | None) -> Plan[pb.OpenSessionResponse]:
        return (yield from open_plan(self.budget(), options, session_id))

    def _plan_open_group(
        self,
        n: int,
        model: str | Sequence[str],
        seed: int | None,
        temperature: float | None,
        num_actions: int | Sequence[int | None] | None,
        context_policy: str | None,
        max_context_steps: int | None,
        on_update: str | None = None,
    ) -> Plan[list[tuple[SessionOptions, pb.OpenSessionResponse]]]:
        """Open `n` sessions `<group>.<i>` (one routing key); on a failure, close those opened."""
        group = new_session_id()
        models, counts = per_session(n, model), per_session(n, num_actions)
        opened: list[tuple[SessionOptions, pb.OpenSessionResponse]] = []
        try:
            for i in range(n):
                options = SessionOptions(
                    models[i],
                    None if seed is None else seed + i,
                    temperature,
                    counts[i],
                    context_policy,
                    max_context_steps,
                    on_update,
                )
                reply = yield from open_plan(self.budget(), options, f"{group}.{i}", any_id=True)
                opened.append((options, reply))
        except ActionError:
            for _, reply in opened:  # best effort: they would only idle out
                try:
                    close = pb.CloseSessionRequest(session_id=reply.session_id)
                    yield Call("CloseSession", close, reply.session_id, self.budget().remaining())
                except ActionError:
                    pass
            raise
        return opened

    def _plan_update_model(self, model: str, source: str, revision: str | None, tag: str) -> Plan[int]:
        """UpdateModel (not retried: a repeated update would be a new version)."""
        req = pb.UpdateModelRequest(model=model, source=str(source), revision=revision or "", tag=tag)
        reply = yield Call("UpdateModel", req, None, self.timeout_s)
        return int(reply.model_version)

    def _plan_push_weights(self, model: str, weights: Any, tag: str, chunk_bytes: int) -> Plan[int]:
        """PushWeights of a safetensors file (path) or a state dict, in chunks (not retried)."""
        chunks = upload_chunks(model, safetensors_bytes(weights), tag, chunk_bytes)
        reply = yield Call("PushWeights", iter(chunks), None, self.timeout_s)  # type: ignore[arg-type]
        return int(reply.model_version)

    def _plan_wait_ready(self, timeout_s: float) -> Plan[None]:
        """Until every target's health service answers SERVING for the ActionService."""
        if not timeout_s > 0:
            raise ValidationError(f"timeout must be > 0, got {timeout_s}.")
        deadline = time.monotonic() + timeout_s
        req = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        for target in self.config.targets:
            status = "no answer"
            while (left := deadline - time.monotonic()) > 0:
                try:
                    reply = yield Call("Check", req, None, left, target=target, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except ActionError as err:
                    status = f"{err.code.name}: {err.message}"
                yield Sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            else:
                raise ActionError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{target} was not ready within {timeout_s:g} s (last: {status}).",
                )


def safetensors_bytes(weights: Any) -> bytes:
    """The bytes of a safetensors file: a path to one, a checkpoint folder holding
    `model.safetensors`, or a state dict (which needs torch and safetensors, imported here only)."""
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise ValidationError(f"there is no safetensors file at {path}.")
        return path.read_bytes()
    if not isinstance(weights, Mapping):
        raise ValidationError(
            f"weights must be a path to a safetensors file or a state dict, got {type(weights).__name__}."
        )
    try:
        from safetensors.torch import save
    except ImportError:
        raise ValidationError(
            "pushing a state dict needs torch and safetensors; save it with mouse_core.save_model and "
            "push the file instead."
        ) from None
    return save({k: v.detach().contiguous().cpu() for k, v in weights.items()}, metadata={"format": "pt"})


def upload_chunks(model: str, data: bytes, tag: str, chunk_bytes: int) -> list[pb.PushWeightsRequest]:
    """A PushWeights upload: the first chunk names the model, size and SHA-256."""
    if chunk_bytes < 1:
        raise ValidationError(f"chunk_bytes must be >= 1, got {chunk_bytes}.")
    parts = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    first = pb.PushWeightsRequest(
        model=model, tag=tag, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), data=parts[0]
    )
    return [first, *(pb.PushWeightsRequest(data=p) for p in parts[1:])]


def per_session(n: int, value: Any) -> list[Any]:
    """`value` for each of `n` sessions: one value for all, or a sequence of `n`."""
    if isinstance(value, (str, int, float)) or value is None:
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValidationError(f"expected one value per session ({n}), got {len(values)}.")
    return values


def open_plan(
    budget: Budget,
    options: SessionOptions,
    session_id: str | None,
    start_seq: int = 0,
    *,
    any_id: bool = False,
) -> Plan[pb.OpenSessionResponse]:
    """OpenSession. When the id is ours to choose (none given, or `any_id` for a reopen) and is
    found in use (an earlier attempt that was applied, or a lost session's id still held), a
    fresh one with the same routing key is tried."""
    sid = session_id or new_session_id()
    for _ in range(3):
        req = options.request(sid, start_seq)
        try:
            return (yield from rpc(budget, lambda t, r=req: Call("OpenSession", r, r.session_id, t)))
        except ActionError as err:
            if err.code is not grpc.StatusCode.ALREADY_EXISTS or (session_id is not None and not any_id):
                raise
            sid = f"{routing_key(sid)}.{new_session_id()}"
    raise ActionError(grpc.StatusCode.ALREADY_EXISTS, f"could not find a free session id like {sid!r}.")


# -- requests and their identity --------------------------------------------------------------
@dataclass(frozen=True)
class StepParams:
    """The options of one GetAction (None = the session's default)."""

    temperature: float | None = None
    num_actions: int | None = None
    return_scores: bool = False

    def apply(self, req: pb.GetActionRequest) -> pb.GetActionRequest:
        if self.temperature is not None:
            req.temperature = self.temperature
        if self.num_actions is not None:
            req.num_actions = self.num_actions
        req.return_scores = self.return_scores
        return req


Key = tuple[bytes, StepParams]
Delivered = tuple["Outgoing", pb.GetActionResponse]


def request_key(steps: pb.Steps, params: StepParams) -> Key:
    """What makes two calls the same request: their records and options."""
    return steps.SerializeToString(deterministic=True), params


@dataclass
class Outgoing:
    """A GetAction with its number, not yet known to be applied."""

    request: pb.GetActionRequest
    steps: pb.Steps | None  # the worker's records it delivers (None: a replay of kept history)
    n: int
    params: StepParams | None  # the worker call's options (None: a replay of kept history)
    replay: bool = False  # part of a recovery replay (sent unary)

    def key(self) -> Key | None:
        """Computed only when a call must be compared with this one (after an error)."""
        if self.steps is None or self.params is None:
            return None
        return request_key(self.steps, self.params)


class StepHistory:
    """The session's most recent applied requests (bounded by steps), replayed after a loss."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._parts: deque[tuple[pb.Steps, int]] = deque()
        self._steps = 0

    def __len__(self) -> int:
        return self._steps

    def clear(self) -> None:
        self._parts.clear()
        self._steps = 0

    def add(self, steps: pb.Steps, n: int) -> None:
        if self.max_steps <= 0:
            return
        self._parts.append((steps, n))
        self._steps += n
        while self._parts and self._steps - self._parts[0][1] >= self.max_steps:
            self._steps -= self._parts.popleft()[1]

    def parts(self) -> list[tuple[pb.Steps, int]]:
        return list(self._parts)


def _columns(steps: pb.Steps, n: int) -> dict[str, np.ndarray]:
    """A `Steps` message as per-field arrays of shape [n, width]."""
    out = {}
    for desc in pb.Steps.DESCRIPTOR.fields:
        raw = getattr(steps, desc.name)
        if len(raw):
            values = np.frombuffer(raw, np.uint8) if desc.name == "obs_image" else np.asarray(raw)
            out[desc.name] = values.reshape(n, -1)
    return out


def _message(columns: dict[str, np.ndarray]) -> pb.Steps:
    msg = pb.Steps()
    for name, values in columns.items():
        if name == "obs_image":
            msg.obs_image = values.astype(np.uint8).tobytes()
        else:
            getattr(msg, name).extend(values.reshape(-1))
    return msg


def replay_chunks(parts: list[tuple[pb.Steps, int]], cap: int, limit: int = 0) -> list[tuple[pb.Steps, int]]:
    """The last `limit` steps (all when 0) of `parts`, in order, re-cut into messages of at most
    `cap` steps (the last one full, so the replay takes the fewest requests)."""
    total = sum(n for _, n in parts)
    if total == 0:
        return []
    cols = [_columns(s, n) for s, n in parts]
    merged = {name: np.concatenate([c[name] for c in cols]) for name in cols[0]}
    first = max(0, total - limit) if limit else 0
    bounds = list(range(total, first, -cap))[::-1]
    return [
        (_message({k: v[max(first, b - cap) : b] for k, v in merged.items()}), b - max(first, b - cap))
        for b in bounds
    ]


# -- one session ------------------------------------------------------------------------------
class SessionCore:
    """A session's state and plans: id, sequence numbers, outbox, history, recovery.

    The shells' `Session` and `AsyncSession` extend it with blocking or awaitable methods.
    Not thread-safe: one worker thread (or task) per session.
    """

    def __init__(
        self,
        options: SessionOptions,
        opened: pb.OpenSessionResponse,
        *,
        recover: bool = True,
        history_steps: int | None = None,
    ) -> None:
        self.options = options
        self.recover = recover
        self.opened = opened
        self.id = opened.session_id
        self.seq = opened.start_seq
        self.outbox: deque[Outgoing] = deque()
        self.history = StepHistory(opened.max_context_steps if history_steps is None else history_steps)
        self.closed = False
        self.lost = False
        self.recoveries = 0
        self.epoch = 0  # +1 whenever the context changes (a request applied, a reset)

    @property
    def model(self) -> pb.ModelInfo:
        return self.opened.model

    @property
    def in_doubt(self) -> bool:
        """True while a request of this session has an unknown outcome, or was refused only for
        now (`ActionError.earlier == "pending"`): the next call sends it first."""
        return bool(self.outbox) or self.lost

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.id!r} is closed; open a new one.")

    def new_request(self, steps: pb.Steps, n: int, params: StepParams) -> Outgoing:
        seq = self.seq + 1 + len(self.outbox)
        req = params.apply(pb.GetActionRequest(session_id=self.id, seq=seq, steps=steps))
        return Outgoing(req, steps, n, params)

    def applied(self, out: Outgoing, reply: pb.GetActionResponse) -> Delivered | None:
        """Record the head of the outbox as applied; returns it with its reply for worker records."""
        assert self.outbox and self.outbox[0] is out
        self.outbox.popleft()
        self.seq = out.request.seq
        if out.steps is None:
            return None  # a replay of kept history: the context is what it was
        self.epoch += 1
        self.history.add(out.steps, out.n)
        return (out, reply)

    def failed(self, out: Outgoing, err: ActionError, settling: bool = False) -> ActionError | None:
        """The head of the outbox failed with `err`. Returns the error to raise, or None when the
        session is lost and will be reopened (the caller goes on delivering). `settling`: the head
        is an earlier call's request, whose records the worker no longer holds."""
        if err.in_doubt:
            return err  # the request stays at the head, re-sent unchanged by the next call
        if err.code is grpc.StatusCode.NOT_FOUND and err.reason == "SESSION_CLOSED":
            self.closed = True
            return err
        if err.code is grpc.StatusCode.NOT_FOUND and err.reason in _LOST_REASONS and self.recover:
            self.lost = True
            return None
        # the server refused it: not applied
        if out.replay:
            self.lost = True  # the recovery failed; the next call starts it again
        elif not (settling and err.reason in _NOT_YET):
            self.outbox.remove(out)
        return err

    def recovery_plan(self, budget: Budget) -> Plan[None]:
        """Reopen a lost session and queue its replay: kept history plus the worker records that
        were not yet applied, cut into requests of at most `max_steps_per_request` steps and
        numbered so the last one has the number it would have had without the loss."""
        real = [o for o in self.outbox if o.steps is not None]
        assert len(real) <= 1, "at most one request of worker records is outstanding"
        tail = real[0] if real else None
        target = self.outbox[-1].request.seq if self.outbox else self.seq
        cap = self.model.max_steps_per_request or 1 << 30
        parts = self.history.parts() + ([(tail.steps, tail.n)] if tail and tail.steps is not None else [])
        chunks = replay_chunks(parts, cap, self.opened.max_context_steps)
        start = max(0, target - len(chunks))
        opened = yield from open_plan(budget, self.options, self.id, start, any_id=True)
        self.opened, self.id = opened, opened.session_id
        self.seq, self.lost = opened.start_seq, False
        self.recoveries += 1
        self.outbox.clear()
        for i, (steps, n) in enumerate(chunks):
            req = pb.GetActionRequest(session_id=self.id, seq=self.seq + 1 + i, steps=steps)
            last = i == len(chunks) - 1
            if last and tail is not None:
                _copy_params(tail.request, req)
                self.outbox.append(Outgoing(req, tail.steps, tail.n, tail.params, replay=True))
            else:
                self.outbox.append(Outgoing(req, None, n, None, replay=True))

    def deliver_plan(
        self, budget: Budget, send: Callable[[pb.GetActionRequest, float], Op], settling: bool = False
    ) -> Plan[Delivered | None]:
        """Deliver the outbox in order (reopening a lost session); returns the worker request it
        delivered, if any, with its reply. `settling`: the outbox holds earlier calls' requests."""
        delivered = None
        recoveries = 0
        while self.lost or self.outbox:
            if self.lost:
                recoveries += 1
                if recoveries > _RECOVERIES_PER_CALL:
                    raise ActionError(
                        grpc.StatusCode.NOT_FOUND, f"session {self.id!r} was lost again after reopening it."
                    )
                yield from self.recovery_plan(budget)
                continue
            head = self.outbox[0]
            make = (
                (lambda t, r=head.request: Call("GetAction", r, r.session_id, t))
                if head.replay
                else (lambda t, r=head.request: send(r, t))
            )
            try:
                reply = yield from rpc(budget, make)
            except ActionError as err:
                error = self.failed(head, err, settling)
                if error is not None:
                    raise error from None
                continue
            delivered = self.applied(head, reply) or delivered
        return delivered

    def step_plan(
        self,
        records: StepRecords,
        params: StepParams,
        budget: Budget,
        send: Callable[[pb.GetActionRequest, float], Op],
    ) -> Plan[pb.GetActionResponse]:
        """One GetAction of worker records (unary or over a stream, by `send`)."""
        self.check_open()
        steps, n = encode(records)
        if self.in_doubt:
            try:
                settled = yield from self.deliver_plan(budget, send, settling=True)
            except ActionError as err:
                raise _earlier(err, self) from None
            if settled is not None and settled[0].key() == request_key(steps, params):
                return settled[1]  # this call is the retry of the request that was in doubt
        self.outbox.append(self.new_request(steps, n, params))
        settled = yield from self.deliver_plan(budget, send)
        assert settled is not None
        return settled[1]

    def resolve_plan(self, budget: Budget) -> Plan[pb.GetActionResponse | None]:
        """Settle a request whose outcome is unknown now; returns its reply (None if none)."""
        self.check_open()
        settled = yield from self.deliver_plan(budget, unary_send, settling=True)
        return None if settled is None else settled[1]

    def reset_plan(self, budget: Budget) -> Plan[None]:
        self.check_open()
        yield from self.deliver_plan(budget, unary_send)  # the context must not get an old step later
        req = pb.ResetSessionRequest(session_id=self.id)
        try:
            yield from rpc(budget, lambda t: Call("ResetSession", req, self.id, t))
        except ActionError as err:
            if (
                err.code is not grpc.StatusCode.NOT_FOUND
                or err.reason not in _LOST_REASONS
                or not self.recover
            ):
                if err.reason == "SESSION_CLOSED":
                    self.closed = True
                raise
            self.history.clear()
            self.lost = True
            yield from self.deliver_plan(budget, unary_send)  # reopens it, empty
        self.history.clear()
        self.epoch += 1

    def close_plan(self, budget: Budget) -> Plan[None]:
        """Close (a session the server already dropped counts as closed)."""
        if self.closed:
            return
        self.closed = True
        self.outbox.clear()
        req = pb.CloseSessionRequest(session_id=self.id)
        try:
            yield from rpc(budget, lambda t: Call("CloseSession", req, self.id, t))
        except ActionError as err:
            if err.code is not grpc.StatusCode.NOT_FOUND:
                raise


def _earlier(err: ActionError, session: SessionCore) -> ActionError:
    """`err`, said to concern the earlier request of `session` that was being settled, not the
    new records; it is pending when the session still holds it to send."""
    pending = session.in_doubt and not session.closed
    fate = (
        "it was not applied and goes first on the session's next call"
        if pending
        else "the server refused it, so its records are not applied and are dropped"
    )
    message = f"settling an earlier request whose outcome was unknown ({fate}; the new records were not sent): {err.message}"
    return ActionError(
        err.code,
        message,
        reason=err.reason,
        metadata=err.metadata,
        in_doubt=err.in_doubt,
        earlier="pending" if pending else "dropped",
    )


def _copy_params(src: pb.GetActionRequest, dst: pb.GetActionRequest) -> None:
    for name in ("temperature", "num_actions"):
        if src.HasField(name):
            setattr(dst, name, getattr(src, name))
    dst.return_scores = src.return_scores


def unary_send(req: pb.GetActionRequest, timeout: float) -> Op:
    return Call("GetAction", req, req.session_id, timeout)


# -- a group of sessions ----------------------------------------------------------------------
class GroupCore:
    """Sessions of a vector of environments, stepped with one `BatchGetAction` per step.

    After a `GroupError`, the group remembers the entries that were applied in that call: the
    group's next call, if it carries the same records and options for such an entry, is the
    retry and gets the recorded reply without sending anything (a retry is recognised by
    identical content in the call right after the error). To step only some sessions, pass
    `indices` (or a boolean `mask`): that is also the unambiguous way to retry failed entries.
    """

    def __init__(self, sessions: Sequence[SessionCore]) -> None:
        if not sessions:
            raise ValidationError("a session group needs at least one session.")
        self.sessions = list(sessions)
        # group index -> (key, reply, session epoch) of entries applied in a call that failed
        self._retry_replies: dict[int, tuple[Key, pb.GetActionResponse, int]] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.sessions]

    @property
    def models(self) -> list[pb.ModelInfo]:
        return [s.model for s in self.sessions]

    @property
    def model(self) -> pb.ModelInfo:
        """The model of the group's sessions (an error when they use several)."""
        names = {s.model.name for s in self.sessions}
        if len(names) > 1:
            raise ValidationError(f"the group's sessions use several models {sorted(names)}; see `models`.")
        return self.sessions[0].model

    def select(self, indices: Sequence[int] | None, mask: Any) -> list[int]:
        """The group indices a call steps (all, `indices`, or where `mask` is true)."""
        if indices is not None and mask is not None:
            raise ValidationError("give indices or mask, not both.")
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != (len(self),):
                raise ValidationError(f"mask must be {len(self)} booleans, got {m.dtype} {m.shape}.")
            return [int(i) for i in np.flatnonzero(m)]
        if indices is None:
            return list(range(len(self)))
        picked = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        if len(set(picked)) != len(picked) or any(not 0 <= i < len(self) for i in picked):
            raise ValidationError(f"indices must be distinct and in [0, {len(self)}), got {picked}.")
        return picked

    def step_plan(
        self,
        steps: Sequence[StepRecords],
        params: StepParams,
        budget: Budget,
        indices: Sequence[int] | None = None,
        mask: Any = None,
    ) -> Plan[list[pb.GetActionResponse]]:
        picked = self.select(indices, mask)
        if len(steps) != len(picked):
            raise ValidationError(
                f"{len(picked)} sessions are stepped but {len(steps)} step entries were given."
            )
        memory, self._retry_replies = self._retry_replies, {}
        for i in picked:
            self.sessions[i].check_open()
        encoded = [encode(s) for s in steps]
        replies: dict[int, pb.GetActionResponse] = {}
        errors: dict[int, ActionError] = {}
        # 1. requests of earlier calls whose outcome is unknown
        doubtful = [i for i in picked if self.sessions[i].in_doubt]
        settled = (
            yield from self._deliver(doubtful, budget, errors, settling=True) if doubtful else _nothing()
        )
        errors.update({i: _earlier(err, self.sessions[i]) for i, err in errors.items()})
        # 2. the new records (or, for a retry, the reply it already got)
        fresh = []
        for i, (enc, n) in zip(picked, encoded, strict=True):
            if i in errors:
                continue
            earlier = (settled[i][0].key(), settled[i][1]) if i in settled else None
            if earlier is None and i in memory and memory[i][2] == self.sessions[i].epoch:
                earlier = memory[i][:2]  # nothing happened to the session since the failed call
            if earlier is not None and earlier[0] == request_key(enc, params):
                replies[i] = earlier[1]
                continue
            session = self.sessions[i]
            session.outbox.append(session.new_request(enc, n, params))
            fresh.append(i)
        if fresh:
            delivered = yield from self._deliver(fresh, budget, errors)
            replies.update({i: r for i, (_, r) in delivered.items()})
        if errors:
            outcomes = []
            for i, (enc, _) in zip(picked, encoded, strict=True):
                session = self.sessions[i]
                if i in replies:
                    self._retry_replies[i] = (request_key(enc, params), replies[i], session.epoch)
                    outcomes.append(EntryOutcome(i, session.id, "applied", action=int(replies[i].action)))
                else:
                    err = errors[i]
                    status = "in_doubt" if err.in_doubt else "refused"
                    outcomes.append(EntryOutcome(i, session.id, status, error=err))
            raise GroupError(outcomes)
        return [replies[i] for i in picked]

    def _deliver(
        self, indices: list[int], budget: Budget, errors: dict[int, ActionError], settling: bool = False
    ) -> Plan[dict[int, Delivered]]:
        """Deliver the outboxes of `indices` together, one BatchGetAction per round (`settling`:
        as `Session.deliver_plan`)."""
        delivered: dict[int, Delivered] = {}
        recoveries = dict.fromkeys(indices, 0)
        active = list(indices)
        while active:
            for i in [i for i in active if self.sessions[i].lost]:
                recoveries[i] += 1
                try:
                    if recoveries[i] > _RECOVERIES_PER_CALL:
                        raise ActionError(
                            grpc.StatusCode.NOT_FOUND, "the session was lost again after reopening it."
                        )
                    yield from self.sessions[i].recovery_plan(budget)
                except ActionError as err:
                    errors[i] = _for_entry(err, i, self.sessions[i].id)
            active = [i for i in active if i not in errors and self.sessions[i].outbox]
            if not active:
                break
            heads = [self.sessions[i].outbox[0] for i in active]
            batch = pb.BatchGetActionRequest(requests=[h.request for h in heads])
            lead = heads[0].request.session_id
            try:
                reply = yield from rpc(budget, lambda t, b=batch, s=lead: Call("BatchGetAction", b, s, t))
                results: list[Any] = list(reply.results)
            except ActionError as err:
                results = [err] * len(heads)
            for i, head, result in zip(active, heads, results, strict=True):
                session = self.sessions[i]
                if isinstance(result, ActionError):
                    error: ActionError | None = result
                elif result.HasField("error"):
                    error = ActionError.from_status(result.error)
                else:
                    error = None
                    done = session.applied(head, result.response)
                    if done is not None:
                        delivered[i] = done
                if error is not None:
                    failure = session.failed(head, error, settling)
                    if failure is not None:
                        errors[i] = _for_entry(failure, i, session.id)
            active = [
                i for i in active if i not in errors and (self.sessions[i].outbox or self.sessions[i].lost)
            ]
        return delivered

    def reset_plans(self, budget: Budget, indices: Sequence[int] | None, mask: Any) -> list[Plan[None]]:
        self._retry_replies = {}
        return [self.sessions[i].reset_plan(budget) for i in self.select(indices, mask)]


def _nothing() -> Plan[dict[int, Any]]:
    return {}
    yield  # a generator that yields nothing


def _for_entry(err: ActionError, index: int, session_id: str) -> ActionError:
    """`err` as the error of group entry `index` (the server's `entry` counts within one batch)."""
    metadata = {**err.metadata, "entry": str(index), "session_id": session_id}
    return ActionError(err.code, err.message, reason=err.reason, metadata=metadata, in_doubt=err.in_doubt)
