"""Server settings, defined once: `ServerConfig`'s fields carry type, default, allowed values and
help, and from them come the command-line flags, the `MOUSE_SERVE_*` environment variables and
the README's settings table. A flag wins over its variable; both pass the same checks, and
every invalid value is a one-line error naming the flag or variable before any model loads.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "MOUSE_SERVE_"
DEFAULT_MODEL_NAME = "default"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CUDA_EXECUTION_PATHS = ("graphs", "eager")  # --execution values that run on CUDA
MAX_GRPC_MESSAGE = 2**31 - 1


class ConfigError(ValueError):
    """An invalid setting; the message names the flag or variable and what was expected."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to host: its name and where to load it from (folder or Hub repo id)."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`PATH_OR_REPO` (named "default") or `NAME=PATH_OR_REPO`.

        A source that is not an existing folder must look like a Hub repo id (`org/name`);
        anything else is a missing local path, not a Hub lookup.
        """
        name, sep, source = text.partition("=")
        if not sep:
            name, source = DEFAULT_MODEL_NAME, text
        if not source:
            raise ValueError(f"{text!r}: expected PATH_OR_REPO or NAME=PATH_OR_REPO.")
        if not MODEL_NAME.match(name):
            raise ValueError(f"{text!r}: model name {name!r} must match {MODEL_NAME.pattern}.")
        path = user_path(source)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{text!r}: {source} is a file; expected a checkpoint folder.")
        elif not HUB_REPO_ID.match(source):
            raise ValueError(
                f"{text!r}: there is no folder {source} (and it is not a Hub repo id like org/name)."
            )
        return cls(name, source)


@dataclass(frozen=True)
class Setting:
    """How one `ServerConfig` field is read, checked and documented."""

    help: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    metavar: str | None = None
    shown_default: str | None = None  # how the default reads in --help and the README


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def user_path(text: str) -> Path:
    """`text` with a leading `~` or `~user` expanded; as written when that user is unknown (a
    name like `~0` is then a relative path that does not exist, not an internal error)."""
    try:
        return Path(text).expanduser()
    except (RuntimeError, ValueError):  # unknown user; a NUL byte in the name
        return Path(text)


def _file(text: str) -> Path:
    path = user_path(text)
    if not path.is_file():
        raise ValueError(f"there is no file {text}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{text} is not readable")
    return path


def _writable_file(text: str) -> Path:
    path = user_path(text)
    if path.is_dir():
        raise ValueError(f"{text} is a folder; expected a file")
    if not path.parent.is_dir():
        raise ValueError(f"there is no folder {path.parent}")
    return path


def _writable_dir(text: str) -> Path:
    path = user_path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text} is a file; expected a folder")
    return path


def _execution_path(text: str) -> str:
    from mouse_serve.autotune import ExecutionPath  # torch-free

    try:
        ExecutionPath.parse(text, cuda=text.strip() in CUDA_EXECUTION_PATHS)
    except ValueError as exc:
        raise ValueError(str(exc).removesuffix(".")) from None
    return text.strip()


def _models(text: str) -> tuple[ModelSpec, ...]:
    return tuple(ModelSpec.parse(part.strip()) for part in text.split(",") if part.strip())


def setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = str,
    *,
    choices: Sequence[str] = (),
    low: float | None = None,
    high: float | None = None,
    metavar: str | None = None,
    shown_default: str | None = None,
) -> Any:
    spec = Setting(help, parse, tuple(choices), low, high, metavar, shown_default)
    return field(default=default, metadata={"setting": spec})


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of a server. Field `foo_bar` is flag `--foo-bar` and `MOUSE_SERVE_FOO_BAR`."""

    model: tuple[ModelSpec, ...] = setting(
        (),
        "checkpoint folder or Hugging Face Hub repo id (org/name) to serve; NAME=... names it "
        f"(a bare one is '{DEFAULT_MODEL_NAME}'); repeat the flag, or comma-separate the variable, "
        "for several models. Required",
        _models,
        metavar="[NAME=]PATH_OR_REPO",
        shown_default="(required)",
    )
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = setting(50051, "gRPC port (0 picks a free one)", _int, low=0, high=65535)
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    dtype: str = setting(
        "auto",
        "decoder dtype: auto (bfloat16 on cuda, float32 on cpu); embedder and heads stay float32",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    threads: int = setting(0, "torch threads for CPU forwards; 0 = all cores", _int, low=0)
    decode_graphs: str = setting(
        "auto",
        "fixed-shape decode steps captured in CUDA graphs: auto (on with CUDA), on, off; "
        "'on' without CUDA runs the same fixed shapes eagerly",
        choices=("auto", "on", "off"),
    )
    autotune: str = setting(
        "on",
        "measure the execution paths (packed or plain linears, thread counts, compiled blocks; "
        "CUDA graphs or eager) per batch shape when a model loads and use the fastest; off: all "
        "threads with packed linears (CPU), graphs (CUDA)",
        choices=("on", "off"),
    )
    autotune_cache: Path | None = setting(
        None,
        "JSON file that keeps the start-up measurement; a restart with the same model, machine "
        "and settings reads it instead of measuring again",
        _writable_file,
        metavar="PATH",
    )
    execution: str = setting(
        "",
        "one execution path for every batch shape instead of measuring, e.g. packed,threads=2 or "
        "plain,threads=1 (CPU; add ,compiled with --compile on), graphs or eager (CUDA)",
        _execution_path,
        metavar="PATH",
        shown_default="(measured)",
    )
    compile: str = setting(
        "off",
        "CPU: also measure each layer's dense blocks compiled by torch.compile (attention stays "
        "eager) and use them where faster; the first start compiles for a minute or more",
        choices=("off", "on"),
    )
    compile_cache: Path | None = setting(
        None,
        "folder for inductor's on-disk cache of --compile on, so a restart loads the compiled "
        "code instead of compiling again (default: inductor's, in the temp folder)",
        _writable_dir,
        metavar="DIR",
    )
    max_sessions: int = setting(
        64,
        "sessions per model = preallocated KV-cache slots; beyond it OpenSession is RESOURCE_EXHAUSTED",
        _int,
        low=1,
    )
    max_context_steps: int = setting(
        0,
        "steps of history a session keeps; 0 = the model's own limit "
        "(max_position_embeddings // tokens_per_step)",
        _int,
        low=0,
    )
    idle_timeout: float = setting(600.0, "seconds after which an idle session expires", _float, low=0.001)
    context_policy: str = setting(
        "sliding",
        "what a session does at its context limit: sliding (re-prefill the recent half), reset or reject",
        choices=("sliding", "reset", "reject"),
    )
    max_batch_tokens: int = setting(8192, "padded tokens per batched forward (bounds memory)", _int, low=1)
    max_batch_wait_ms: float = setting(
        50.0,
        "longest wait before a forward for sessions whose next step is due (from their usual "
        "turnaround; at most half a typical forward); 0 = never wait",
        _float,
        low=0,
    )
    prefill_chunk_steps: int = setting(
        256,
        "a long prefill advances by at most this many steps per batched forward, so other "
        "sessions' steps are not held up behind it",
        _int,
        low=1,
    )
    max_steps_per_request: int = setting(
        4096,
        "most steps one GetAction may carry (RESOURCE_EXHAUSTED beyond); clients send longer "
        "histories in several requests",
        _int,
        low=1,
    )
    max_message_bytes: int = setting(
        16 * 2**20,
        "largest request message accepted, in bytes (RESOURCE_EXHAUSTED beyond)",
        _int,
        low=1024,
        high=MAX_GRPC_MESSAGE,
        shown_default="16777216 (16 MiB)",
    )
    max_pending_per_session: int = setting(
        4,
        "unary requests (GetAction, BatchGetAction entries) of one session that may wait behind "
        "the one being applied; more are RESOURCE_EXHAUSTED (a stream is bounded by "
        "--max-requests-per-stream instead)",
        _int,
        low=1,
    )
    max_requests_per_stream: int = setting(
        16,
        "requests of one StreamActions call in flight (received, not yet answered and written); "
        "the server stops reading the stream until one is answered",
        _int,
        low=1,
    )
    max_streams_per_connection: int = setting(
        256, "concurrent calls per HTTP/2 connection (MAX_CONCURRENT_STREAMS)", _int, low=1
    )
    max_sessions_per_token: int = setting(0, "open sessions per auth token; 0 = unlimited", _int, low=0)
    on_update: str = setting(
        "refill",
        "what a session's cache does when its model's weights are updated (sessions may choose "
        "at OpenSession): refill (re-prefill the kept history with the new weights on the next "
        "step), keep (extend the old cache), reset (start the context over)",
        choices=("refill", "keep", "reset"),
    )
    admin_token_file: Path | None = setting(
        None,
        "bearer tokens allowed to update weights (UpdateModel, PushWeights), one per line; "
        "updates are off without it",
        _file,
        metavar="PATH",
    )
    token_file: Path | None = setting(
        None,
        "bearer tokens, one per line (# comments); enables authentication; re-read within a "
        "second when the file changes (a deleted file refuses every token)",
        _file,
        metavar="PATH",
    )
    tls_cert: Path | None = setting(
        None, "PEM certificate chain; enables TLS with --tls-key", _file, metavar="PATH"
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert", _file, metavar="PATH")
    tls_client_ca: Path | None = setting(
        None, "PEM CA bundle; clients must then present a certificate it signed", _file, metavar="PATH"
    )
    metrics_port: int = setting(
        0, "serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off", _int, low=0, high=65535
    )
    grace_period: float = setting(
        10.0,
        "on SIGTERM/SIGINT: seconds the requests in flight get to complete (health answers "
        "NOT_SERVING meanwhile) before the process exits",
        _float,
        low=0,
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return self.model


def settings() -> list[tuple[str, Setting, Any]]:
    """(field name, setting, default) of every setting, in declaration order."""
    out = []
    for f in fields(ServerConfig):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, f.metadata["setting"], default))
    return out


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _shown_default(spec: Setting, default: Any) -> str:
    if spec.shown_default is not None:
        return spec.shown_default
    return "unset" if default is None else str(default)


def _check(name: str, spec: Setting, raw: str) -> Any:
    """Parse and check one raw value (from a flag or a variable); ValueError says why not."""
    if spec.choices:
        if raw not in spec.choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(spec.choices)}")
        return raw
    try:
        value = spec.parse(raw)
    except OSError as exc:  # a path the file system refuses to look up (a name too long, ...)
        raise ValueError(f"{raw!r}: {exc.strerror or exc}") from None
    if spec.low is not None and value < spec.low:
        raise ValueError(f"{raw} is below the minimum {_number(spec.low)}")
    if spec.high is not None and value > spec.high:
        raise ValueError(f"{raw} is above the maximum {_number(spec.high)}")
    return value


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _version() -> str:
    try:
        return metadata.version("mouse-serve")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mouse-serve",
        usage="mouse-serve --model [NAME=]PATH_OR_REPO [--model ...] [options]",
        description="Serve MOUSE model actions over gRPC (mouse.action.v1.ActionService). "
        f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> "
        f"(e.g. {ENV_PREFIX}MAX_SESSIONS=128); a flag wins over its variable.",
    )
    parser.add_argument("--version", action="version", version=f"mouse-serve {_version()}")
    for name, spec, default in settings():
        extra = f"one of {', '.join(spec.choices)}; " if spec.choices else ""
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            action="append" if name == "model" else "store",
            metavar=spec.metavar
            or (name.upper() if not spec.choices else "{" + ",".join(spec.choices) + "}"),
            help=f"{spec.help} [{extra}{env_name(name)}; default: {_shown_default(spec, default)}]",
        )
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(f"mouse-serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags, then `MOUSE_SERVE_*` variables, then defaults, into a checked `ServerConfig`.

    Exits with status 2 and a one-line error naming the flag or variable on any invalid value.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, spec, default in settings():
        given = getattr(ns, name)
        if given is not None:
            source, raws = flag_name(name), given if isinstance(given, list) else [given]
        elif env_name(name) in env and env[env_name(name)].strip():
            source, raws = env_name(name), [env[env_name(name)]]
        else:
            values[name] = default
            continue
        try:
            parsed = [_check(name, spec, raw) for raw in raws]
        except ValueError as exc:
            _fail(parser, f"{source}: {str(exc).rstrip('.')}.")
        values[name] = tuple(m for part in parsed for m in part) if name == "model" else parsed[-1]
    try:
        config = ServerConfig(**values)
        _check_together(config)
    except ConfigError as exc:
        _fail(parser, str(exc))
    return config


def _check_together(c: ServerConfig) -> None:
    """Checks across settings (each setting alone was checked already)."""
    if not c.model:
        raise ConfigError(f"--model is required (or {env_name('model')}).")
    names = [m.name for m in c.model]
    if len(set(names)) != len(names):
        raise ConfigError(f"--model: model names must be unique, got {names}.")
    if not DEVICE.match(c.device):
        raise ConfigError(f"--device: {c.device!r} is not one of auto, cpu, cuda, cuda:N.")
    if (c.tls_cert is None) != (c.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together.")
    if c.tls_client_ca is not None and c.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key.")
    if c.execution:
        _check_execution(c)
    if c.metrics_port and c.metrics_port == c.port:
        raise ConfigError(f"--metrics-port {c.metrics_port} is the gRPC port too; pick another.")


def check_execution_device(execution: str, device: str, on_cuda: bool) -> None:
    """A pinned CUDA path (graphs, eager) needs a CUDA device, a CPU path the CPU. `on_cuda`:
    whether `device` is (`auto`: resolved to) a CUDA device. ConfigError otherwise."""
    cuda_path = execution in CUDA_EXECUTION_PATHS
    if cuda_path and not on_cuda:
        found = "found no CUDA device" if device == "auto" else "is not a CUDA device"
        raise ConfigError(
            f"--execution {execution} is a CUDA path, but --device {device} {found}; "
            "pin a CPU path such as packed,threads=2."
        )
    if on_cuda and not cuda_path:
        chose = "chose CUDA" if device == "auto" else "is a CUDA device"
        raise ConfigError(
            f"--execution {execution} is a CPU path, but --device {device} {chose}; pin graphs or eager."
        )


def _check_execution(c: ServerConfig) -> None:
    """A pinned path must fit the device, the thread limit and --compile (torch-free checks;
    `--device auto` is checked once it is resolved, before the models load)."""
    from mouse_serve.autotune import ExecutionPath

    assert c.execution is not None
    if c.device != "auto":
        check_execution_device(c.execution, c.device, c.device.startswith("cuda"))
    if c.execution in CUDA_EXECUTION_PATHS:
        return
    path = ExecutionPath.parse(c.execution)
    if c.threads and path.threads > c.threads:
        raise ConfigError(f"--execution {c.execution}: more threads than --threads {c.threads}.")
    cores = os.cpu_count() or 1
    if not c.threads and path.threads > cores:
        raise ConfigError(f"--execution {c.execution}: more threads than this machine's {cores} cores.")
    if path.compiled and c.compile != "on":
        raise ConfigError(f"--execution {c.execution} needs --compile on.")
    if not path.compiled and c.compile == "on":
        raise ConfigError(
            f"--compile on has no effect with --execution {c.execution}: add ,compiled or leave --compile off."
        )


def markdown_table() -> str:
    """The README's settings table, generated from `ServerConfig`."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for name, spec, default in settings():
        meaning = spec.help + (f" ({', '.join(spec.choices)})" if spec.choices else "")
        rows.append(
            f"| `{flag_name(name)}` | `{env_name(name)}` | {_shown_default(spec, default)} | {meaning} |"
        )
    return "\n".join(rows) + "\n"
