"""c, e (floor) and f: the project's own batched forward + sampling in-process, no gRPC.

Run by `bench/run.py` as a subprocess of the project's venv: `python bench/floor.py SPEC_JSON`;
prints one JSON object on stdout. Per step: the step columns become tensors on the device,
`Model.forward_batch` appends them to every session's slot of a `KVCachePool`, `sample_actions`
draws all actions at once (uniforms from `counter_uniform(seed, step)` like the server) and the
actions come back to the host, to be fed as the next step's `action`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import Feed, rss_bytes, summarize, summarize_histories

from mouse_core import counter_uniform, load_model, sample_actions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lockstep(model, feed: Feed, batch: int, warmup: int, measure: int, temperature: float) -> dict:
    """`batch` sessions from empty: `warmup` steps, then `measure` timed steps."""
    dev = model.device
    total = warmup + measure
    cols = feed.batch(batch, total)
    pool = model.new_cache_pool(batch, total)
    slots = np.array([pool.allocate() for _ in range(batch)])
    ones = np.ones(batch, dtype=np.int64)
    seeds = np.arange(batch, dtype=np.uint64)
    temp = torch.full((batch,), temperature, dtype=torch.float32, device=dev)
    nact = torch.full((batch,), feed.num_actions, dtype=torch.int64, device=dev)
    actions = np.zeros(batch, dtype=np.int64)
    times = []
    for s in range(total):
        t0 = time.perf_counter()
        steps = {
            "time": torch.from_numpy(cols["time"][:, s]).to(dev),
            "action": torch.from_numpy(actions).to(dev),
            "obs_continuous": torch.from_numpy(cols["obs_continuous"][:, s]).to(dev),
            "reward": torch.from_numpy(cols["reward"][:, s]).to(dev),
            "done": torch.from_numpy(cols["done"][:, s]).to(dev),
        }
        uniform = torch.from_numpy(counter_uniform(seeds, np.full(batch, s + 1, dtype=np.uint64))).to(dev)
        with torch.inference_mode():
            scores = model.forward_batch(steps, pool, slots, ones)
            picked = sample_actions(scores, temp, nact, uniform)
        actions = picked.cpu().numpy()
        t1 = time.perf_counter()
        if s >= warmup:
            times.append(t1 - t0)
    out = summarize(times, batch)
    out.update(batch=batch, history_start=warmup, history_end=total)
    del pool
    return out


def history_costs(
    model, feed: Feed, histories: list[int], warmup: int, measure: int, temperature: float
) -> dict[str, dict]:
    """e: one session per history length, each prefilled with `history` steps, then stepped one
    step at a time in turn (round robin), so drift of the machine's speed hits all lengths alike."""
    dev = model.device
    longest = max(histories) + warmup + measure
    pool = model.new_cache_pool(len(histories), longest)
    slots = [np.array([pool.allocate()]) for _ in histories]
    cols = feed.columns(0, longest)
    with torch.inference_mode():
        for h, slot in zip(histories, slots, strict=True):
            prefill = {k: torch.from_numpy(v[:h]).to(dev) for k, v in cols.items()}
            model.forward_batch(prefill, pool, slot, np.array([h]))
    temp = torch.full((1,), temperature, device=dev)
    nact = torch.full((1,), feed.num_actions, dtype=torch.int64, device=dev)
    one = np.ones(1, dtype=np.int64)
    actions = [np.zeros(1, dtype=np.int64) for _ in histories]
    times: list[list[float]] = [[] for _ in histories]
    for i in range(warmup + measure):
        for j, (h, slot) in enumerate(zip(histories, slots, strict=True)):
            s = h + i
            t0 = time.perf_counter()
            steps = {k: torch.from_numpy(v[s : s + 1]).to(dev) for k, v in cols.items() if k != "action"}
            steps["action"] = torch.from_numpy(actions[j]).to(dev)
            uniform = torch.from_numpy(counter_uniform(np.zeros(1, np.uint64), np.array([s + 1], np.uint64)))
            with torch.inference_mode():
                scores = model.forward_batch(steps, pool, slot, one)
                picked = sample_actions(scores, temp, nact, uniform.to(dev))
            actions[j] = picked.cpu().numpy()
            t1 = time.perf_counter()
            if i >= warmup:
                times[j].append(t1 - t0)
    return summarize_histories(histories, times, warmup, measure)


def kv_memory(model, steps: int, sessions: int, geometry: dict) -> dict:
    """f: bytes a pool reserves per session vs the raw K/V bytes of `steps` steps of context."""
    dev = model.device
    tokens = steps * model.tokens_per_step
    rss0 = rss_bytes()
    cuda0 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    pool = model.new_cache_pool(sessions, steps)
    rss1 = rss_bytes()
    cuda1 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    storage = pool.k.untyped_storage().nbytes() + pool.v.untyped_storage().nbytes()
    elem = pool.k.element_size()
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


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    model = load_model(spec["checkpoint"], device=dev, dtype=spec["dtype"])
    packed = model.pack_weights()
    feed = Feed(**spec["feed"])
    out: dict = {"packed_weights": packed, "threads": torch.get_num_threads(), "c": {}, "e": {}}
    # f first, while the heap is fresh: the pool's pages are new to the process (RSS growth).
    steps = spec["warmup"] + spec["measure"]
    out["f"] = kv_memory(model, steps, max(spec["batches"]), spec["geometry"])
    for batch in spec["batches"]:
        print(f"[floor] c batch {batch}", file=sys.stderr, flush=True)
        out["c"][str(batch)] = lockstep(
            model, feed, batch, spec["warmup"], spec["measure"], spec["temperature"]
        )
    print(f"[floor] e histories {spec['histories']}", file=sys.stderr, flush=True)
    out["e"] = history_costs(
        model, feed, spec["histories"], spec["e_warmup"], spec["e_measure"], spec["temperature"]
    )
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
