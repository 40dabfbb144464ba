"""Server-side profiles: py-spy attached to the server process during one measurement, and a
summary of its collapsed stacks (top frames by own and by inclusive samples, per thread)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_py_spy(explicit: str | None) -> str | None:
    for candidate in (explicit, shutil.which("py-spy"), str(BENCH / ".cache" / "py-spy" / "bin" / "py-spy")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class PySpy:
    """`py-spy record` of a pid into a collapsed-stack file until `stop()`."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int = 400, native: bool = False) -> None:
        self.out = out
        cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        cmd += ["--output", str(out), "--threads", "--nonblocking"]
        if native:
            cmd.append("--native")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""


PROJECT = ("mouse_core/", "mouse_serve/", "mouse_client/")


def _short(frame: str) -> str:
    """`func (path:line)` -> `func (pkg/file.py[:line])`; line numbers kept for project files."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/server/", "/client/", "/lib/python3.11/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/" not in path and path.endswith(".py"):
        path = path.rsplit("/", 1)[-1]
    for pkg in PROJECT:
        if pkg in path:
            path = pkg + path.split(pkg, 1)[1]
            if m.group("line"):
                path += f":{m.group('line')}"
            break
    return f"{m.group('func')} ({path})"


def _project(frame: str) -> bool:
    return any(pkg in frame for pkg in PROJECT)


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames of a py-spy raw (collapsed) profile: own samples and inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        body = [_short(f) for f in frames if not f.startswith(("thread", "process"))]
        total += n
        threads[thread] += n
        if body:
            own[body[-1]] += n
            # inclusive: project functions (line numbers dropped), once per stack
            for f in {re.sub(r":\d+\)$", ")", f) for f in body if _project(f)}:
                incl[f] += n

    def pct(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / max(total, 1), 1)] for name, n in c.most_common(top)]

    return {
        "samples": total,
        "threads": [[t, round(100.0 * n / max(total, 1), 1)] for t, n in threads.most_common()],
        "own": pct(own),
        "inclusive_project": pct(incl),
    }
