"""c, e (floor) and f in-process, no gRPC; and the machine's matmul throughput (the FLOP limit).

Run by `bench/run.py` as a subprocess of the project's venv: `python bench/floor.py SPEC_JSON`;
prints one JSON object on stdout. The floor runs the server's own compute path without the
server around it: a `ModelRunner` (the same start-up measurement of execution paths, the same
packing, forward, sampling and, on CUDA, the same captured decode graphs), called once per
lockstep step with one work item per session (uniforms from `counter_uniform(seed, step)` like
the server); the actions come back to the host and are fed as the next step's `action`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import Feed, rss_bytes, summarize, summarize_histories

from mouse_serve.config import ModelSpec
from mouse_serve.runner import ModelRunner, WorkItem


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _items(
    slots: list[int],
    cols: dict[str, np.ndarray],
    s: slice,
    actions: np.ndarray,
    seq: int,
    feed: Feed,
    temperature: float,
) -> list[WorkItem]:
    n = s.stop - s.start
    out = []
    for i, slot in enumerate(slots):
        steps = {k: np.ascontiguousarray(v[i, s]) for k, v in cols.items() if k != "action"}
        steps["action"] = (
            np.full(n, actions[i], dtype=np.int64) if n == 1 else np.ascontiguousarray(cols["action"][i, s])
        )
        out.append(WorkItem(slot, steps, n, False, temperature, feed.num_actions, i, seq, False))
    return out


def lockstep(
    runner: ModelRunner, feed: Feed, batch: int, warmup: int, measure: int, temperature: float
) -> dict:
    """`batch` sessions from empty: `warmup` steps, then `measure` timed steps."""
    total = warmup + measure
    cols = feed.batch(batch, total)
    slots = [runner.pool.allocate() for _ in range(batch)]
    actions = np.zeros(batch, dtype=np.int64)
    times = []
    try:
        for s in range(total):
            t0 = time.perf_counter()
            results = runner.run(_items(slots, cols, slice(s, s + 1), actions, s + 1, feed, temperature))
            actions = np.array([r.action for r in results], dtype=np.int64)
            t1 = time.perf_counter()
            if s >= warmup:
                times.append(t1 - t0)
    finally:
        for slot in slots:
            runner.pool.free(slot)
    out = summarize(times, batch)
    out.update(batch=batch, history_start=warmup, history_end=total)
    return out


def history_costs(
    runner: ModelRunner, feed: Feed, histories: list[int], warmup: int, measure: int, temperature: float
) -> dict[str, dict]:
    """e: one session per history length, each prefilled with `history` steps, then stepped one
    step at a time in turn (round robin), so drift of the machine's speed hits all lengths alike."""
    longest = max(histories) + warmup + measure
    cols = feed.batch(1, longest)
    slots = [runner.pool.allocate() for _ in histories]
    actions = [np.zeros(1, dtype=np.int64) for _ in histories]
    times: list[list[float]] = [[] for _ in histories]
    try:
        for j, (h, slot) in enumerate(zip(histories, slots, strict=True)):
            (result,) = runner.run(_items([slot], cols, slice(0, h), actions[j], 1, feed, temperature))
            actions[j][0] = result.action
        for i in range(warmup + measure):
            for j, (h, slot) in enumerate(zip(histories, slots, strict=True)):
                s = h + i
                t0 = time.perf_counter()
                (result,) = runner.run(
                    _items([slot], cols, slice(s, s + 1), actions[j], i + 2, feed, temperature)
                )
                actions[j][0] = result.action
                t1 = time.perf_counter()
                if i >= warmup:
                    times[j].append(t1 - t0)
    finally:
        for slot in slots:
            runner.pool.free(slot)
    return summarize_histories(histories, times, warmup, measure)


