"""Server settings: command-line flags, each also settable by a `MOUSE_SERVE_*` variable."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "MOUSE_SERVE_"
DEFAULT_MODEL_NAME = "default"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to host: its name and where to load it from (folder or Hub repo id)."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`PATH_OR_REPO` (named "default") or `NAME=PATH_OR_REPO`."""
        name, sep, source = text.partition("=")
        if not sep:
            name, source = DEFAULT_MODEL_NAME, text
        if not source:
            raise ValueError(f"--model {text!r}: expected PATH_OR_REPO or NAME=PATH_OR_REPO.")
        if not _MODEL_NAME.match(name):
            raise ValueError(f"--model {text!r}: model name {name!r} must match {_MODEL_NAME.pattern}.")
        return cls(name, source)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "auto"
    max_sessions: int = 64
    max_context_steps: int = 0  # 0: the model's own limit
    idle_timeout_s: float = 600.0
    context_policy: str = "sliding"
    max_batch_tokens: int = 8192
    max_batch_wait_s: float = 0.010
    threads: int = 0  # 0: all cores
    decode_graphs: str = "auto"
    prefill_chunk_steps: int = 256
    max_steps_per_request: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    max_sessions_per_token: int = 0  # 0: unlimited
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    grace_period_s: float = 10.0
    log_level: str = "info"


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mouse-serve",
        description="Serve MOUSE model actions over gRPC (mouse.action.v1.ActionService). "
        f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> "
        f"(e.g. {ENV_PREFIX}MAX_SESSIONS=128); flags win over variables.",
    )

    def add(flag: str, typ: type, default: object, help: str, **kw: object) -> None:
        env = _env(flag)
        value = typ(env) if env is not None else default
        var = ENV_PREFIX + flag.upper().replace("-", "_")
        p.add_argument(
            f"--{flag}", type=typ, default=value, help=f"{help} [{var}; default: %(default)s]", **kw
        )

    env_models = _env("model")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[NAME=]PATH_OR_REPO",
        help="checkpoint folder or Hugging Face Hub repo id; NAME=... hosts several models "
        f"(a bare one is named '{DEFAULT_MODEL_NAME}'); repeatable "
        f"[{ENV_PREFIX}MODEL, comma-separated]",
    )
    p.set_defaults(env_models=env_models)
    add("host", str, "127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    add("port", int, 50051, "port to listen on (0 picks a free one)")
    add("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    add(
        "dtype",
        str,
        "auto",
        "decoder dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16",
    )
    add(
        "threads",
        int,
        0,
        "torch threads for large CPU forwards (small ones run on one thread); 0 = all cores",
    )
    add(
        "decode-graphs",
        str,
        "auto",
        "fixed-shape decode steps captured in CUDA graphs: auto (on with CUDA), on, off; "
        "'on' without CUDA runs the same fixed shapes eagerly",
        choices=["auto", "on", "off"],
    )
    add("max-sessions", int, 64, "sessions (KV-cache slots) per model, preallocated")
    add("max-context-steps", int, 0, "steps of history per session; 0 = the model's own limit")
    add("idle-timeout", float, 600.0, "seconds after which an idle session expires")
    add(
        "context-policy",
        str,
        "sliding",
        "default when a session reaches its context limit: sliding, reset or reject",
        choices=["sliding", "reset", "reject"],
    )
    add("max-batch-tokens", int, 8192, "padded tokens per batched forward (bounds memory)")
    add(
        "max-batch-wait-ms",
        float,
        10.0,
        "longest wait before a forward for sessions whose next step is due (from their usual "
        "turnaround; at most half a typical forward); 0 = never wait",
    )
    add("prefill-chunk-steps", int, 256, "long prefills run in chunks of this many steps")
    add("max-steps-per-request", int, 4096, "most steps one GetAction may carry")
    add("max-message-bytes", int, 16 * 1024 * 1024, "largest request message accepted")
    add("max-sessions-per-token", int, 0, "open sessions per auth token; 0 = unlimited")
    add("token-file", Path, None, "file of bearer tokens, one per line (reloaded when it changes)")
    add("tls-cert", Path, None, "PEM certificate chain; enables TLS with --tls-key")
    add("tls-key", Path, None, "PEM private key of --tls-cert")
    add("tls-client-ca", Path, None, "PEM CA bundle; when set, clients must present a certificate it signed")
    add("metrics-port", int, 0, "serve Prometheus metrics on this port; 0 = off")
    add("grace-period", float, 10.0, "seconds in-flight requests get to finish on SIGTERM/SIGINT")
    add("log-level", str, "info", "debug, info, warning or error")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse flags (falling back to environment variables) into a `ServerConfig`."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    raw_models = ns.model or [m.strip() for m in (ns.env_models or "").split(",") if m.strip()]
    if not raw_models:
        parser.error(f"at least one --model is required (or {ENV_PREFIX}MODEL)")
    try:
        models = tuple(ModelSpec.parse(m) for m in raw_models)
    except ValueError as exc:
        parser.error(str(exc))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        parser.error(f"model names must be unique, got {names}")
    positive = {
        "max_sessions": ns.max_sessions,
        "max_batch_tokens": ns.max_batch_tokens,
        "prefill_chunk_steps": ns.prefill_chunk_steps,
        "max_steps_per_request": ns.max_steps_per_request,
        "max_message_bytes": ns.max_message_bytes,
    }
    for name, value in positive.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if ns.max_context_steps < 0 or ns.max_sessions_per_token < 0 or ns.metrics_port < 0:
        parser.error("--max-context-steps, --max-sessions-per-token and --metrics-port must be >= 0")
    if ns.threads < 0:
        parser.error(f"--threads must be >= 0, got {ns.threads}")
    if ns.max_batch_wait_ms < 0:
        parser.error(f"--max-batch-wait-ms must be >= 0, got {ns.max_batch_wait_ms}")
    if ns.idle_timeout <= 0 or ns.grace_period < 0:
        parser.error("--idle-timeout must be > 0 and --grace-period >= 0")
    if (ns.tls_cert is None) != (ns.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if ns.tls_client_ca is not None and ns.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert/--tls-key")
    if ns.dtype not in ("auto", "float32", "bfloat16", "float16"):
        parser.error(f"--dtype must be auto, float32, bfloat16 or float16, got {ns.dtype!r}")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", ns.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {ns.device!r}")
    if ns.log_level not in ("debug", "info", "warning", "error"):
        parser.error(f"--log-level must be debug, info, warning or error, got {ns.log_level!r}")
    return ServerConfig(
        models=models,
        host=ns.host,
        port=ns.port,
        device=ns.device,
        dtype=ns.dtype,
        max_sessions=ns.max_sessions,
        max_context_steps=ns.max_context_steps,
        idle_timeout_s=ns.idle_timeout,
        context_policy=ns.context_policy,
        max_batch_tokens=ns.max_batch_tokens,
        max_batch_wait_s=ns.max_batch_wait_ms / 1000.0,
        threads=ns.threads,
        decode_graphs=ns.decode_graphs,
        prefill_chunk_steps=ns.prefill_chunk_steps,
        max_steps_per_request=ns.max_steps_per_request,
        max_message_bytes=ns.max_message_bytes,
        max_sessions_per_token=ns.max_sessions_per_token,
        token_file=ns.token_file,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        metrics_port=ns.metrics_port,
        grace_period_s=ns.grace_period,
        log_level=ns.log_level,
    )
