"""The demo: a mouse-serve process on the bundled demo model (a MOUSE model trained to learn
Bernoulli bandits in context, see demo/checkpoint/README.md) and environment workers in separate
processes playing bandits against it, then actions/s and latency, then the learning curve:
regret per window of pulls as each session's context grows, and after a context reset, through
the server and with the same checkpoint in this process.

    .venv/bin/python -m demo.run                     # starts its own server
    .venv/bin/python -m demo.run --target HOST:PORT  # uses a running one (serving demo/checkpoint)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from demo import mouse_env_mode
from demo.bandit import HORIZON
from demo.learning import WINDOWS, Curve, LocalActor, ServedActor, format_curves, learning_curve

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(__file__).parent / "checkpoint"
REPORT_EVERY_S = 0.5
CURVE_TASK_SEED = 1000  # the learning curve's tasks: BernoulliBandit.reset(seed=CURVE_TASK_SEED + i)
CURVE_PULLS_AFTER_RESET = 50


def _worker(target: str, mode: str, envs: int, seconds: float, seed: int, out: Any) -> None:
    """One environment worker process: `envs` bandits, reporting (actions, latencies) to `out`."""
    from demo.bandit import BernoulliBandit
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
            games = [BernoulliBandit() for _ in range(envs)]
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
                        records[i].append(rec.reset(game.reset()[0]))  # same task, next episode
                if time.monotonic() - last > REPORT_EVERY_S:
                    report(force=True)
                    last = time.monotonic()
            group.close()
        else:

            def play(i: int) -> None:
                nonlocal done
                game = BernoulliBandit()
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

    sessions = max(args.workers * args.envs, args.curve_sessions) + 8
    server = ServerProcess("--model", str(CHECKPOINT), "--max-sessions", str(sessions))
    print(
        f"starting mouse-serve on {CHECKPOINT.relative_to(REPO)} (a bandit-learning demo model) ...",
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
        f"\n[{mode}] {args.workers} worker processes x {args.envs} bandit environments for {args.seconds:.0f}s",
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


def _in_process_curve(sessions: int, task_seeds: list[int]) -> Curve:
    from mouse_core import load_model

    actor = LocalActor(load_model(CHECKPOINT), sessions, seed=0)
    return learning_curve(actor, task_seeds, pulls_after_reset=CURVE_PULLS_AFTER_RESET)


def run_learning_curve(target: str, args: argparse.Namespace) -> dict[str, Curve]:
    """The learning curve on `args.curve_sessions` bandit tasks, through the server (a session
    group, one BatchGetAction per pull, the server's default temperature 1) and, at the same
    time in a thread, with the checkpoint in this process."""
    from mouse_client import ActionClient

    task_seeds = [CURVE_TASK_SEED + i for i in range(args.curve_sessions)]
    print(
        f"\n[learning] {args.curve_sessions} sessions, one bandit task each: {HORIZON} pulls from an "
        f"empty context, a context reset, {CURVE_PULLS_AFTER_RESET} more pulls; through the server "
        "and in this process",
        flush=True,
    )
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # the client mostly waits for replies: compute meanwhile
        local = pool.submit(_in_process_curve, args.curve_sessions, task_seeds)
        with ActionClient(target) as client, client.open_sessions(args.curve_sessions, seed=0) as group:
            served = learning_curve(ServedActor(group), task_seeds, pulls_after_reset=CURVE_PULLS_AFTER_RESET)
        curves = {"in-process": local.result(), "server": served}
    print(f"  both done in {time.monotonic() - started:.1f}s", flush=True)
    return curves


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
    parser.add_argument(
        "--curve-sessions", type=int, default=32, help="sessions of the learning curve (0: skip it)"
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
            if mode
        }
        curves = run_learning_curve(target, args) if args.curve_sessions > 0 else {}
    finally:
        if server is not None:
            server.stop()
    if results:
        print("\nsummary (demo model):")
        print(f"  {'mode':8s} {'actions/s':>10s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}")
        for mode, s in results.items():
            print(
                f"  {mode:8s} {s['actions_per_s']:10.0f} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f} {s['p99_ms']:8.2f}"
            )
    if curves:
        print("\nlearning in context: mean regret per pull (lower is better; 0 = always the best arm)")
        print(format_curves(curves))
        served = curves["server"]
        late, early = served.window(*WINDOWS[-1]), served.window(*WINDOWS[0])
        print(
            f"  pulls 401-500: {late / served.random_regret:.0%} of a random policy's regret and "
            f"{late / early:.0%} of pulls 1-50; a context reset starts the learning over."
        )
        same = all(np.array_equal(c.regret, served.regret) for c in curves.values())
        print("  in-process and served actions: " + ("identical" if same else "DIFFERENT"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
