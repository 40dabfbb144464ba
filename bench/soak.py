"""Soak: many sessions for a set time against one server; reports errors and memory growth.

    .venv/bin/python bench/soak.py --seconds 600 --sessions 64

Four kinds of worker process share the sessions: batched (SessionGroup), streaming, unary
threads, and a batched worker that closes and reopens its sessions every `--churn-steps` steps.
Sessions run past their context limit, so sliding re-prefills happen throughout. The server's
resident memory (VmRSS) is sampled every `--interval` seconds; it swings with the batch being
computed, so growth compares the median of the minute after the warm-up with the median of the
last minute (per-minute medians are reported too). It passes with zero errors and < 5% growth.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("batch", "stream", "unary", "churn")


def _step(t: int) -> dict[str, Any]:
    return {
        "action": t % 2,
        "reward": 1.0,
        "done": 0,
        "time": t % 500,
        "obs_continuous": [0.01 * (t % 7), 0.0, -0.02, 0.1],
    }


def _worker(target: str, kind: str, sessions: int, seconds: float, churn_steps: int, out: Any) -> None:
    from mouse_client import ActionClient

    actions, errors = 0, []
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    try:
        with ActionClient(target) as client:
            if kind in ("batch", "churn"):
                group, t = client.open_sessions(sessions, seed=1), 0
                while time.monotonic() < stop_at:
                    group.get_actions([_step(t)] * sessions)
                    actions += sessions
                    t += 1
                    if kind == "churn" and t % churn_steps == 0:
                        group.close()
                        group = client.open_sessions(sessions, seed=t)
                group.close()
            else:

                def play(i: int) -> None:
                    nonlocal actions
                    with client.open_session(seed=i) as session:
                        target = session.stream() if kind == "stream" else session
                        t = 0
                        while time.monotonic() < stop_at:
                            target.get_action(_step(t))
                            t += 1
                            with lock:
                                actions += 1
                        if kind == "stream":
                            target.close()  # type: ignore[union-attr]

                threads = [threading.Thread(target=play, args=(i,)) for i in range(sessions)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
    except Exception as exc:
        errors.append(repr(exc))
    out.put((kind, actions, errors))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--model", default=str(REPO / "demo" / "checkpoint"))
    parser.add_argument("--context-steps", type=int, default=256, help="server --max-context-steps")
    parser.add_argument("--churn-steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="JSON result path")
    args = parser.parse_args(argv)
    from tests.server_process import ServerProcess

    per = args.sessions // len(KINDS)
    server = ServerProcess(
        "--model",
        args.model,
        "--max-sessions",
        str(args.sessions + per + 8),
        "--max-context-steps",
        str(args.context_steps),
    ).start()
    assert server.proc is not None
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(server.target, kind, per, args.seconds, args.churn_steps, out))
        for kind in KINDS
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    samples: list[tuple[float, int]] = []
    try:
        while any(p.is_alive() for p in procs):
            samples.append((time.monotonic() - started, rss_bytes(server.proc.pid)))
            if len(samples) % 10 == 1:
                print(f"t={samples[-1][0]:6.0f}s server RSS {samples[-1][1] / 2**20:7.1f} MiB", flush=True)
            time.sleep(args.interval)
        results = [out.get() for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
        server.stop()
    # RSS swings with the batch being computed, so compare medians of one-minute windows: right
    # after the warm-up, and at the end of the run.
    window = min(60.0, (args.seconds - args.warmup) / 3)
    early = [r for t, r in samples if args.warmup <= t < args.warmup + window] or [samples[-1][1]]
    late = [r for t, r in samples if t >= samples[-1][0] - window] or [samples[-1][1]]
    base, final = float(np.median(early)), float(np.median(late))
    report = {
        "seconds": args.seconds,
        "sessions": per * len(KINDS),
        "actions": sum(a for _, a, _ in results),
        "actions_per_s": sum(a for _, a, _ in results) / args.seconds,
        "errors": [e for _, _, errs in results for e in errs],
        "rss_after_warmup_mib": base / 2**20,
        "rss_final_mib": final / 2**20,
        "rss_window_s": window,
        "rss_max_mib": max(r for _, r in samples) / 2**20,
        "rss_growth_pct": 100.0 * (final - base) / base,
        "rss_minute_medians_mib": [
            round(float(np.median([r for t, r in samples if m * 60 <= t < (m + 1) * 60])) / 2**20, 1)
            for m in range(int(samples[-1][0] // 60))
        ],
        "by_kind": {kind: actions for kind, actions, _ in results},
        "server_errors_logged": server.log.count(" ERROR "),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "rss_samples": samples}, indent=2))
    ok = not report["errors"] and report["server_errors_logged"] == 0 and report["rss_growth_pct"] < 5.0
    print("SOAK", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
