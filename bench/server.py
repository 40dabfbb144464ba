"""A real `mouse-serve` process for the bench: started on a free loopback port, always stopped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

METRICS = re.compile(r"metrics on http://([\w.\-\[\]:]+):(\d+)")
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\w.]+)$")
LISTENING = re.compile(r"listening on ([\w.\-\[\]:]+):(\d+)")
POOL = re.compile(r"\(([\d.]+) MiB KV pool\)")
REPO = Path(__file__).resolve().parents[1]


class BenchServer:
    def __init__(
        self,
        python: str,
        checkpoint: Path,
        *,
        device: str,
        dtype: str,
        max_sessions: int,
        max_context_steps: int,
        threads: int,
        log_path: Path,
        extra_args: list[str] | None = None,
        cwd: Path = REPO,
        metrics: bool = True,
    ) -> None:
        self.cwd = cwd
        self.metrics_port = 0
        if metrics:  # a free port for --metrics-port (0 there means "off")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                metrics_args = ["--metrics-port", str(sock.getsockname()[1])]
        else:
            metrics_args = []
        self.cmd = [
            python,
            *("-m", "mouse_serve", "--model", str(checkpoint)),
            *("--host", "127.0.0.1", "--port", "0"),
            *("--device", device, "--dtype", dtype),
            *("--max-sessions", str(max_sessions)),
            *("--max-context-steps", str(max_context_steps)),
            *("--idle-timeout", "3600"),
            *metrics_args,
            *(extra_args or []),
        ]
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.pool_mib: float | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                self.lines.append(line)
                if not self.metrics_port and (m := METRICS.search(line)):
                    self.metrics_port = int(m.group(2))
                if self.pool_mib is None and (m := POOL.search(line)):
                    self.pool_mib = float(m.group(1))
                if not self._listening.is_set() and (m := LISTENING.search(line)):
                    self.port = int(m.group(2))
                    self._listening.set()

    def start(self, timeout: float = 180.0) -> BenchServer:
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(self.cmd)}  (OMP_NUM_THREADS={self.env['OMP_NUM_THREADS']})\n")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mouse-serve did not start: {' '.join(self.cmd)}\n{''.join(self.lines)}")
        return self

    def scrape(self) -> dict[str, float]:
        """The server's Prometheus metrics, summed over labels (`name`) and per series
        (`name{labels}`); {} when it serves none."""
        if not self.metrics_port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not (m := SAMPLE.match(line.strip())):
                continue
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            out[m.group(1)] = out.get(m.group(1), 0.0) + value
            if m.group(2):  # also each labelled series, e.g. name{stage="forward"}
                out[m.group(1) + m.group(2)] = value
        return out

    def restart(self) -> BenchServer:
        """A new server process with the same arguments: no sessions left over from a failed run."""
        self.stop()
        self._listening.clear()
        self.port = 0
        return self.start()

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever is left in its group
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
