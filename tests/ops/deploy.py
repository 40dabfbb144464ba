"""Helpers for the deployment tests: the repo's deploy/ files, tools, a real nginx, metrics."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tests.server_process import REPO, Samples, free_port

DEPLOY = REPO / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "mouse-serve.conf"
NGINX_INCLUDES = DEPLOY / "nginx" / "mouse-serve"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool the test setup installs (scripts/setup.sh, scripts/setup_test_tools.sh): in the venv
    (pip packages) or on the system."""
    for candidate in (BIN / name, shutil.which(name), Path("/usr/sbin") / name):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise AssertionError(
        f"{name} is not installed: run `bash scripts/setup.sh` and `bash scripts/setup_test_tools.sh`."
    )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# --- nginx ------------------------------------------------------------------------------------
MAIN_CONF = """\
# mouse-serve ops test: a foreground nginx on loopback running the repo's proxy configuration.
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {conf};
}}
"""

# One line of the repo's `mouse_grpc` access log format.
LOG_LINE = re.compile(
    r'"POST (?P<path>\S+) HTTP/2\.0" (?P<status>\d+) grpc_status=(?P<grpc_status>\S*) '
    r'session="(?P<session>[^"]*)" key="(?P<key>[^"]*)" upstream=(?P<upstream>\S+)'
)


class Nginx:
    """nginx in the foreground with a temporary prefix; the repo's deploy/nginx/mouse-serve.conf
    is included as it is, its includes (mouse-serve/*.conf) rendered for loopback replicas."""

    def __init__(self, upstreams: Sequence[str]) -> None:
        self.upstreams = list(upstreams)
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="mouse-nginx-"))
        self.tmp.chmod(0o755)  # workers run as an unprivileged user when started as root
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def render(self) -> Path:
        includes = self.tmp / "mouse-serve"
        includes.mkdir()
        # the repo's listen directive (with its HTTP/2 flag), on a free loopback port
        listen = (NGINX_INCLUDES / "listen.conf").read_text()
        listen, n = re.subn(r"(?m)^(\s*listen\s+)\d+\b", rf"\g<1>127.0.0.1:{self.port}", listen)
        assert n == 1, "deploy/nginx/mouse-serve/listen.conf must hold one `listen PORT ...;`"
        (includes / "listen.conf").write_text(listen)
        (includes / "upstreams.conf").write_text("".join(f"server {u};\n" for u in self.upstreams))
        main = self.tmp / "nginx.conf"
        main.write_text(MAIN_CONF.format(tmp=self.tmp, conf=NGINX_CONF))
        return main

    def command(self, *extra: str) -> list[str]:
        conf = self.tmp / "nginx.conf"
        return [
            tool("nginx"),
            "-p",
            f"{self.tmp}/",
            "-c",
            str(conf),
            "-e",
            str(self.tmp / "error.log"),
            *extra,
        ]

    def start(self) -> Nginx:
        try:
            self.render()
            check = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
            with open(self.tmp / "access.log", "ab") as out:
                self.proc = subprocess.Popen(
                    self.command("-g", "daemon off;"),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() ends master and workers
                )
            try:
                wait_for_port(self.port, self.proc)
            except Exception as exc:
                raise RuntimeError(f"nginx did not start ({exc}):\n{self.error_log}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[dict[str, str]]:
        text = (self.tmp / "access.log").read_text(errors="replace")
        return [m.groupdict() for m in map(LOG_LINE.search, text.splitlines()) if m]

    def calls_to(self, method: str, start: int, expected: int, timeout: float = 5.0) -> list[dict[str, str]]:
        """Access-log lines of `method` from line `start` on, waiting until `expected` were logged:
        nginx writes a call's line after its reply, so the line can come after the client returned
        (and an earlier test's line after `start`)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log()[start:] if line["path"].endswith(f"/{method}")]
            if len(lines) >= expected or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def calls_by_session(self, sessions: Sequence[str], expected_calls: int, timeout: float = 5.0) -> dict:
        """Access-log lines of these sessions, waiting until `expected_calls` were logged."""
        wanted = set(sessions)
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log() if line["session"] in wanted]
            if len(lines) >= expected_calls or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        out: dict[str, list[dict[str, str]]] = defaultdict(list)
        for line in lines:
            out[line["session"]].append(line)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            else:
                # the master is gone: make sure no worker of this group is left
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- metrics ----------------------------------------------------------------------------------
def requests_not_ok(samples: Samples) -> float:
    return sum(
        v for (n, lab), v in samples.items() if n == "mouse_requests_total" and dict(lab).get("code") != "OK"
    )