def kv_memory(runner: ModelRunner, steps: int, sessions: int, geometry: dict) -> dict:
    """f: bytes a pool reserves per session vs the raw K/V bytes of `steps` steps of context."""
    model = runner.model
    dev = model.device
    tokens = steps * model.tokens_per_step
    rss0 = rss_bytes()
    cuda0 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    pool = model.new_cache_pool(sessions, steps)
    rss1 = rss_bytes()
    cuda1 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    storage = pool.kv.untyped_storage().nbytes()
    elem = pool.kv.element_size()
    raw = 2 * geometry["layers"] * geometry["kv_heads"] * geometry["head_dim"] * tokens * elem
    out = {
        "context_steps": steps,
        "context_tokens": tokens,
        "dtype_bytes": elem,
        "raw_kv_bytes": raw,
        "pool_bytes_per_slot": int(pool.bytes_per_slot),
        "pool_storage_bytes_per_slot": storage / sessions,
        "ratio": storage / sessions / raw,
        "sessions": sessions,
    }
    if dev.type == "cuda":
        out["device_bytes_growth_per_session"] = (cuda1 - cuda0) / sessions
    else:
        out["rss_growth_per_session"] = (rss1 - rss0) / sessions
    del pool
    return out


def matmul_throughput(
    device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 2.0
) -> dict:
    """The machine's dense matmul rate: the best of repeated `size`^3 products (FLOP/s)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size**3
    best, runs, started = float("inf"), 0, time.perf_counter()
    torch.mm(a, b)  # warm-up
    _sync(device)
    while runs < 3 or (time.perf_counter() - started < seconds and runs < 50):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "runs": runs,
        "flops_per_s": flops / best,
    }


def step_flops(model, batch: int, history_steps: float) -> dict:
    """FLOPs of one decode step of `batch` sessions at `history_steps` of history: every linear
    of the decoder on every new token, the action head on the last token of each step, and
    attention (q·k and p·v over each new token's context)."""
    bb = model.config.backbone
    tps = model.tokens_per_step
    tokens = batch * tps
    decoder = sum(p.numel() for n, p in model.backbone.layers.named_parameters() if p.dim() == 2)
    head = getattr(model, f"{model.action_head}_head")
    head_params = sum(
        p.numel() for n, p in head.named_parameters() if p.dim() == 2 and not n.startswith("target")
    )
    # token t of the step (0-based) attends over history_steps * tps + t + 1 positions
    context = batch * sum(history_steps * tps + t + 1 for t in range(tps))
    attention = 4 * bb.num_layers * bb.num_heads * bb.head_dim * context
    linear = 2 * decoder * tokens + 2 * head_params * batch
    return {"linear": linear, "attention": attention, "total": linear + attention}


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="[floor] %(message)s", stream=sys.stderr)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    total = spec["warmup"] + spec["measure"]
    longest = max(max(spec["histories"]) + spec["e_warmup"] + spec["e_measure"], total) + 8
    runner = ModelRunner.load(
        ModelSpec("floor", spec["checkpoint"]),
        device=spec["device"],
        dtype=spec["dtype"],
        max_sessions=max(max(spec["batches"]), len(spec["histories"])),
        max_context_steps=longest,
        prefill_chunk_steps=256,
        threads=spec["threads"],
        execution=spec.get("execution"),
    )
    model = runner.model
    feed = Feed(**spec["feed"])
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict = {
        "threads": spec["threads"],
        "execution": [c.describe() for c in runner.execution_choices] or [str(runner.table.default)],
        "c": {},
        "e": {},
        "matmul": matmul_throughput(dev, dtype),
    }
    # f first, while the heap is fresh: the pool's pages are new to the process (RSS growth).
    out["f"] = kv_memory(runner, total, max(spec["batches"]), spec["geometry"])
    mean_history = spec["warmup"] + (spec["measure"] - 1) / 2
    for batch in spec["batches"]:
        print(f"[floor] c batch {batch}", file=sys.stderr, flush=True)
        r = lockstep(runner, feed, batch, spec["warmup"], spec["measure"], spec["temperature"])
        r["flops"] = step_flops(model, batch, mean_history)
        r["flops_per_s"] = r["flops"]["total"] / (r["median_ms"] / 1e3)
        out["c"][str(batch)] = r
    print(f"[floor] e histories {spec['histories']}", file=sys.stderr, flush=True)
    out["e"] = history_costs(
        runner, feed, spec["histories"], spec["e_warmup"], spec["e_measure"], spec["temperature"]
    )
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
