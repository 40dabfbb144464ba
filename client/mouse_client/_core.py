"""I/O-free parts shared by the blocking and the asyncio client: options, channel set-up,
request building, the replay history and the retry schedule."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from mouse_client.errors import ActionError
from mouse_client.routing import SESSION_HEADER, HashRing, routing_key
from mouse_client.steps import StepRecords, as_record_list, encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc

POLICIES = {
    None: pb.CONTEXT_POLICY_UNSPECIFIED,
    "sliding": pb.CONTEXT_POLICY_SLIDING,
    "reset": pb.CONTEXT_POLICY_RESET,
    "reject": pb.CONTEXT_POLICY_REJECT,
}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed with a transient status, reusing the sequence number.

    Backoff grows from `initial_backoff_s` by `multiplier` up to `max_backoff_s` (with jitter);
    retrying stops after `max_attempts` tries or `timeout_s` seconds, whichever comes first.
    """

    max_attempts: int = 60
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    timeout_s: float = 60.0
    codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def backoff(self) -> Iterator[float]:
        """The sleeps between attempts, drawn lazily (only when a call failed)."""
        delay, total = self.initial_backoff_s, 0.0
        for _ in range(self.max_attempts - 1):
            pause = delay * random.uniform(0.5, 1.0)
            if total + pause > self.timeout_s:
                return
            yield pause
            total += pause
            delay = min(delay * self.multiplier, self.max_backoff_s)


@dataclass(frozen=True)
class SessionOptions:
    """What `open_session` asks for; kept so a lost session can be reopened the same way."""

    model: str = "default"
    seed: int | None = None
    temperature: float | None = None
    num_actions: int | None = None
    context_policy: str | None = None
    max_context_steps: int | None = None

    def request(self, session_id: str) -> pb.OpenSessionRequest:
        if self.context_policy not in POLICIES:
            raise ValueError(
                f"context_policy must be one of {[p for p in POLICIES if p]} or None, got {self.context_policy!r}."
            )
        req = pb.OpenSessionRequest(
            model=self.model, session_id=session_id, context_policy=POLICIES[self.context_policy]
        )
        if self.seed is not None:
            req.seed = self.seed
        if self.temperature is not None:
            req.temperature = self.temperature
        if self.num_actions is not None:
            req.num_actions = self.num_actions
        if self.max_context_steps is not None:
            req.max_context_steps = self.max_context_steps
        return req


@dataclass
class ChannelConfig:
    """How to reach the server(s): targets, auth token, TLS material, channel options."""

    targets: list[str]
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    options: list[tuple[str, Any]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        target: str | Sequence[str],
        *,
        token: str | None,
        tls: bool | None,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        max_message_bytes: int,
    ) -> ChannelConfig:
        targets = [target] if isinstance(target, str) else list(target)
        if not targets:
            raise ValueError("at least one target (host:port) is needed.")
        use_tls = bool(root_certificates or private_key or certificate_chain) if tls is None else tls
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        return cls(targets, token, use_tls, root_certificates, private_key, certificate_chain, options)

    def __post_init__(self) -> None:
        self.ring = HashRing(self.targets)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def metadata(self, session_id: str | None = None) -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if session_id:
            md.append((SESSION_HEADER, session_id))
        return tuple(md)

    def target_for(self, session_id: str) -> str:
        return self.ring.target(routing_key(session_id))


DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ClientBase:
    """Connection settings and per-target stubs, shared by the blocking and the asyncio client.

    `token` is sent as `authorization: Bearer <token>`; TLS is used when `tls=True` or any of
    `root_certificates`, `private_key`, `certificate_chain` (PEM bytes) is given. With several
    targets, sessions are sharded over them by consistent hashing of their routing key.
    """

    _secure_channel: Callable[..., Any]
    _insecure_channel: Callable[..., Any]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.config = ChannelConfig.build(
            target,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            max_message_bytes=max_message_bytes,
        )
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self._channels: dict[str, Any] = {}
        self._stubs: dict[str, pb_grpc.ActionServiceStub] = {}

    def stub(self, session_id: str | None = None) -> pb_grpc.ActionServiceStub:
        """The stub of the target that holds `session_id` (the first target when None)."""
        target = self.config.target_for(session_id) if session_id else self.config.targets[0]
        if target not in self._stubs:
            if self.config.tls:
                channel = self._secure_channel(target, self.config.credentials(), options=self.config.options)
            else:
                channel = self._insecure_channel(target, options=self.config.options)
            self._channels[target] = channel
            self._stubs[target] = pb_grpc.ActionServiceStub(channel)
        return self._stubs[target]


class StepHistory:
    """The session's most recent requests (bounded by steps), replayed after a lost session."""

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

    def merged_with(self, steps: pb.Steps) -> pb.Steps:
        """All kept steps followed by `steps`, as one prefill."""
        parts = [s for s, _ in self._parts] + [steps]
        out = pb.Steps()
        for desc in pb.Steps.DESCRIPTOR.fields:
            name = desc.name
            if name == "obs_image":
                out.obs_image = b"".join(p.obs_image for p in parts)
            else:
                columns = [np.asarray(getattr(p, name)) for p in parts if len(getattr(p, name))]
                if columns:
                    getattr(out, name).extend(np.concatenate(columns))
        return out


def count_steps(records: StepRecords) -> int:
    return len(as_record_list(records))


def action_request(
    session_id: str,
    seq: int,
    steps: pb.Steps,
    temperature: float | None,
    num_actions: int | None,
    return_scores: bool,
) -> pb.GetActionRequest:
    req = pb.GetActionRequest(session_id=session_id, seq=seq, steps=steps, return_scores=return_scores)
    if temperature is not None:
        req.temperature = temperature
    if num_actions is not None:
        req.num_actions = num_actions
    return req


def encode(records: StepRecords) -> tuple[pb.Steps, int]:
    return encode_steps(records), count_steps(records)


def raise_item_error(error: pb.RequestError) -> None:
    raise ActionError.from_number(error.code, error.message)


class SessionState:
    """Bookkeeping shared by `Session` and `AsyncSession`: id, sequence number, replay history."""

    def __init__(
        self,
        options: SessionOptions,
        opened: pb.OpenSessionResponse,
        *,
        recover: bool,
        history_steps: int | None,
    ) -> None:
        self.options = options
        self.recover = recover
        self.opened = opened
        self.id = opened.session_id
        self.seq = 0
        self.recoveries = 0
        self.history = StepHistory(opened.max_context_steps if history_steps is None else history_steps)

    @property
    def model(self) -> pb.ModelInfo:
        return self.opened.model

    def _applied(self, reply: pb.GetActionResponse, steps: pb.Steps, n: int) -> pb.GetActionResponse:
        self.seq = reply.seq
        self.history.add(steps, n)
        return reply

    def _can_recover(self, err: ActionError) -> bool:
        return self.recover and err.code is grpc.StatusCode.NOT_FOUND

    def _reopened(
        self, opened: pb.OpenSessionResponse, req: pb.GetActionRequest, steps: pb.Steps
    ) -> pb.GetActionRequest:
        """Adopt a reopened session; returns the replay request (kept history + `steps`)."""
        self.opened, self.id = opened, opened.session_id
        self.seq = 0
        self.recoveries += 1
        replay = pb.GetActionRequest()
        replay.CopyFrom(req)
        replay.session_id, replay.seq = self.id, 1
        replay.steps.CopyFrom(self.history.merged_with(steps))
        return replay
