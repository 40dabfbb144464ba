"""mouse-serve benchmark: one command, a markdown table on stdout and a JSON file.

    .venv/bin/python bench/run.py [--quick] [--shapes mid[,large]] [--device auto|cpu|cuda]
                                  [--dtype float32|bfloat16] [--skip-reference] [--out PATH]

Measurements (see bench/README.md): a (one session, unary and streaming round trips), b
(aggregate actions/s through unary, streaming and batched RPCs with several worker processes),
c (the in-process floor: the project's batched forward + sampling), d (the reference mouse-core
0.3.0 in its own venv), e (step cost against history length), f (KV bytes per session), and the
ratios the performance issue targets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import refenv  # noqa: E402
import shapes  # noqa: E402
import spy as pyspy_profile  # noqa: E402
import transport  # noqa: E402
from protocol import CpuWatch, rss_bytes, summarize  # noqa: E402

from server import BenchServer  # noqa: E402

RPC_LABEL = {"unary": "unary GetAction", "stream": "StreamActions", "batched": "BatchGetAction"}
TEMPERATURE = 1.0  # sampled actions everywhere (the server's default temperature)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- arguments --------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default=None, help="comma-separated: mid, large (default: mid on CPU, mid,large on CUDA)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--quick", action="store_true", help="few steps: a smoke test")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: bench/results/<UTC time>.json)"
    )
    p.add_argument("--skip-reference", action="store_true", help="skip d (no reference venv needed)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per session (default 16; quick 4)")
    p.add_argument(
        "--measure", type=int, default=None, help="measured steps per session (default 256; quick 16)"
    )
    p.add_argument(
        "--sessions", type=_ints, default=None, help="b concurrency levels (default 1,16,64; +1024 on CUDA)"
    )
    p.add_argument("--batches", type=_ints, default=None, help="c batch sizes (default: the b levels)")
    p.add_argument("--ref-batches", type=_ints, default=None, help="d batch sizes (default 1,16,64)")
    p.add_argument("--histories", type=_ints, default=[10, 100, 1000], help="e history lengths")
    p.add_argument("--e-measure", type=int, default=None, help="e measured steps (default 64; quick 8)")
    p.add_argument(
        "--e-warmup", type=int, default=None, help="e warm-up steps after the prefill (default 8; quick 2)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="b worker processes (default 4 on CPU, 8 on CUDA)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the in-process floor and reference (default: all cores on CPU, 4 on CUDA)",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads of the server (OMP_NUM_THREADS; default: as --threads)",
    )
    p.add_argument("--rpcs", default="unary,stream,batched", help="b RPC forms to run")
    p.add_argument(
        "--execution",
        default=None,
        metavar="PATH",
        help="pin one execution path in the servers and the floor (e.g. packed,threads=2) instead of "
        "their start-up measurement",
    )
    p.add_argument("--cache", type=Path, default=shapes.DEFAULT_CACHE, help="checkpoint cache folder")
    p.add_argument("--reference-venv", type=Path, default=refenv.DEFAULT_VENV)
    p.add_argument(
        "--profile",
        action="store_true",
        help="extra runs of a (unary) and b (batched, 64) with py-spy on the server",
    )
    p.add_argument(
        "--py-spy",
        default=None,
        help="py-spy executable for --profile (default: on PATH or bench/.cache/py-spy)",
    )
    p.add_argument("--py-spy-native", action="store_true", help="py-spy --native (C/C++ frames too)")
    p.add_argument(
        "--src",
        type=Path,
        default=None,
        help="measure the project code of another checkout (its mouse_core, server/ and client/ go first on "
        "PYTHONPATH of every process; default: this repository)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a quiet machine (other processes below 5%% of the CPU for 10 s) before "
        "the run, and repeat (up to twice) any measurement that other processes disturbed by more than 5%%",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds any one measurement may take")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def resolve(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: CUDA is not available here.")
    on_gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.shapes = [s for s in (args.shapes or ("mid,large" if on_gpu else "mid")).split(",") if s]
    for s in args.shapes:
        if s not in shapes.SHAPES:
            raise SystemExit(f"unknown shape {s!r}; expected one of {sorted(shapes.SHAPES)}")
    q = args.quick
    args.warmup = args.warmup if args.warmup is not None else (4 if q else 16)
    args.measure = args.measure if args.measure is not None else (16 if q else 256)
    args.e_warmup = args.e_warmup if args.e_warmup is not None else (2 if q else 8)
    args.e_measure = args.e_measure if args.e_measure is not None else (8 if q else 64)
    # --quick keeps the sizes the ratios need (1, 64 and the most)
    most = 1024 if on_gpu else 256  # b at the most sessions must reach at least b at 64
    args.sessions = args.sessions or ([1, 64, most] if q else [1, 16, 64, most])
    args.batches = args.batches or list(args.sessions)
    args.ref_batches = args.ref_batches or ([1, 64] if q else [1, 16, 64])
    args.workers = args.workers or (8 if on_gpu else 4)
    cores = os.cpu_count() or 1
    args.threads = args.threads or (4 if on_gpu else cores)
    args.server_threads = args.server_threads or args.threads
    args.rpcs = [r for r in args.rpcs.split(",") if r]
    if args.out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCH / "results" / f"{stamp}.json"


# -- machine ----------------------------------------------------------------------------------
def use_source(src: Path | None) -> Path:
    """Put `src`'s packages first on the path of this process and of every child process."""
    if src is None:
        return REPO
    src = src.resolve()
    if not (src / "mouse_core").is_dir():
        raise SystemExit(f"--src {src}: no mouse_core/ there")
    paths = [str(src), str(src / "server"), str(src / "client")]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    sys.path[1:1] = paths  # after bench/
    return src


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    import torch

    from mouse_serve.autotune import cpu_model

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "device": args.device,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        src = args.src_dir
        info["src"] = str(src)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True
        )
        info["git"] = commit.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
        info["git_modified"] = [line[3:] for line in dirty.stdout.splitlines()]
    except OSError:
        pass
    return info


