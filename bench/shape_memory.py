"""Resident memory over forwards of random ragged batch shapes, in-process (no server).

    .venv/bin/python bench/shape_memory.py                 # oneDNN-packed linears, as the server runs
    .venv/bin/python bench/shape_memory.py --plain         # plain F.linear, for comparison
    LRU_CACHE_CAPACITY=64 .venv/bin/python bench/shape_memory.py   # ideep's per-shape cache capped

Each forward advances a random subset of a pool's sequences, one step each, and sometimes one of
them by a prefill of 2-127 steps, so nearly every forward brings a new row count. Prints the RSS
every `--every` forwards: a cache that keeps something per shape shows as steady growth.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mouse_core import load_model  # noqa: E402
from tests.helpers import random_steps  # noqa: E402


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(REPO / "demo" / "checkpoint"))
    parser.add_argument("--forwards", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=88)
    parser.add_argument("--plain", action="store_true", help="do not pre-pack the linear weights")
    args = parser.parse_args(argv)

    model = load_model(args.model).eval()
    if not args.plain:
        model.pack_weights()
    pool = model.new_cache_pool(args.sessions, 256)
    slots = np.array([pool.allocate() for _ in range(args.sessions)])
    rng = np.random.default_rng(0)
    marks, started = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(args.forwards):
            chosen = rng.choice(slots, int(rng.integers(1, args.sessions)), replace=False)
            counts = np.ones(len(chosen), dtype=np.int64)
            if rng.random() < 0.2:
                counts[0] = int(rng.integers(2, 128))
            for slot, n in zip(chosen, counts, strict=True):
                if pool.lengths[slot] + n * model.tokens_per_step > pool.max_tokens:
                    pool.reset(slot)
            model.forward_batch(
                random_steps(model.step_schema, (int(counts.sum()),), seed=i), pool, chosen, counts
            )
            if i % args.every == 0:
                marks.append(round(rss_mib()))
    kind = "plain" if args.plain else "packed"
    print(
        f"{kind} linears, RSS (MiB) every {args.every} forwards: {marks} ({time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
