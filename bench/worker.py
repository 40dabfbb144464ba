"""gRPC load generator: one worker process drives some sessions of a running mouse-serve.

`bench/run.py` starts several of these as separate processes (multiprocessing, spawn) so client
work is spread like real environment workers. Each worker opens its sessions, runs the warm-up
steps, waits at a barrier shared by all workers, runs the measured steps (timing every round
trip), closes its sessions and reports. Modes:

- `unary`: `AsyncActionClient`, one coroutine per session, one `GetAction` per step;
- `unary-sync`: the blocking client, one thread per session (used for the single-session `a`);
- `stream`: the blocking client's `Session.stream()` (`StreamActions`), one thread per session;
- `batched`: `ActionClient.open_sessions(n)` and one `BatchGetAction` per step for all of them;
- `history`: one session per history length, a prefill each, then single steps in turn (for `e`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import Feed, records


def _records(spec: dict, index: int, steps: int) -> list[dict[str, Any]]:
    return records(Feed(**spec["feed"]).columns(index, steps))


def _result(spec: dict, latencies: list[float], actions: int, t0: float, t1: float, **extra: Any) -> dict:
    return {
        "worker": spec["worker"],
        "mode": spec["mode"],
        "sessions": spec["sessions"],
        "latencies": latencies,
        "actions": actions,
        "t_start": t0,
        "t_end": t1,
        **extra,
    }


# -- modes ------------------------------------------------------------------------------------
def start_measuring(barrier: Any) -> None:
    """Warmed up: wait for every worker, then for the bench's scrape of the server's metrics
    (the first step measured must come after it, or the server's figures miss steps)."""
    barrier.wait()
    barrier.wait()


def _run_threads(spec: dict, barrier: Any, stream: bool) -> dict:
    from mouse_client import ActionClient

    n, warmup, measure = spec["sessions"], spec["warmup"], spec["measure"]
    client = ActionClient(spec["target"])
    sessions = [
        client.open_session(seed=spec["offset"] + i, temperature=spec["temperature"]) for i in range(n)
    ]
    steppers = [s.stream() if stream else s for s in sessions]
    recs = [_records(spec, spec["offset"] + i, warmup + measure) for i in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    ready = threading.Barrier(n + 1)
    go = threading.Event()
    ends = [0.0] * n

    def loop(i: int) -> None:
        try:
            stepper, rs, action = steppers[i], recs[i], 0
            for s in range(warmup):
                action = stepper.get_action({**rs[s], "action": action})
            ready.wait()
            go.wait()
            out = lat[i]
            for s in range(warmup, warmup + measure):
                rec = {**rs[s], "action": action}
                t = time.perf_counter()
                action = stepper.get_action(rec)
                out.append(time.perf_counter() - t)
            ends[i] = time.perf_counter()
        except BaseException:
            errors.append(traceback.format_exc())
            ready.abort()
            go.set()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    if errors:
        barrier.abort()
        raise RuntimeError(errors[0])
    start_measuring(barrier)
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    t1 = max(ends)
    if stream:
        for st in steppers:
            st.close()
    for s in sessions:
        s.close()
    client.close()
    return _result(spec, [x for xs in lat for x in xs], n * measure, t0, t1)


def _run_async(spec: dict, barrier: Any) -> dict:
    from mouse_client import AsyncActionClient

    n, warmup, measure = spec["sessions"], spec["warmup"], spec["measure"]

    async def main() -> dict:
        async with AsyncActionClient(spec["target"]) as client:
            sessions = [
                await client.open_session(seed=spec["offset"] + i, temperature=spec["temperature"])
                for i in range(n)
            ]
            recs = [_records(spec, spec["offset"] + i, warmup + measure) for i in range(n)]
            actions = [0] * n
            lat: list[float] = []

            async def run(i: int, steps: range, out: list[float] | None) -> None:
                session, rs = sessions[i], recs[i]
                for s in steps:
                    rec = {**rs[s], "action": actions[i]}
                    t = time.perf_counter()
                    actions[i] = await session.get_action(rec)
                    if out is not None:
                        out.append(time.perf_counter() - t)

            await asyncio.gather(*(run(i, range(warmup), None) for i in range(n)))
            await asyncio.get_running_loop().run_in_executor(None, start_measuring, barrier)
            t0 = time.perf_counter()
            await asyncio.gather(*(run(i, range(warmup, warmup + measure), lat) for i in range(n)))
            t1 = time.perf_counter()
            for s in sessions:
                await s.close()
            return _result(spec, lat, n * measure, t0, t1)

    return asyncio.run(main())


def _run_batched(spec: dict, barrier: Any) -> dict:
    from mouse_client import ActionClient

    n, warmup, measure = spec["sessions"], spec["warmup"], spec["measure"]
    with ActionClient(spec["target"]) as client:
        group = client.open_sessions(n, seed=spec["offset"], temperature=spec["temperature"])
        recs = [_records(spec, spec["offset"] + i, warmup + measure) for i in range(n)]
        actions = [0] * n
        lat: list[float] = []

        def step(s: int) -> list[int]:
            return group.get_actions([{**recs[i][s], "action": int(actions[i])} for i in range(n)]).tolist()

        for s in range(warmup):
            actions = step(s)
        start_measuring(barrier)
        t0 = time.perf_counter()
        for s in range(warmup, warmup + measure):
            t = time.perf_counter()
            actions = step(s)
            lat.append(time.perf_counter() - t)
        t1 = time.perf_counter()
        group.close()
    return _result(spec, lat, n * measure, t0, t1)


def _run_history(spec: dict, barrier: Any) -> dict:
    """e: one session per history length, each prefilled by one request, then stepped in turn."""
    from mouse_client import ActionClient

    histories, warmup, measure = spec["histories"], spec["warmup"], spec["measure"]
    rs = _records(spec, 0, max(histories) + warmup + measure)
    with ActionClient(spec["target"]) as client:
        sessions = [client.open_session(seed=0, temperature=spec["temperature"]) for _ in histories]
        actions, prefill_s = [], []
        for h, session in zip(histories, sessions, strict=True):
            t = time.perf_counter()
            actions.append(session.get_action(rs[:h]))  # one prefill request
            prefill_s.append(time.perf_counter() - t)

        def step(i: int, out: list[list[float]] | None) -> None:
            for j, (h, session) in enumerate(zip(histories, sessions, strict=True)):
                rec = {**rs[h + i], "action": actions[j]}
                t = time.perf_counter()
                actions[j] = session.get_action(rec)
                if out is not None:
                    out[j].append(time.perf_counter() - t)

        for i in range(warmup):
            step(i, None)
        start_measuring(barrier)
        lat: list[list[float]] = [[] for _ in histories]
        t0 = time.perf_counter()
        for i in range(warmup, warmup + measure):
            step(i, lat)
        t1 = time.perf_counter()
        for session in sessions:
            session.close()
    return _result(
        spec,
        [x for xs in lat for x in xs],
        measure * len(histories),
        t0,
        t1,
        per_history={str(h): xs for h, xs in zip(histories, lat, strict=True)},
        prefill_s={str(h): p for h, p in zip(histories, prefill_s, strict=True)},
    )


MODES = {
    "unary": _run_async,
    "unary-sync": lambda spec, barrier: _run_threads(spec, barrier, stream=False),
    "stream": lambda spec, barrier: _run_threads(spec, barrier, stream=True),
    "batched": _run_batched,
    "history": _run_history,
}


def worker_main(spec: dict, barrier: Any, results: Any) -> None:
    """Entry point of a worker process: runs `spec["mode"]` and puts one dict on `results`."""
    try:
        results.put(MODES[spec["mode"]](spec, barrier))
    except BaseException:
        barrier.abort()
        results.put({"worker": spec["worker"], "error": traceback.format_exc()})
