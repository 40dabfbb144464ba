"""A real `mouse-serve` process for tests: started on a free loopback port, stopped after.

Importable without torch (the client's own tests run in a venv without it): the server runs
under `MOUSE_SERVE_PYTHON` (an interpreter that has the server installed) or this interpreter.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on ([\w.\-\[\]:]+):(\d+)")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """The samples of a `/metrics` endpoint on loopback, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families  # not in the client venv

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v
        for (n, lab), v in samples.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


def server_python() -> str:
    return os.environ.get("MOUSE_SERVE_PYTHON", sys.executable)


def default_args(args: Sequence[str]) -> list[str]:
    """Test servers run on the CPU in float32 (a GPU on the machine changes nothing) unless the
    test names `--device`/`--dtype`, or `MOUSE_TEST_DEVICE`/`MOUSE_TEST_DTYPE` ask for another
    (scripts/gpu_check.sh runs the golden end-to-end tests on CUDA that way). They skip the
    start-up measurement of execution paths (about 5 s per start on 2 cores) unless the test
    names `--autotune` or `--execution` (the golden server measures, as a production one does)."""
    out = []
    if "--device" not in args:
        out += ["--device", os.environ.get("MOUSE_TEST_DEVICE", "cpu")]
    if "--dtype" not in args:
        out += ["--dtype", os.environ.get("MOUSE_TEST_DTYPE", "float32")]
    if "--autotune" not in args and "--execution" not in args:
        out += ["--autotune", "off"]
    return out


class ServerProcess:
    """`python -m mouse_serve ARGS` with its log captured; `target` once it listens."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, port: int = 0, metrics: bool = False
    ) -> None:
        self.metrics_port = free_port() if metrics else 0
        if metrics:
            args = (*args, "--metrics-port", str(self.metrics_port))
        self.args = ["--host", "127.0.0.1", "--port", str(port), *default_args(args), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.port = 0
        self._listening = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> Samples:
        """Its metrics (started with `metrics=True`)."""
        assert self.metrics_port, "started without metrics=True"
        return scrape(self.metrics_port)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(2))
                self._listening.set()

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [server_python(), "-m", "mouse_serve", *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mouse-serve did not start ({' '.join(cmd)}):\n{self.log}")
        return self

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait until a log line matches `pattern`; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise TimeoutError(f"no log line matched {pattern!r}:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m mouse_serve ARGS` to completion (for argument errors)."""
    return subprocess.run(
        [server_python(), "-m", "mouse_serve", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
