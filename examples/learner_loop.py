"""An online training loop in miniature: environment workers act through mouse-serve while a
learner pushes new weights every few seconds; each worker prints the policy version it acts
with, and the summary shows how well each version played.

The server starts on an untrained model (random weights, the demo model's config). The
"learner" here does not train: each update moves the weights a step further from the random
start towards the trained demo checkpoint (`demo/checkpoint`), so the workers' bandit rewards
rise with the versions they see. A real learner pushes what its optimiser produced, the same way:

    learner.push_weights("default", model.state_dict(), tag=f"step-{step}")

    .venv/bin/python examples/learner_loop.py                       # 20 s, an update every 3 s
    .venv/bin/python examples/learner_loop.py --seconds 10 --every 1.5 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.bandit import NUM_ARMS, BernoulliBandit  # noqa: E402
from demo.learning import step_record  # noqa: E402

TRAINED = REPO / "demo" / "checkpoint"
REPORT_EVERY_S = 1.0


def worker(target: str, index: int, envs: int, seconds: float, out: Any) -> None:
    """`envs` bandits stepped with one BatchGetAction per pull; reports (version, tag, rewards)."""
    from mouse_client import ActionClient

    bandits = [BernoulliBandit() for _ in range(envs)]
    for i, bandit in enumerate(bandits):
        bandit.reset(seed=1000 * index + i)
    with ActionClient(target) as client, client.open_sessions(envs, seed=index, on_update="refill") as group:
        records = [[step_record(0, 0.0, 0)] for _ in bandits]
        stop_at = time.monotonic() + seconds
        last_report, rewards = time.monotonic(), defaultdict(list)
        seen = (0, "")
        while time.monotonic() < stop_at:
            replies = group.get_replies(records, return_scores=False)
            for i, (bandit, reply) in enumerate(zip(bandits, replies, strict=True)):
                arm = int(reply.action)
                _, reward, _, truncated, _ = bandit.step(arm)
                rewards[reply.model_version].append(reward)
                records[i] = [step_record(arm, reward, bandit.t)]
                if truncated:  # a new task: a fresh context for it
                    bandit.reset(seed=int(np.random.default_rng().integers(1 << 30)))
                    group[i].reset()
                    records[i] = [step_record(0, 0.0, 0)]
            version = (replies[0].model_version, replies[0].model_tag)
            if version != seen:
                print(
                    f"  worker {index}: acting with policy version {version[0]} ({version[1] or 'start'})",
                    flush=True,
                )
                seen = version
            if time.monotonic() - last_report > REPORT_EVERY_S:
                out.put((index, {v: (len(r), float(np.sum(r))) for v, r in rewards.items()}))
                rewards.clear()
                last_report = time.monotonic()
        out.put((index, {v: (len(r), float(np.sum(r))) for v, r in rewards.items()}))
    out.put(None)


def interpolated(start: dict[str, Any], end: dict[str, Any], alpha: float) -> dict[str, Any]:
    return {k: (1 - alpha) * start[k] + alpha * end[k] for k in start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the workers act")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between two updates")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--envs", type=int, default=8, help="bandits per worker")
    args = parser.parse_args(argv)

    import torch

    from mouse_client import ActionClient
    from mouse_core import Model, load_model, save_model
    from tests.server_process import ServerProcess

    work = Path(tempfile.mkdtemp(prefix="learner-loop-"))
    trained = load_model(TRAINED)
    torch.manual_seed(0)
    untrained = Model(trained.config)
    save_model(untrained, work / "start")
    token = secrets.token_urlsafe(16)
    (work / "admin.txt").write_text(token + "\n")
    server = ServerProcess(
        "--model", str(work / "start"), "--admin-token-file", str(work / "admin.txt"),
        "--max-sessions", str(args.workers * args.envs + 4),
    ).start()  # fmt: skip
    print(
        f"mouse-serve on {server.target}: an untrained {NUM_ARMS}-armed bandit policy (version 1)", flush=True
    )

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(server.target, w, args.envs, args.seconds, out))
        for w in range(args.workers)
    ]
    pulls: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    try:
        for p in procs:
            p.start()
        start, end = untrained.state_dict(), trained.state_dict()
        updates = max(1, int(args.seconds / args.every) - 1)
        with ActionClient(server.target, token=token) as learner:
            learner.wait_ready(timeout=60)
            started = time.monotonic()
            for k in range(1, updates + 1):
                time.sleep(max(0.0, started + k * args.every - time.monotonic()))
                weights = interpolated(start, end, k / updates)
                version = learner.push_weights("default", weights, tag=f"learner-step-{k}")
                print(
                    f"learner: pushed version {version} (learner-step-{k}, {k / updates:.0%} of the way)",
                    flush=True,
                )
        finished = 0
        while finished < len(procs):
            item = out.get(timeout=120)
            if item is None:
                finished += 1
                continue
            for version, (n, total) in item[1].items():
                pulls[version][0] += n
                pulls[version][1] += total
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        server.stop()
    print("\npolicy version   pulls   mean reward")
    for version in sorted(pulls):
        n, total = pulls[version]
        print(f"  {version:12d} {int(n):7d}   {total / max(n, 1):.3f}")
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        print(f"worker exit codes: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
