"""The server's own work per action: its CPU time per action, by thread, under BatchGetAction.

On a GPU a step of 64 sessions takes about a millisecond, so what the server does around the
forward for each action (decode, checks, session bookkeeping, batching, the reply, gRPC) bounds
its throughput (bench/README.md, "GPU"). This measures that work on any machine: a real server
(default: the `tiny` model, whose forward is short) and one client process whose threads step
`--groups` SessionGroups of `--sessions` sessions each through BatchGetAction; the server's CPU
time per thread is read from /proc before and after the measured steps.

    .venv/bin/python bench/host.py                          # tiny model, 1 group of 64 sessions
    .venv/bin/python bench/host.py --src /tmp/old,. --rounds 3   # an A/B, interleaved
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import Feed, proc_cpu_s, records
from bench.server import BenchServer
from bench.shapes import checkpoint, feed_spec


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid` (a thread that just ended is left out)."""
    cpu = {int(tid): proc_cpu_s(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    return {tid: seconds for tid, seconds in cpu.items() if seconds}


def measure(src: Path, args: argparse.Namespace, ckpt: Path, log: Path) -> dict[str, float]:
    from mouse_client import ActionClient

    n, groups = args.sessions, args.groups
    server = BenchServer(
        sys.executable,
        ckpt,
        device="cpu",
        dtype="float32",
        max_sessions=n * groups + 4,
        max_context_steps=args.warmup + args.steps + 8,
        threads=args.threads,
        log_path=log,
        cwd=src,
        metrics=False,
    )
    server.env["PYTHONPATH"] = os.pathsep.join(str(src / p) for p in ("server", "client", "."))
    feed = Feed(**{k: v for k, v in feed_spec(args.shape).items() if k != "tokens_per_step"})
    barrier = threading.Barrier(groups + 1)
    calls: list[float] = []

    def run(g: int) -> None:
        with ActionClient(server.target) as client:
            group = client.open_sessions(n, seed=g)
            recs = [records(feed.columns(g * n + i, args.warmup + args.steps)) for i in range(n)]
            actions = [0] * n
            for s in range(args.warmup + args.steps):
                if s == args.warmup:
                    barrier.wait()  # warmed up
                    barrier.wait()  # the server's CPU times are read
                t = time.perf_counter()
                actions = group.get_actions(
                    [{**recs[i][s], "action": int(actions[i])} for i in range(n)]
                ).tolist()
                if s >= args.warmup:
                    calls.append(time.perf_counter() - t)
            group.close()

    with server:
        pid = server.pid
        threads = [threading.Thread(target=run, args=(g,)) for g in range(groups)]
        for t in threads:
            t.start()
        barrier.wait()
        before = thread_cpu(pid)
        start = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = thread_cpu(pid)
    actions = n * groups * args.steps
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = used.pop(pid, 0.0)  # the main thread runs the event loop
    busiest = max(used.values(), default=0.0)  # the runner thread
    return {
        "actions_per_s": actions / wall,
        "call_p50_ms": statistics.median(calls) * 1e3,
        "loop_us": loop / actions * 1e6,
        "runner_us": busiest / actions * 1e6,
        "total_us": (loop + sum(used.values())) / actions * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", help="bench model shape (default tiny)")
    parser.add_argument("--sessions", type=int, default=64, help="sessions per group (default 64)")
    parser.add_argument("--groups", type=int, default=1, help="SessionGroups, one client thread each")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per session")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server torch threads")
    parser.add_argument("--src", default=".", help="checkout(s) to measure, comma-separated (an A/B)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of each --src, interleaved")
    args = parser.parse_args(argv)
    sources = [Path(s).resolve() for s in args.src.split(",")]
    ckpt, _ = checkpoint(args.shape)
    results: dict[Path, list[dict[str, float]]] = {src: [] for src in sources}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for src in sources:
                res = measure(src, args, ckpt, Path(tmp) / "server.log")
                results[src].append(res)
                print(
                    f"round {r + 1} {src}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True
                )
    print(
        f"\n{args.shape}, {args.groups} x {args.sessions} sessions, {args.steps} steps; medians of "
        f"{args.rounds} round(s); server CPU per action by thread\n"
    )
    print("| code | actions/s | call p50 ms | event loop us | runner us | all threads us |")
    print("|---|---:|---:|---:|---:|---:|")
    for src, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {src} | {med['actions_per_s']:,.0f} | {med['call_p50_ms']:.2f} | {med['loop_us']:.1f} | "
            f"{med['runner_us']:.1f} | {med['total_us']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
