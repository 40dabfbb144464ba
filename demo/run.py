"""The demo: a mouse-serve process on the bundled demo model (random weights) and environment
workers in separate processes playing CartPole against it, then actions/s and latency.

    .venv/bin/python -m demo.run                     # starts its own server
    .venv/bin/python -m demo.run --target HOST:PORT  # uses a running one
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo import mouse_env_mode

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(__file__).parent / "checkpoint"
REPORT_EVERY_S = 0.5


def _worker(target: str, mode: str, envs: int, seconds: float, seed: int, out: Any) -> None:
    """One environment worker process: `envs` CartPoles, reporting (actions, latencies) to `out`."""
    from demo.env import CartPole
    from mouse_client import ActionClient, EpisodeRecorder, GymAdapter

    latencies: list[float] = []
    done = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def report(force: bool = False) -> None:
        nonlocal done
        with lock:
            if force or len(latencies) >= 64:
                out.put((done, latencies[:]))
                done = 0
                latencies.clear()

    with ActionClient(target) as client:
        if mode == "batch":
            group = client.open_sessions(envs, seed=seed)
            games = [CartPole() for _ in range(envs)]
            recorders = [EpisodeRecorder(s.model) for s in group.sessions]
            records: list[Any] = [
                [rec.reset(g.reset(seed=seed + i)[0])]
                for i, (g, rec) in enumerate(zip(games, recorders, strict=True))
            ]
            last = time.monotonic()
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                actions = group.get_actions(records)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    done += envs
                for i, (game, rec) in enumerate(zip(games, recorders, strict=True)):
                    obs, reward, terminated, truncated, _ = game.step(int(actions[i]))
                    records[i] = [rec.step(int(actions[i]), obs, reward, terminated, truncated)]
                    if terminated or truncated:  # the last transition and the new start, one prefill
                        records[i].append(rec.reset(game.reset()[0]))
                if time.monotonic() - last > REPORT_EVERY_S:
                    report(force=True)
                    last = time.monotonic()
            group.close()
        else:

            def play(i: int) -> None:
                nonlocal done
                game = CartPole()
                with client.open_session(seed=seed + i) as session:
                    stream = session.stream() if mode == "stream" else None
                    adapter = GymAdapter(stream or session)
                    action = adapter.reset(game.reset(seed=seed + i)[0])
                    while time.monotonic() < stop_at:
                        obs, reward, terminated, truncated, _ = game.step(action)
                        started = time.perf_counter()
                        nxt = adapter.step(action, obs, reward, terminated, truncated)
                        if nxt is None:
                            nxt = adapter.reset(game.reset()[0])
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            done += 1
                        action = nxt
                        report()
                    if stream is not None:
                        stream.close()

            threads = [threading.Thread(target=play, args=(i,)) for i in range(envs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        report(force=True)
    out.put(None)


def _start_server(args: argparse.Namespace) -> tuple[Any, str]:
    sys.path.insert(0, str(REPO))
    from tests.server_process import ServerProcess

    server = ServerProcess("--model", str(CHECKPOINT), "--max-sessions", str(args.workers * args.envs + 8))
    print(
        f"starting mouse-serve on {CHECKPOINT.relative_to(REPO)} (a demo model with RANDOM weights) ...",
        flush=True,
    )
    server.start()
    print(f"server listening on {server.target}", flush=True)
    return server, server.target


def run_mode(target: str, mode: str, args: argparse.Namespace) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(target, mode, args.envs, args.seconds, 1000 * w, out))
        for w in range(args.workers)
    ]
    print(
        f"\n[{mode}] {args.workers} worker processes x {args.envs} CartPole environments for {args.seconds:.0f}s",
        flush=True,
    )
    started = time.monotonic()
    for p in procs:
        p.start()
    total, finished, lat = 0, 0, []
    last_print, window = started, 0
    while finished < len(procs):
        item = out.get()
        if item is None:
            finished += 1
            continue
        n, latencies = item
        total += n
        window += n
        lat += latencies
        now = time.monotonic()
        if now - last_print >= 1.0:
            print(
                f"  t={now - started:5.1f}s  actions={total:8d}  {window / (now - last_print):8.0f} actions/s",
                flush=True,
            )
            last_print, window = now, 0
    elapsed = time.monotonic() - started
    for p in procs:
        p.join()
    ms = np.array(lat) * 1e3
    stats = {
        "actions": total,
        "actions_per_s": total / args.seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
    print(
        f"[{mode}] {total} actions in {elapsed:.1f}s: {stats['actions_per_s']:.0f} actions/s; round-trip latency "
        f"p50 {stats['p50_ms']:.2f} ms, p90 {stats['p90_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms",
        flush=True,
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", help="a running server (HOST:PORT); default: start one on the demo model")
    parser.add_argument("--workers", type=int, default=4, help="environment worker processes")
    parser.add_argument("--envs", type=int, default=8, help="environments per worker")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each mode")
    parser.add_argument(
        "--modes",
        default="batch,stream,unary" + (",mouse-env" if mouse_env_mode.available() else ""),
        help="comma-separated: batch, stream, unary, mouse-env (a RemoteAgent over mouse-env CartPoles; "
        "needs mouse-env installed)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    server = None
    target = args.target
    if target is None:
        server, target = _start_server(args)
    try:
        results = {
            mode: mouse_env_mode.run(target, envs=args.envs, seconds=args.seconds)
            if mode == mouse_env_mode.MODE
            else run_mode(target, mode, args)
            for mode in args.modes.split(",")
        }
    finally:
        if server is not None:
            server.stop()
    print("\nsummary (demo model, random weights):")
    print(f"  {'mode':8s} {'actions/s':>10s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}")
    for mode, s in results.items():
        print(
            f"  {mode:8s} {s['actions_per_s']:10.0f} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f} {s['p99_ms']:8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
