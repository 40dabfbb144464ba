"""The history protocol and the step data every measurement feeds (numpy only: it is imported
by the gRPC workers, the in-process floor and the reference script in its own venv).

Each session starts empty, runs `warmup` steps, then `measure` steps that are timed; one step is
one new step record per session and one action back. A session's records are a pure function of
(seed, session index, step index): `time` is the step index modulo the time table, `done` is 0,
`reward` and `obs_continuous` are Gaussian draws; `action` is the action the model returned for
the previous step (0 for the first). Every consumer (server sessions, floor, reference) therefore
sees the same inputs and the same history growth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Feed:
    obs_dim: int
    max_time: int
    num_actions: int
    seed: int = 0

    def columns(self, session: int, steps: int, start: int = 0) -> dict[str, np.ndarray]:
        """Steps `start .. start+steps-1` of one session as columns (action filled with 0)."""
        rng = np.random.default_rng([self.seed, session])
        # Draw the whole prefix so that a slice never depends on where it starts.
        reward = rng.standard_normal(start + steps).astype(np.float32)[start:]
        obs = rng.standard_normal((start + steps, self.obs_dim)).astype(np.float32)[start:]
        idx = np.arange(start, start + steps)
        return {
            "time": (idx % self.max_time).astype(np.int64),
            "action": np.zeros(steps, dtype=np.int64),
            "obs_continuous": obs,
            "reward": reward,
            "done": np.zeros(steps, dtype=np.int64),
        }

    def batch(self, sessions: int, steps: int, start: int = 0) -> dict[str, np.ndarray]:
        """Columns for `sessions` sessions, `[sessions, steps, ...]`."""
        cols = [self.columns(i, steps, start) for i in range(sessions)]
        return {k: np.stack([c[k] for c in cols]) for k in cols[0]}


def records(columns: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-step records (plain Python values) of one session's columns, for the client SDK."""
    n = len(columns["time"])
    return [
        {
            "time": int(columns["time"][i]),
            "action": int(columns["action"][i]),
            "obs_continuous": columns["obs_continuous"][i],
            "reward": float(columns["reward"][i]),
            "done": int(columns["done"][i]),
        }
        for i in range(n)
    ]


def summarize(samples_s: list[float] | np.ndarray, actions_per_sample: int = 1) -> dict[str, Any]:
    """Median, p99, mean (ms) of per-step times in seconds, and the actions/s they imply."""
    a = np.asarray(samples_s, dtype=np.float64)
    if a.size == 0:
        return {"samples": 0}
    return {
        "samples": int(a.size),
        "median_ms": float(np.median(a) * 1e3),
        "p99_ms": float(np.percentile(a, 99) * 1e3),
        "mean_ms": float(a.mean() * 1e3),
        "min_ms": float(a.min() * 1e3),
        "max_ms": float(a.max() * 1e3),
        "actions_per_s": float(actions_per_sample * a.size / a.sum()),
    }


def summarize_histories(
    histories: list[int], times: list[list[float]], warmup: int, measure: int
) -> dict[str, dict[str, Any]]:
    """e: `summarize` of each history length's step times, keyed by the length, with the history
    the measured steps ran at."""
    out = {}
    for h, ts in zip(histories, times, strict=True):
        out[str(h)] = {**summarize(ts), "history_start": h + warmup, "history_end": h + warmup + measure}
    return out


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc), 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads; 0.0 where unavailable
    (it ended)."""
    import os

    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuWatch:
    """CPU time used on this machine by processes other than the bench's own.

    The bench's own: this process, its waited children (workers, floor, reference, stopped
    servers) and the live processes in `pids` (a running server). Other work on the machine
    distorts every figure, so each measurement reports how much there was.
    """

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        import os
        import time

        busy = 0.0
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal
            busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            pass
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system + sum(proc_cpu_s(p) for p in self.pids)
        return busy, own, time.monotonic()

    def report(self) -> dict:
        import os

        busy, own, wall = self._sample()
        d_busy, d_own, d_wall = busy - self.start[0], own - self.start[1], wall - self.start[2]
        foreign = max(d_busy - d_own, 0.0)
        cores = os.cpu_count() or 1
        return {
            "wall_s": d_wall,
            "cpu_busy_s": d_busy,
            "bench_cpu_s": d_own,
            "other_cpu_s": foreign,
            "other_cpu_share": foreign / (d_wall * cores) if d_wall > 0 else 0.0,
            "loadavg_end": list(os.getloadavg()),
        }
