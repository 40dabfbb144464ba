"""Wiring and lifecycle: load models, start the gRPC server (with health and reflection), drain
gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mouse_client.v1 import action_service_pb2 as pb
from mouse_serve.auth import TokenAuth
from mouse_serve.config import ServerConfig, check_execution_device
from mouse_serve.memory import release_free_memory
from mouse_serve.metrics import Metrics
from mouse_serve.runner import ModelRunner, RunnerExecutor, resolve_device
from mouse_serve.scheduler import Scheduler
from mouse_serve.service import ActionService, add_to_server
from mouse_serve.sessions import ContextPolicy, SessionManager, UpdatePolicy
from mouse_serve.updates import ModelUpdater

log = logging.getLogger("mouse_serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ActionService"].full_name
EXPIRY_INTERVAL_S = 1.0
TRIM_INTERVAL_S = 30.0


def check_port_free(host: str, port: int) -> None:
    """OSError now, before any model loads, when `host:port` cannot be bound."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as gRPC binds: connections of a process that just died (TIME_WAIT) do not make the
        # port busy, a listening socket does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def load_runners(config: ServerConfig) -> dict[str, ModelRunner]:
    return {
        spec.name: ModelRunner.load(
            spec,
            device=config.device,
            dtype=config.dtype,
            max_sessions=config.max_sessions,
            max_context_steps=config.max_context_steps,
            prefill_chunk_steps=config.prefill_chunk_steps,
            threads=config.threads,
            decode_graphs=config.decode_graphs,
            compile=config.compile,
            compile_cache=config.compile_cache,
            autotune=config.autotune,
            autotune_cache=config.autotune_cache,
            execution=config.execution or None,
        )
        for spec in config.models
    }


class Server:
    """A running mouse-serve instance (models, sessions, schedulers, gRPC server)."""

    def __init__(self, config: ServerConfig, runners: dict[str, ModelRunner]) -> None:
        self.config = config
        self.runners = runners
        self.metrics = Metrics()
        # One runner thread for every model: forwards never overlap, so per-forward CPU thread
        # settings of one model cannot change another's mid-forward.
        self.executor = RunnerExecutor()
        self.schedulers = {}
        for name, runner in runners.items():
            self.metrics.model_loaded(runner)
            self.schedulers[name] = Scheduler(
                runner,
                max_batch_tokens=config.max_batch_tokens,
                max_batch_wait_s=config.max_batch_wait_ms / 1000.0,
                executor=self.executor,
                on_batch=self.metrics.observe_batch,
                on_queue=lambda length, name=name: self.metrics.queue_changed(name, length),
            )
        self.sessions = SessionManager(
            runners,
            self.schedulers,
            default_policy=ContextPolicy[config.context_policy.upper()],
            default_on_update=UpdatePolicy[config.on_update.upper()],
            idle_timeout_s=config.idle_timeout,
            max_sessions_per_owner=config.max_sessions_per_token,
            max_pending_per_session=config.max_pending_per_session,
            metrics=self.metrics,
        )
        self.auth = TokenAuth(config.token_file) if config.token_file else None
        self.admin = TokenAuth(config.admin_token_file) if config.admin_token_file else None
        self.service = ActionService(
            self.sessions,
            max_steps_per_request=config.max_steps_per_request,
            max_requests_per_stream=config.max_requests_per_stream,
            auth=self.auth,
            admin=self.admin,
            updater=ModelUpdater(runners, self.executor, self.metrics) if self.admin else None,
        )
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_streams_per_connection),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )
        self.port = 0
        self.metrics_port = 0
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert and self.config.tls_key:
            client_ca = self.config.tls_client_ca.read_bytes() if self.config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        for scheduler in self.schedulers.values():
            scheduler.start()
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._expiry = asyncio.create_task(self._expire_loop())
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        tls = (
            " (TLS, client certificates required)"
            if self.config.tls_client_ca
            else " (TLS)"
            if self.config.tls_cert
            else ""
        )
        log.info("listening on %s:%d%s", self.config.host, self.port, tls)
        return self.port

    async def _expire_loop(self) -> None:
        """Once a second: expire idle sessions, re-read the token file; now and then trim the heap."""
        trimmed = time.monotonic()
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            self.sessions.expire_idle()
            for auth in (self.auth, self.admin):
                if auth is not None:
                    auth.reload_if_changed()
            if time.monotonic() - trimmed > TRIM_INTERVAL_S:
                release_free_memory()
                trimmed = time.monotonic()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, then stop: health turns NOT_SERVING and new sessions are refused while the
        requests in flight complete (up to `grace_s`); then the server closes its calls."""
        grace = self.config.grace_period if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.service.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.wait_idle(), grace)
        await self.grpc.stop(max(deadline - time.monotonic(), 0.0))
        if self._expiry is not None:
            self._expiry.cancel()
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        self.executor.shutdown(wait=True)
        self.metrics.stop()
        log.info("stopped")


def prepare(config: ServerConfig) -> dict[str, ModelRunner]:
    """Everything before serving, in the calling thread (so Ctrl-C interrupts a long compile):
    check the ports and the pinned execution path against the device, then load the models."""
    check_port_free(config.host, config.port)
    if config.metrics_port:
        check_port_free(config.host, config.metrics_port)
    if config.execution:
        on_cuda = resolve_device(config.device).type == "cuda"
        check_execution_device(config.execution, config.device, on_cuda)
    return load_runners(config)


async def serve(config: ServerConfig, runners: dict[str, ModelRunner]) -> None:
    """Serve the loaded models until SIGTERM/SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before starting: a signal then still drains
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = Server(config, runners)
    await server.start()
    await stop.wait()
    log.info("shutting down (grace period %.1fs)", config.grace_period)
    await server.stop()