# -- subprocess measurements ------------------------------------------------------------------
# Repeat a measurement that other processes disturbed (set from --wait-idle).
RETRY = {"tries": 0, "wait_s": 0.0, "threshold": 0.05}


def _guarded(label: str, run, share_of) -> Any:
    """`run()`, repeated (after waiting for a quiet machine) while other load exceeds the threshold."""
    for attempt in range(RETRY["tries"] + 1):
        out = run()
        share = share_of(out)
        if share <= RETRY["threshold"] or attempt == RETRY["tries"]:
            out["attempts"] = attempt + 1
            return out
        log(f"{label}: other processes used {100 * share:.0f}% of the CPU meanwhile; repeating it")
        wait_idle(RETRY["wait_s"])
    raise AssertionError("unreachable")


def run_json_script(python: str, script: Path, spec: dict, timeout: float) -> dict:
    def share(out: dict) -> float:
        return max(
            [
                r.get("other_cpu_share", 0.0)
                for part in ("c", "d", "e")
                for r in (out.get(part) or {}).values()
            ]
            or [0.0]
        )

    return _guarded(script.name, lambda: _run_json_script(python, script, spec, timeout), share)


def _run_json_script(python: str, script: Path, spec: dict, timeout: float) -> dict:
    """Run a measurement script; every figure it returns gets the run's share of other CPU load."""
    watch = CpuWatch()
    proc = subprocess.run(
        [python, str(script), json.dumps(spec)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=None,  # progress goes to our stderr
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    share = watch.report()["other_cpu_share"]
    for part in ("c", "d", "e"):
        for r in (out.get(part) or {}).values():
            r["other_cpu_share"] = share
    return out


# -- gRPC workers -----------------------------------------------------------------------------
def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run_workers(target: str, mode: str, sizes: list[int], **kw: Any) -> dict[str, Any]:
    return _guarded(
        f"{mode} x {sum(sizes)}",
        lambda: _run_workers(target, mode, sizes, **kw),
        lambda out: out.get("other_cpu_share", 0.0),
    )


def _run_workers(
    target: str,
    mode: str,
    sizes: list[int],
    *,
    warmup: int,
    measure: int,
    feed: dict,
    timeout: float,
    histories: list[int] | None = None,
    server: BenchServer | None = None,
) -> dict[str, Any]:
    """Start one worker process per entry of `sizes` (its session count); aggregate their reports."""
    import worker

    watch = CpuWatch((server.pid,) if server else ())

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(sizes) + 1)  # the workers and this process
    results = ctx.Queue()
    procs = []
    offset = 0
    for w, n in enumerate(sizes):
        spec = {
            "worker": w,
            "mode": mode,
            "target": target,
            "sessions": n,
            "offset": offset,
            "warmup": warmup,
            "measure": measure,
            "feed": feed,
            "temperature": TEMPERATURE,
            "histories": histories or [],
        }
        offset += n
        procs.append(ctx.Process(target=worker.worker_main, args=(spec, barrier, results), daemon=True))
    reports = []
    before: dict[str, float] = {}
    t_measure = 0.0
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        try:
            barrier.wait(timeout)  # every worker has warmed up
            before = server.scrape() if server else {}
            t_measure = time.perf_counter()
            barrier.wait(timeout)  # the measured phase starts (worker.start_measuring)
        except threading.BrokenBarrierError:
            pass  # a worker failed (its report says why) or the warm-up timed out
        while len(reports) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{mode} workers did not finish in {timeout:.0f}s")
            try:
                reports.append(results.get(timeout=min(remaining, 5.0)))
            except Exception:  # queue.Empty: check that the workers are still alive
                if all(not p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError(f"{mode} workers exited without reporting") from None
        after = server.scrape() if server else {}
        t_after = time.perf_counter()
        # the worker that failed, rather than those it stopped at the barrier
        errors = sorted(
            (r["error"] for r in reports if "error" in r), key=lambda e: "BrokenBarrierError" in e
        )
        if errors:
            raise RuntimeError(f"{mode} worker failed:\n{errors[0]}")
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    latencies = [x for r in reports for x in r["latencies"]]
    actions = sum(r["actions"] for r in reports)
    wall = max(r["t_end"] for r in reports) - min(r["t_start"] for r in reports)
    out = summarize(latencies)
    out["actions_per_s"] = actions / wall if wall > 0 else float("nan")
    out.update(
        sessions=sum(sizes),
        workers=len(sizes),
        sessions_per_worker=sizes,
        actions=actions,
        wall_s=wall,
        history_start=warmup,
        history_end=warmup + measure,
    )
    if mode == "history":  # one figure per history length, measured in turn
        for h, lat in reports[0]["per_history"].items():
            out[h] = {
                **summarize(lat),
                "history_start": int(h) + warmup,
                "history_end": int(h) + warmup + measure,
                "prefill_s": reports[0]["prefill_s"][h],
            }
    out["other_cpu_share"] = watch.report()["other_cpu_share"]
    out.update(server_metrics(before, after, t_after - t_measure))
    return out


PER_REQUEST_STAGES = ("decode", "validate", "step", "reply", "encode")
PER_BATCH_STAGES = ("handoff", "pack", "forward", "sample", "unpack")


def server_metrics(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, Any]:
    """Batching seen by the server during the measured phase (from its Prometheus metrics), and
    the mean time of each request stage (`mouse_request_stage_seconds`, see `breakdown`)."""
    if not before or not after:
        return {}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    forwards = delta("mouse_batch_size_count")
    if forwards <= 0:
        return {}
    stages = {}
    for stage in PER_REQUEST_STAGES + PER_BATCH_STAGES:
        key = f'mouse_request_stage_seconds_{{}}{{{{stage="{stage}"}}}}'
        count = delta(key.format("count"))
        if count > 0:
            stages[stage] = 1e3 * delta(key.format("sum")) / count
    handler = 'mouse_request_seconds_{}{{method="GetAction"}}'
    handled = delta(handler.format("count"))
    return {
        "server_forwards": int(forwards),
        "server_avg_batch": delta("mouse_batch_size_sum") / forwards,
        "server_model_ms_per_forward": 1e3 * delta("mouse_model_seconds_sum") / forwards,
        "server_model_busy": delta("mouse_model_seconds_sum") / wall if wall > 0 else None,
        "server_queue_wait_ms": 1e3
        * delta("mouse_queue_wait_seconds_sum")
        / max(delta("mouse_queue_wait_seconds_count"), 1),
        "server_stage_ms": stages,
        "server_getaction_ms": 1e3 * delta(handler.format("sum")) / handled if handled else None,
    }


def breakdown(r: dict[str, Any]) -> dict[str, float] | None:
    """Where a one-session unary round trip goes (mean ms per request): the server's stages, the
    handler's own time around them, and what is left for gRPC (both sides) and the client."""
    st, handler = r.get("server_stage_ms") or {}, r.get("server_getaction_ms")
    if handler is None or not all(k in st for k in PER_REQUEST_STAGES + PER_BATCH_STAGES):
        return None
    batch = r.get("server_avg_batch") or 1.0  # per-batch stages are shared by its requests
    per_request = {k: st[k] / batch for k in PER_BATCH_STAGES}
    rtt = r["mean_ms"]
    if per_request["forward"] == 0.0:  # CUDA graphs: one replay, waited for at the copy to the host
        device = {"forward and sampling (one CUDA graph replay, actions to the host)": per_request["sample"]}
    else:
        device = {"forward": per_request["forward"], "sampling (actions to the host)": per_request["sample"]}
    out = {
        "round trip (client, mean)": rtt,
        "decode (protobuf)": st["decode"],
        "validate (checks, session lookup)": st["validate"],
        "queue (waiting for a batch)": r.get("server_queue_wait_ms", 0.0),
        "hand-off to and from the runner thread": per_request["handoff"],
        "pack (inputs to tensors)": per_request["pack"],
        **device,
        "unpack (results)": per_request["unpack"],
        "reply (record, build)": st["reply"],
        "encode (protobuf)": st["encode"],
    }
    batch_total = sum(per_request.values())
    out["session bookkeeping and wake-ups (step - queue - batch)"] = max(
        st["step"] - out["queue (waiting for a batch)"] - batch_total, 0.0
    )
    out["handler overhead (rest of the handler)"] = max(
        handler - st["validate"] - st["step"] - st["reply"], 0.0
    )
    out["gRPC and client (round trip - server)"] = rtt - handler - st["decode"] - st["encode"]
    out["non-forward (round trip - forward - sampling)"] = (
        rtt - per_request["forward"] - per_request["sample"]
    )
    return out


def worker_sizes(rpc: str, sessions: int, args: argparse.Namespace) -> list[int]:
    """Sessions per worker process: spread evenly (batched: one SessionGroup per worker, so 64
    sessions over 4 workers are 4 processes x 16 environments)."""
    return split(sessions, args.workers)


# -- one shape --------------------------------------------------------------------------------
def bench_shape(shape: str, args: argparse.Namespace, results_dir: Path, stamp: str) -> dict[str, Any]:
    res: dict[str, Any] = {"shape": shape}
    log(f"{shape}: checkpoint")
    ckpt, nparams = shapes.checkpoint(shape, args.cache)
    feed = {**{k: v for k, v in shapes.feed_spec(shape).items() if k != "tokens_per_step"}, "seed": 0}
    geometry = shapes.kv_geometry(shape)
    res.update(
        checkpoint=str(ckpt), num_parameters=nparams, config=shapes.SHAPES[shape], kv_geometry=geometry
    )
    W, M = args.warmup, args.measure
    common = {
        "checkpoint": str(ckpt),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "feed": feed,
        "warmup": W,
        "measure": M,
        "histories": args.histories,
        "e_warmup": args.e_warmup,
        "e_measure": args.e_measure,
        "temperature": TEMPERATURE,
        "execution": args.execution,
    }

    # c, e (floor), f
    log(f"{shape}: c floor (batches {args.batches}), e floor, f")
    floor = run_json_script(
        sys.executable,
        BENCH / "floor.py",
        {**common, "batches": args.batches, "geometry": geometry},
        args.timeout,
    )
    res["c"] = floor["c"]
    res["e"] = {"floor": floor["e"]}
    res["f"] = floor["f"]
    res["floor_info"] = {k: floor[k] for k in ("threads", "execution", "matmul")}

    # d (reference), e (reference)
    if args.skip_reference:
        res["d"] = {"skipped": "--skip-reference"}
    else:
        try:
            log(f"{shape}: d reference (batches {args.ref_batches})")
            ref_python = refenv.ensure(args.reference_venv)
            ref = run_json_script(
                str(ref_python), BENCH / "reference.py", {**common, "batches": args.ref_batches}, args.timeout
            )
            res["d"] = ref["d"]
            res["e"]["reference"] = ref["e"]
            res["reference_info"] = {k: ref[k] for k in ("package", "torch", "threads")}
        except Exception as exc:  # the rest of the bench still runs
            log(f"reference failed: {exc}")
            res["d"] = {"skipped": f"failed: {exc}"}

    server_log = results_dir / f"{stamp}-{shape}-server.log"
    server_kw = dict(
        device=args.device,
        dtype=args.dtype,
        threads=args.server_threads,
        log_path=server_log,
        cwd=args.src_dir,
        extra_args=["--execution", args.execution] if args.execution else None,
    )
    res["server"] = {"log": str(server_log), "threads": args.server_threads}

    # a, e (gRPC): a server with a few sessions and room for the longest history.
    e_context = max(args.histories) + args.e_warmup + args.e_measure
    ctx_a = max(e_context, W + M) + 8
    with BenchServer(sys.executable, ckpt, max_sessions=4, max_context_steps=ctx_a, **server_kw) as srv:
        res["server"]["a_e"] = {"max_sessions": 4, "max_context_steps": ctx_a, "pool_mib": srv.pool_mib}
        res["a"] = {}
        for rpc, mode in (("unary", "unary-sync"), ("stream", "stream")):
            log(f"{shape}: a {rpc}, 1 session")
            res["a"][rpc] = run_workers(
                srv.target,
                mode,
                [1],
                warmup=W,
                measure=M,
                feed=feed,
                timeout=args.timeout,
                server=srv,
            )
        res["a_breakdown"] = breakdown(res["a"]["unary"])
        if res["a_breakdown"]:
            split = res["a_breakdown"]
            server_ms = split["round trip (client, mean)"] - split["gRPC and client (round trip - server)"]
            log(f"{shape}: gRPC transport floor (bare grpcio echo, handler 0 and {server_ms:.1f} ms)")
            try:
                res["transport"] = transport.floor(
                    [0.0, round(server_ms, 2)], threads=args.server_threads, calls=20 if args.quick else 200
                )
            except Exception as exc:  # a side measurement: report it, keep the run
                log(f"{shape}: gRPC transport floor failed: {exc}")
                res["transport"] = {"error": str(exc)}
        log(f"{shape}: e gRPC unary, histories {args.histories} in turn")
        e_grpc = run_workers(
            srv.target,
            "history",
            [1],
            warmup=args.e_warmup,
            measure=args.e_measure,
            feed=feed,
            timeout=args.timeout,
            histories=args.histories,
            server=srv,
        )
        shared = {k: v for k, v in e_grpc.items() if k.startswith("server_") or k == "other_cpu_share"}
        res["e"]["grpc"] = {str(h): {**e_grpc[str(h)], **shared} for h in args.histories}
        if args.profile:
            res.setdefault("profiles", {})["a_unary"] = profile_run(
                srv,
                args,
                results_dir / f"{stamp}-{shape}-profile-a-unary.txt",
                lambda: _run_workers(
                    srv.target,
                    "unary-sync",
                    [1],
                    warmup=W,
                    measure=M,
                    feed=feed,
                    timeout=args.timeout,
                    server=srv,
                ),
            )

    # b: a server with room for the largest concurrency.
    most = max(args.sessions)
    ctx_b = W + M + 8
    with BenchServer(
        sys.executable, ckpt, max_sessions=most + 8, max_context_steps=ctx_b, **server_kw
    ) as srv:
        rss0 = rss_bytes(srv.pid)
        res["server"]["b"] = {
            "max_sessions": most + 8,
            "max_context_steps": ctx_b,
            "pool_mib": srv.pool_mib,
            "rss_after_start": rss0,
        }
        res["b"] = {}
        b_args: dict[str, Any] = {
            "warmup": W,
            "measure": M,
            "feed": feed,
            "timeout": args.timeout,
            "server": srv,
        }
        for rpc in args.rpcs:
            res["b"][rpc] = {}
            for n in args.sessions:
                sizes = worker_sizes(rpc, n, args)
                log(f"{shape}: b {rpc}, {n} sessions over {len(sizes)} worker(s) {sizes}")
                try:
                    r = run_workers(srv.target, rpc, sizes, **b_args)
                except (RuntimeError, TimeoutError) as exc:  # one failed measurement keeps the rest
                    reason = failure(exc)
                    log(f"{shape}: b {rpc} at {n} sessions FAILED, the run goes on: {reason}")
                    res["b"][rpc][str(n)] = {"skipped": f"failed: {reason}", "error": str(exc)}
                    srv.restart()  # its workers' sessions may still hold the server's slots
                    continue
                r["server_rss_after"] = rss_bytes(srv.pid)
                res["b"][rpc][str(n)] = r
        res["server"]["b"]["rss_after_runs"] = rss_bytes(srv.pid)
        if args.profile and 64 in args.sessions and "batched" in args.rpcs:
            sizes = worker_sizes("batched", 64, args)
            res.setdefault("profiles", {})["b_batched_64"] = profile_run(
                srv,
                args,
                results_dir / f"{stamp}-{shape}-profile-b-batched-64.txt",
                lambda: _run_workers(srv.target, "batched", sizes, **b_args),
            )
    res["ratios"] = ratios(res)
    return res


def failure(exc: BaseException) -> str:
    """A failed measurement in one line for the table: the last line of its error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__).replace("|", "/")[:200]


def profile_run(srv: BenchServer, args: argparse.Namespace, out: Path, run) -> dict[str, Any]:
    exe = pyspy_profile.find_py_spy(args.py_spy)
    if exe is None:
        log("--profile: py-spy not found (pip install py-spy into any venv and pass --py-spy PATH)")
        return {"skipped": "py-spy not found"}
    log(f"profiling the server with py-spy -> {out}")
    spy = pyspy_profile.PySpy(exe, srv.pid, out, native=args.py_spy_native)
    time.sleep(1.0)
    try:
        measured = run()
    finally:
        err = spy.stop()
    if not out.is_file():
        return {"skipped": f"py-spy wrote nothing: {err.strip()[-500:]}"}
    summary = pyspy_profile.summarize(out)
    summary["raw"] = str(out)
    summary["measurement_while_profiled"] = {
        k: measured.get(k) for k in ("median_ms", "p99_ms", "actions_per_s")
    }
    return summary


# -- ratios and table -------------------------------------------------------------------------
def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratios(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the performance issues, each from this run, with PASS or MISS."""

    def ratio(name: str, num: Any, den: Any, target: str, ok) -> dict[str, Any]:
        value = num / den if num is not None and den else None
        verdict = "n/a" if value is None else ("PASS" if ok(value) else "MISS")
        return {"name": name, "value": value, "target": target, "verdict": verdict}

    most = max((int(n) for n in (res.get("b", {}).get("batched") or {})), default=0)
    split = res.get("a_breakdown") or {}
    return [
        ratio(
            "a: unary p50 / d per-step p50 at batch 1",
            _get(res, "a", "unary", "median_ms"),
            _get(res, "d", "1", "median_ms"),
            "<= 0.5",
            lambda v: v <= 0.5,
        ),
        ratio(
            "a: non-forward part of the unary round trip (ms)",
            split.get("non-forward (round trip - forward - sampling)"),
            1.0,
            "< 1 ms",
            lambda v: v < 1.0,
        ),
        ratio(
            "b batched actions/s (64) / d actions/s (64)",
            _get(res, "b", "batched", "64", "actions_per_s"),
            _get(res, "d", "64", "actions_per_s"),
            ">= 5",
            lambda v: v >= 5,
        ),
        ratio(
            "b batched actions/s (64) / c actions/s (64)",
            _get(res, "b", "batched", "64", "actions_per_s"),
            _get(res, "c", "64", "actions_per_s"),
            ">= 0.8",
            lambda v: v >= 0.8,
        ),
        ratio(
            "c: floor FLOP/s at 64 / matmul FLOP/s (share of the FLOP limit)",
            _get(res, "c", "64", "flops_per_s"),
            _get(res, "floor_info", "matmul", "flops_per_s"),
            ">= 0.6",
            lambda v: v >= 0.6,
        ),
        ratio(
            f"b batched actions/s ({most}) / b batched actions/s (64)",
            _get(res, "b", "batched", str(most), "actions_per_s") if most > 64 else None,
            _get(res, "b", "batched", "64", "actions_per_s"),
            ">= 1",
            lambda v: v >= 1,
        ),
        ratio(
            "e: gRPC unary step p50, history 1000 / 10",
            _get(res, "e", "grpc", "1000", "median_ms"),
            _get(res, "e", "grpc", "10", "median_ms"),
            "<= 1.5",
            lambda v: v <= 1.5,
        ),
        ratio(
            "e: floor step p50, history 1000 / 10",
            _get(res, "e", "floor", "1000", "median_ms"),
            _get(res, "e", "floor", "10", "median_ms"),
            "<= 1.5",
            lambda v: v <= 1.5,
        ),
        ratio(
            "f: pool bytes per session / raw K/V bytes",
            _get(res, "f", "pool_storage_bytes_per_slot"),
            _get(res, "f", "raw_kv_bytes"),
            "within 10% (0.9-1.1)",
            lambda v: 0.9 <= v <= 1.1,
        ),
    ]


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["protocol"]
    lines = [
        f"- **date**: {report['date']}",
        f"- **machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}; device {m['device']}",
        f"- **command**: `{report['command']}`",
        f"- **code**: git {m.get('git', '?')}" + (f" at {m['src']}" if m.get("src") != str(REPO) else ""),
        f"- **protocol**: every session starts empty, {p['warmup']} warm-up steps, then {p['measure']} measured steps "
        f"(history {p['warmup']}→{p['warmup'] + p['measure']} steps, {p['tokens_per_step']} tokens each); "
        f"sampled actions (temperature {TEMPERATURE}); e: a prefill of H steps, {p['e_warmup']} warm-up, "
        f"{p['e_measure']} measured single steps",
        f"- **other load**: processes outside the bench used {report['cpu']['other_cpu_s']:.0f} CPU-s "
        f"({100 * report['cpu']['other_cpu_share']:.1f}% of the machine) during the {report['elapsed_s']:.0f} s run; "
        f"load average {report['loadavg_start'][0]:.2f} at the start",
        f"- **threads**: torch {p['server_threads']} thread(s) in the server (it shares the cores with the b "
        f"workers), {p['threads']} in the in-process floor and the reference; "
        f"b: {p['workers']} worker processes (unary: asyncio client, a coroutine per session; streaming: a thread "
        f"per session; batched: one SessionGroup per worker)",
        "",
    ]
    for res in report["results"]:
        shape = res["shape"]
        lines += [
            f"#### `{shape}`: {res['num_parameters'] / 1e6:.2f} M parameters, {p['dtype']}",
            "",
            "| | measurement | sessions | history (steps) | median ms/step | p99 ms/step | actions/s | samples "
            "| server avg batch | server model busy | other CPU |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def row(tag: str, what: str, r: dict | None, sessions: Any, lines: list[str] = lines) -> None:
            if not r or "samples" not in r:
                reason = (r or {}).get("skipped", "not run")
                lines.append(f"| {tag} | {what} | {sessions} | - | - | - | - | {reason} | - | - | - |")
                return
            hist = f"{r.get('history_start', '?')}→{r.get('history_end', '?')}"
            share = r.get("other_cpu_share")
            other = "-" if share is None else f"{100 * share:.0f}%"
            batch = _f(r.get("server_avg_batch"), 1)
            busy = "-" if r.get("server_model_busy") is None else f"{100 * r['server_model_busy']:.0f}%"
            lines.append(
                f"| {tag} | {what} | {sessions} | {hist} | {_f(r.get('median_ms'), 3)} | {_f(r.get('p99_ms'), 3)} "
                f"| {_f(r.get('actions_per_s'), 1)} | {r.get('samples')} | {batch} | {busy} | {other} |"
            )

        for rpc in ("unary", "stream"):
            row("a", f"one session, {RPC_LABEL[rpc]} round trip", _get(res, "a", rpc), 1)
        for rpc in p["rpcs"]:
            for n in p["sessions"]:
                r = _get(res, "b", rpc, str(n))
                per_worker = (r or {}).get("sessions_per_worker")
                label = f"{RPC_LABEL[rpc]}, {len(per_worker) if per_worker else '?'} procs"
                if rpc == "batched" and per_worker:
                    label += f" × {max(per_worker)} envs (per call)"
                row("b", label, r, n)
        for n in p["batches"]:
            row("c", "floor: forward_batch + sample_actions (per lockstep step)", _get(res, "c", str(n)), n)
        if "skipped" in (res.get("d") or {}):
            row("d", "reference mouse-core 0.3.0", res["d"], "-")
        else:
            for n in p["ref_batches"]:
                row(
                    "d",
                    "reference mouse-core 0.3.0, own cache (per lockstep step)",
                    _get(res, "d", str(n)),
                    n,
                )
        for kind, label in (("floor", "floor"), ("grpc", "gRPC unary"), ("reference", "reference")):
            for h in p["histories"]:
                r = _get(res, "e", kind, str(h))
                if r is not None:
                    row("e", f"{label}, after a {h}-step prefill", r, 1)
        f = res.get("f") or {}
        srv = res.get("server", {})
        lines += [
            "",
            f"f: a pool for {f.get('context_steps')} steps ({f.get('context_tokens')} tokens) holds "
            f"{_f(f.get('pool_storage_bytes_per_slot'), 0)} bytes per session (`bytes_per_slot` "
            f"{_f(f.get('pool_bytes_per_slot'), 0)}); raw K/V of that context = 2 × {res['kv_geometry']['layers']} layers × "
            f"{res['kv_geometry']['kv_heads']} KV heads × {res['kv_geometry']['head_dim']} head dim × "
            f"{f.get('context_tokens')} tokens × {f.get('dtype_bytes')} B = {_f(f.get('raw_kv_bytes'), 0)} bytes; "
            + (
                f"process RSS grew {_f(f.get('rss_growth_per_session', 0) / 1024, 0)} KiB per session (pool of {f.get('sessions')}). "
                if "rss_growth_per_session" in f
                else f"device memory grew {_f(f.get('device_bytes_growth_per_session', 0) / 1024, 0)} KiB per session. "
            )
            + f"The b server preallocates {_f(_get(srv, 'b', 'pool_mib'), 1)} MiB of KV pool for "
            f"{_get(srv, 'b', 'max_sessions')} sessions × {_get(srv, 'b', 'max_context_steps')} steps; its RSS was "
            f"{_f((_get(srv, 'b', 'rss_after_start') or 0) / 2**20, 0)} MiB after start and "
            f"{_f((_get(srv, 'b', 'rss_after_runs') or 0) / 2**20, 0)} MiB after all b runs.",
        ]
        split = res.get("a_breakdown")
        if split:
            rtt = split["round trip (client, mean)"]
            lines += [
                "",
                "Where a one-session unary round trip goes (a, mean per request, from the server's "
                "`mouse_request_stage_seconds` and the client's round trips):",
                "",
                "| stage | ms | share |",
                "|---|---:|---:|",
            ]
            for stage, ms in split.items():
                lines.append(f"| {stage} | {ms:.3f} | {100 * ms / rtt:.0f}% |")
            tr = res.get("transport") or {}
            if "error" in tr:
                lines += ["", f"gRPC without mouse-serve (`bench/transport.py`): failed ({tr['error']})."]
            if "runs" in tr:
                instant, busy = tr["runs"]
                lines += [
                    "",
                    f"gRPC without mouse-serve (`bench/transport.py`: a bare grpcio echo, the same blocking "
                    f"client, {tr['request_bytes']}/{tr['reply_bytes']}-byte messages): "
                    f"{instant['transport_mean_ms']:.3f} ms per round trip (mean) with an instant handler, "
                    f"{busy['transport_mean_ms']:.3f} ms (round trip - handler) when the handler computes for "
                    f"{busy['handler_ms']:.2f} ms (the server's time above, torch on {tr['threads']} "
                    f'thread(s)). The row "gRPC and client" above is '
                    f"{split['gRPC and client (round trip - server)'] - busy['transport_mean_ms']:.3f} ms more "
                    "than that: the client SDK's own Python and anything else outside the server. The "
                    "non-forward part less grpcio's transport (what mouse-serve's server and client add): "
                    f"{split['non-forward (round trip - forward - sampling)'] - busy['transport_mean_ms']:.3f} ms.",
                ]
        mm = _get(res, "floor_info", "matmul") or {}
        c64 = _get(res, "c", "64") or {}
        if mm and c64.get("flops"):
            fl = c64["flops"]
            lines += [
                "",
                f"FLOP limit: {mm['dtype']} matmul ({mm['size']}^3, best of {mm['runs']}) runs at "
                f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s here; a step of 64 sessions at the mean measured "
                f"history is {fl['total'] / 1e9:.3f} GFLOP ({fl['linear'] / 1e9:.3f} linear, "
                f"{fl['attention'] / 1e9:.3f} attention), so the limit is "
                f"{1e3 * fl['total'] / mm['flops_per_s']:.2f} ms/step; the floor took {c64['median_ms']:.2f} ms "
                f"({c64['flops_per_s'] / 1e9:.1f} GFLOP/s).",
            ]
        execution = _get(res, "floor_info", "execution")
        if execution:
            lines += ["", "Execution paths chosen at start-up (floor process):", ""]
            lines += [f"- {line}" for line in execution]
        lines += [
            "",
            "| ratio | value | target | verdict |",
            "|---|---:|---|---|",
        ]
        for r in res["ratios"]:
            lines.append(f"| {r['name']} | {_f(r['value'], 3)} | {r['target']} | {r['verdict']} |")
        lines.append("")
        for name, prof in (res.get("profiles") or {}).items():
            if "own" not in prof:
                lines.append(f"profile {name}: {prof.get('skipped')}")
                continue
            lines += [
                f"profile `{name}` (server, py-spy, {prof['samples']} samples; threads: "
                + ", ".join(f"{t} {v}%" for t, v in prof["threads"][:4])
                + ")",
                "",
                "| own % | frame (own samples) | | inclusive % | project function (inclusive) |",
                "|---:|---|---|---:|---|",
            ]
            for (fo, po), (fi, pi) in zip(prof["own"][:12], prof["inclusive_project"][:12], strict=False):
                lines.append(f"| {po} | `{fo}` | | {pi} | `{fi}` |")
            lines.append("")
    return "\n".join(lines)


def wait_idle(limit_s: float, window_s: float = 10.0, threshold: float = 0.05) -> bool:
    """Wait until other processes use less than `threshold` of the machine over `window_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        watch = CpuWatch()
        time.sleep(window_s)
        share = watch.report()["other_cpu_share"]
        if share < threshold:
            log(f"machine quiet (other processes {100 * share:.1f}% of the CPU)")
            return True
        if time.monotonic() > deadline:
            log(
                f"machine still busy after {limit_s:.0f}s (other processes {100 * share:.0f}%); starting anyway"
            )
            return False
        log(f"waiting for a quiet machine (other processes {100 * share:.0f}% of the CPU)")


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.src_dir = use_source(args.src)
    resolve(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    results_dir = args.out.parent
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = args.out.stem
    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
        RETRY.update(tries=2, wait_s=args.wait_idle)
    started = time.monotonic()
    load = os.getloadavg()
    probe = CpuWatch()
    time.sleep(2.0)
    if (share := probe.report()["other_cpu_share"]) > 0.05:
        log(
            f"warning: other processes use {100 * share:.0f}% of the CPU; figures will be noisy (see --wait-idle)"
        )
    watch = CpuWatch()
    report: dict[str, Any] = {
        "loadavg_start": list(load),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "bench/run.py", *args.argv]),
        "machine": machine(args),
        "protocol": {
            "warmup": args.warmup,
            "measure": args.measure,
            "sessions": args.sessions,
            "batches": args.batches,
            "ref_batches": args.ref_batches,
            "histories": args.histories,
            "e_warmup": args.e_warmup,
            "e_measure": args.e_measure,
            "workers": args.workers,
            "threads": args.threads,
            "server_threads": args.server_threads,
            "dtype": args.dtype,
            "rpcs": args.rpcs,
            "tokens_per_step": shapes.feed_spec(args.shapes[0])["tokens_per_step"],
            "temperature": TEMPERATURE,
        },
        "results": [],
    }
    for shape in args.shapes:
        report["results"].append(bench_shape(shape, args, results_dir, stamp))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["cpu"] = watch.report()
    text = table(report)
    args.out.write_text(json.dumps(report, indent=2, default=_json_default))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    log(f"done in {report['elapsed_s']:.0f}s: {args.out} (+ .md)")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
