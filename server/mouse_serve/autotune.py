"""Start-up measurement: the fastest execution path per batch shape, timed on this machine.

Which way of running a forward is fastest depends on the machine, not only on the model: on one
2-core VM oneDNN-packed linears beat plain ones at 64 sessions and lose at 1, and one thread beats
two at small batches on one CPU and not on another. So nothing here is a tuned constant: when a
model loads, `measure` times every candidate path (`ExecutionPath`: packed or plain linears,
thread counts, the compiled dense blocks when enabled; on CUDA the captured decode graphs or
eager) on decode steps of the shapes the server will run (batch rows x context length buckets),
interleaved round-robin so a drift of the machine's speed hits every candidate alike, and keeps
the fastest per shape. `ExecutionTable.lookup` then picks the path for each batch in O(1).

The result can be cached in a JSON file keyed by everything that affects it (model, dtype,
device, torch, CPU, threads, buckets), so a restart on the same machine skips the measurement.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROW_BUCKET_BASE = 4  # batch-row buckets: 1, 4, 16, 64, ... up to the pool's sessions
CONTEXT_BUCKETS = (32, 256)  # context-length buckets (steps), capped at the context limit
# Shapes beyond this many rows x context steps are measured at the shortest context only (their
# steps take long to time; the longer context takes the choice of the same rows there).
MAX_SHAPE_STEPS = 64 * 256
MIN_ROUNDS, MAX_ROUNDS = 3, 15
PRUNE_FACTOR = 2.0  # after one round, candidates this much slower than the fastest stop
BUCKET_BUDGET_S = 0.6  # measuring stops adding rounds for a shape after this long


@dataclass(frozen=True, order=True)
class ExecutionPath:
    """One way to run a forward. CPU: `packed` oneDNN linears or plain ones, `threads` torch
    threads, `compiled` dense blocks; CUDA: `graphs` (captured fixed-shape decode) or eager."""

    packed: bool = False
    threads: int = 1
    compiled: bool = False
    graphs: bool = False
    cuda: bool = False

    def __str__(self) -> str:
        if self.cuda:
            return "graphs" if self.graphs else "eager"
        parts = ["packed" if self.packed else "plain", f"threads={self.threads}"]
        if self.compiled:
            parts.append("compiled")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str, *, cuda: bool = False) -> ExecutionPath:
        """The inverse of `str()`: `packed,threads=2`, `plain,threads=1,compiled`, `graphs`, `eager`."""
        words = [w.strip() for w in text.split(",") if w.strip()]
        if cuda:
            if words not in (["graphs"], ["eager"]):
                raise ValueError(f"execution path {text!r}: on CUDA expected 'graphs' or 'eager'.")
            return cls(graphs=words == ["graphs"], cuda=True)
        path: dict[str, Any] = {}
        for word in words:
            if word in ("packed", "plain") and "packed" not in path:
                path["packed"] = word == "packed"
            elif word == "compiled" and "compiled" not in path:
                path["compiled"] = True
            elif (
                word.startswith("threads=")
                and "threads" not in path
                and word[8:].isdecimal()
                and int(word[8:]) > 0
            ):
                path["threads"] = int(word[8:])
            else:
                raise ValueError(
                    f"execution path {text!r}: expected packed|plain, threads=N and optionally "
                    "compiled, e.g. 'packed,threads=2'."
                )
        if "packed" not in path or "threads" not in path:
            raise ValueError(f"execution path {text!r}: name the linears (packed|plain) and threads=N.")
        return cls(**path)


@dataclass
class ExecutionChoice:
    """The path chosen for one shape and what every candidate measured (ms per step)."""

    rows: int
    context_steps: int
    path: ExecutionPath
    step_ms: float
    candidates: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        others = ", ".join(
            f"{p} {ms:.2f} ms" for p, ms in sorted(self.candidates.items(), key=lambda x: x[1])
        )
        return (
            f"rows={self.rows} context={self.context_steps} steps: {self.path} "
            f"{self.step_ms:.2f} ms/step (measured: {others})"
        )


class ExecutionTable:
    """Execution paths by shape: a batch takes the choice of the nearest row bucket (log scale)
    and the smallest context bucket that covers it (the largest beyond)."""

    def __init__(self, choices: Sequence[ExecutionChoice], default: ExecutionPath) -> None:
        self.choices = list(choices)
        self.default = default
        self._rows = sorted({c.rows for c in choices})
        self._contexts: dict[int, list[int]] = {}  # rows -> measured contexts, ascending
        self._paths = {(c.rows, c.context_steps): c.path for c in choices}
        for c in sorted(choices, key=lambda c: c.context_steps):
            self._contexts.setdefault(c.rows, []).append(c.context_steps)

    @property
    def paths(self) -> set[ExecutionPath]:
        return set(self._paths.values()) | {self.default}

    def lookup(self, rows: int, context_steps: int) -> ExecutionPath:
        if not self._paths:
            return self.default
        i = bisect.bisect_left(self._rows, rows)
        if i == len(self._rows) or (i > 0 and rows * rows < self._rows[i - 1] * self._rows[i]):
            i -= 1  # nearer (geometrically) to the bucket below
        contexts = self._contexts[self._rows[i]]
        j = min(bisect.bisect_left(contexts, context_steps), len(contexts) - 1)
        return self._paths[(self._rows[i], contexts[j])]


def row_buckets(max_rows: int) -> list[int]:
    """1, 4, 16, ... up to `max_rows`, plus `max_rows` itself when it is well above the last."""
    out, rows = [], 1
    while rows <= max_rows:
        out.append(rows)
        rows *= ROW_BUCKET_BASE
    if max_rows > 2 * out[-1]:
        out.append(max_rows)
    return out


def context_buckets(max_context_steps: int) -> list[int]:
    return sorted({min(c, max_context_steps) for c in CONTEXT_BUCKETS})


def thread_counts(max_threads: int) -> list[int]:
    """1, 2, 4, ... and `max_threads`."""
    out, n = [], 1
    while n < max_threads:
        out.append(n)
        n *= 2
    return [*out, max_threads]


def measure(
    shapes: Sequence[tuple[int, int]],
    candidates: Sequence[ExecutionPath],
    probe: Callable[[int, int], tuple[Callable[[ExecutionPath], None], Callable[[], None]]],
    budget_s: float = BUCKET_BUDGET_S,
) -> list[ExecutionChoice]:
    """Time every candidate on every shape `(rows, context_steps)`.

    `probe(rows, context)` prepares that shape and returns `(step, done)`: `step(path)` runs one
    decode step of the whole batch on `path` (synchronised), `done()` releases the shape.
    After one warm-up step each, candidates run round-robin (rotating the order every round);
    after the first round those slower than `PRUNE_FACTOR` x the fastest drop out. The figure
    is each candidate's median.
    """
    choices = []
    for rows, context in shapes:
        step, done = probe(rows, context)
        times: dict[ExecutionPath, list[float]] = {c: [] for c in candidates}
        try:
            for path in candidates:
                step(path)  # warm-up: kernels, primitives, graphs, compiled code
            live = list(candidates)
            started = time.perf_counter()
            rounds = 0
            while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - started < budget_s):
                shift = rounds % len(live)
                for path in live[shift:] + live[:shift]:
                    t0 = time.perf_counter()
                    step(path)
                    times[path].append(time.perf_counter() - t0)
                rounds += 1
                if rounds == 1:
                    fastest = min(times[p][0] for p in live)
                    live = [p for p in live if times[p][0] <= PRUNE_FACTOR * fastest]
        finally:
            done()
        ms = {path: 1e3 * statistics.median(ts) for path, ts in times.items()}
        best = min(live, key=lambda p: (ms[p], p))
        choices.append(ExecutionChoice(rows, context, best, ms[best], {str(p): v for p, v in ms.items()}))
    return choices


# -- the on-disk cache ------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_key() -> dict[str, Any]:
    """What about this machine changes the measurement: CPU model, cores, torch build."""
    import torch

    key: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        key["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return key


def cache_key(**parts: Any) -> str:
    text = json.dumps({**parts, "machine": machine_key()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_cached(path: Path, key: str) -> list[ExecutionChoice] | None:
    """The cached choices for `key`, or None (missing file, other key, unreadable, or an entry
    that is not what `store_cached` writes)."""
    try:
        entry = json.loads(path.read_text()).get(key)
        choices = [_choice(c) for c in entry["choices"]]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return choices or None


def _choice(c: dict[str, Any]) -> ExecutionChoice:
    """One cached choice, its types and ranges checked (ValueError otherwise)."""
    p = c["path"]
    flags = [p.get(k, False) for k in ("packed", "compiled", "graphs", "cuda")]
    counts = [c["rows"], c["context_steps"], p.get("threads", 1)]
    times = [c["step_ms"], *c["candidates"].values()]
    if not (
        all(type(f) is bool for f in flags)
        and all(type(n) is int and n > 0 for n in counts)
        and all(type(t) in (int, float) and math.isfinite(t) and t >= 0 for t in times)
        and set(p) <= {"packed", "threads", "compiled", "graphs", "cuda"}
    ):
        raise ValueError(f"not a cached execution choice: {c!r}")
    return ExecutionChoice(c["rows"], c["context_steps"], ExecutionPath(**p), c["step_ms"], c["candidates"])


def store_cached(path: Path, key: str, choices: Sequence[ExecutionChoice], note: dict[str, Any]) -> None:
    """Add `choices` under `key` to the JSON cache file (other keys are kept). A cache that
    cannot be written is a warning, not an error (the server serves the measured choices), and
    each writer renames its own temporary file, so servers sharing the file never see half of
    one (when two write at once, the last one's keys win)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {**note, "choices": [asdict(c) for c in choices]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("cannot write the execution cache %s (%s); serving without storing it", path, exc)
