"""Weight updates under traffic: 64 sessions step through BatchGetAction while a learner pushes
20 updates (alternating two checkpoints); reports failed requests, versions seen, the round trip
p50/p99 with and without updates, and the server's resident memory before and after, against
issue 13's targets (no failed request, p99 during updates within 2x of without, RSS back within
5% after the last update).

    .venv/bin/python bench/updates.py                     # mid model, on-update keep and refill
    .venv/bin/python bench/updates.py --policies keep --updates 20 --interval 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import Feed, rss_bytes
from bench.server import BenchServer
from bench.shapes import checkpoint, feed_spec
from mouse_client import encode_steps
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from mouse_core import load_model, save_model

ADMIN = (("authorization", "Bearer bench-admin"),)


def other_weights(path: Path, out: Path) -> Path:
    """The same checkpoint with other weights (seeded noise)."""
    model = load_model(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(model, out)
    return out


class Groups:
    """The workers' sessions and sequence numbers, kept across phases."""

    def __init__(self, groups: int, per_group: int) -> None:
        self.sids: list[list[str]] = [[] for _ in range(groups)]
        self.seqs = [0] * groups
        self.per_group = per_group
        self.cuts = 0  # replies whose request cut a context (a sliding re-prefill)


async def traffic(
    target: str, feed: Feed, state: Groups, stop: asyncio.Event
) -> tuple[list[tuple[float, float]], list[str], set[int]]:
    """One worker per group, each stepping its sessions with one BatchGetAction per step."""
    samples: list[tuple[float, float]] = []  # (time sent, round trip)
    failures: list[str] = []
    versions: set[int] = set()
    per_group = state.per_group

    async def worker(g: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ActionServiceStub(channel)
            if not state.sids[g]:
                for i in range(per_group):
                    opened = await stub.OpenSession(pb.OpenSessionRequest(seed=g * 100 + i))
                    state.sids[g].append(opened.session_id)
            sids = state.sids[g]
            while not stop.is_set():
                state.seqs[g] += 1
                seq = state.seqs[g]
                reqs = []
                for i, sid in enumerate(sids):
                    cols = feed.columns(g * per_group + i, 1, start=seq - 1)
                    reqs.append(
                        pb.GetActionRequest(
                            session_id=sid, seq=seq, steps=encode_steps({k: v[0] for k, v in cols.items()})
                        )
                    )
                sent = time.monotonic()
                reply = await stub.BatchGetAction(pb.BatchGetActionRequest(requests=reqs), timeout=60)
                samples.append((sent, time.monotonic() - sent))
                for r in reply.results:
                    if r.HasField("error"):
                        failures.append(r.error.message)
                    else:
                        versions.add(r.response.model_version)
                        state.cuts += r.response.context_truncated

    await asyncio.gather(*(worker(g) for g in range(len(state.sids))))
    return samples, failures, versions


async def learner(
    target: str, sources: list[Path], updates: int, interval: float
) -> list[tuple[float, float]]:
    """Push `updates` updates (alternating `sources`); returns their (start, end) times."""
    spans = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        for k in range(updates):
            await asyncio.sleep(interval)
            started = time.monotonic()
            req = pb.UpdateModelRequest(source=str(sources[k % 2]), tag=f"update-{k}")
            await stub.UpdateModel(req, metadata=ADMIN)
            spans.append((started, time.monotonic()))
    return spans


def run_policy(
    args: argparse.Namespace, policy: str, path: Path, other: Path, admin: Path
) -> dict[str, float]:
    spec = feed_spec(args.shape)
    feed = Feed(spec["obs_dim"], spec["max_time"], spec["num_actions"])
    log = Path(tempfile.mkdtemp()) / "server.log"
    extra = ["--admin-token-file", str(admin), "--on-update", policy, "--context-policy", "sliding"]
    server = BenchServer(
        sys.executable,
        path,
        device="cpu",
        dtype="float32",
        max_sessions=args.sessions,
        max_context_steps=args.context,
        threads=args.threads or 2,
        log_path=log,
        metrics=False,
        extra_args=extra,
    ).start()
    state = Groups(args.groups, args.sessions // args.groups)

    async def phase(seconds: float, with_updates: bool) -> tuple[list, list, set, list]:
        stop = asyncio.Event()
        work = asyncio.create_task(traffic(server.target, feed, state, stop))
        spans: list[tuple[float, float]] = []
        if with_updates:
            spans = await learner(server.target, [other, path], args.updates, args.interval)
            await asyncio.sleep(args.interval)
        else:
            await asyncio.sleep(seconds)
        stop.set()
        samples, failures, versions = await work
        return samples, failures, versions, spans

    try:
        asyncio.run(phase(3.0, False))  # warm-up: histories grow, shapes are seen
        base, base_fail, _, _ = asyncio.run(phase(args.baseline_seconds, False))
        rss_before = rss_bytes(server.pid)
        during, fail, versions, spans = asyncio.run(phase(0, True))
        asyncio.run(phase(3.0, False))
        rss_after = rss_bytes(server.pid)
    finally:
        server.stop()
    lat_base = np.array([rt for _, rt in base]) * 1e3
    lat_during = np.array([rt for _, rt in during]) * 1e3
    update_s = [b - a for a, b in spans]
    return {
        "policy": policy,
        "failed": len(base_fail) + len(fail),
        "versions": f"{min(versions)}..{max(versions)}",
        "p50_base": float(np.percentile(lat_base, 50)),
        "p99_base": float(np.percentile(lat_base, 99)),
        "p50_during": float(np.percentile(lat_during, 50)),
        "p99_during": float(np.percentile(lat_during, 99)),
        "update_p50_s": float(np.median(update_s)),
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
        "steps": max(state.seqs),
        "cuts": state.cuts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mid")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument(
        "--groups", type=int, default=4, help="workers, each a BatchGetAction over its sessions"
    )
    parser.add_argument(
        "--context",
        type=int,
        default=1024,
        help="--max-context-steps of the server: more than the steps a session takes in the run, so "
        "that no sliding re-prefill (all sessions at once, seconds on the CPU) lands in a phase",
    )
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between updates")
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--policies", default="keep,refill")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    path, _ = checkpoint(args.shape)
    work = Path(tempfile.mkdtemp())
    other = other_weights(path, work / "other")
    admin = work / "admin.txt"
    admin.write_text("bench-admin\n")
    rows = [run_policy(args, policy, path, other, admin) for policy in args.policies.split(",")]
    print(
        f"updates under traffic: {args.shape} model, {args.sessions} sessions in {args.groups} BatchGetAction "
        f"workers, {args.updates} updates every {args.interval} s (alternating two checkpoints), context "
        f"<= {args.context} steps"
    )
    print(
        "| on-update | failed | versions seen | p50 / p99 ms without | p50 / p99 ms during | p99 ratio | update s (p50) | RSS MiB before -> after | steps per session |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["p99_during"] / r["p99_base"]
        growth = r["rss_after_mib"] / r["rss_before_mib"] - 1
        print(
            f"| {r['policy']} | {r['failed']} | {r['versions']} | {r['p50_base']:.1f} / {r['p99_base']:.1f} | "
            f"{r['p50_during']:.1f} / {r['p99_during']:.1f} | {ratio:.2f} {'PASS' if ratio <= 2 else 'MISS'} | "
            f"{r['update_p50_s']:.3f} | {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} "
            f"({growth:+.1%}) {'PASS' if growth <= 0.05 else 'MISS'} | {r['steps']} |"
        )
        if r["cuts"]:
            print(
                f"warning: {r['cuts']} replies cut a context ({r['policy']}): raise --context above the steps"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
