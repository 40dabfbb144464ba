"""d (and e for the reference): PyPI `mouse-core` 0.3.0 (import `mouse`) in-process with its own
KV cache, lockstep batches, the same checkpoint and the same step data as the served sessions.

Runs in the bench-only venv (`bench/refenv.py`): `python bench/reference.py SPEC_JSON`; prints
one JSON object on stdout. Per step: a `[B, 1]` TensorDict of the step records,
`model(step_stream, cache=cache, use_cache=True)`, then `model.get_action(out, temperature)`.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import Feed, summarize, summarize_histories


def _step(cols: dict, s: slice, batch: int, actions: torch.Tensor, dev: torch.device) -> TensorDict:
    width = s.stop - s.start
    data = {k: torch.from_numpy(np.ascontiguousarray(v[:, s])) for k, v in cols.items() if k != "action"}
    data["action"] = actions
    return TensorDict(data, batch_size=(batch, width)).to(dev)


@torch.no_grad()
def lockstep(model, feed: Feed, batch: int, warmup: int, measure: int, temperature: float, dev) -> dict:
    total = warmup + measure
    cols = feed.batch(batch, total)
    cache = None
    actions = torch.zeros(batch, 1, dtype=torch.int64)
    times = []
    for s in range(total):
        t0 = time.perf_counter()
        td = _step(cols, slice(s, s + 1), batch, actions, dev)
        out, cache = model(td, cache=cache, use_cache=True)
        picked = model.get_action(out, temperature=temperature)
        actions = picked.cpu().view(batch, 1)
        t1 = time.perf_counter()
        if s >= warmup:
            times.append(t1 - t0)
    out = summarize(times, batch)
    out.update(batch=batch, history_start=warmup, history_end=total)
    return out


@torch.no_grad()
def history_costs(
    model, feed: Feed, histories: list[int], warmup: int, measure: int, temperature: float, dev
) -> dict[str, dict]:
    """e: one cache per history length, prefilled, then stepped in turn (round robin)."""
    longest = max(histories) + warmup + measure
    cols = feed.batch(1, longest)
    caches = []
    for h in histories:
        prefill_actions = torch.from_numpy(cols["action"][:, :h])
        _, cache = model(_step(cols, slice(0, h), 1, prefill_actions, dev), cache=None, use_cache=True)
        caches.append(cache)
    actions = [torch.zeros(1, 1, dtype=torch.int64) for _ in histories]
    times: list[list[float]] = [[] for _ in histories]
    for i in range(warmup + measure):
        for j, h in enumerate(histories):
            s = h + i
            t0 = time.perf_counter()
            out, caches[j] = model(
                _step(cols, slice(s, s + 1), 1, actions[j], dev), cache=caches[j], use_cache=True
            )
            actions[j] = model.get_action(out, temperature=temperature).cpu().view(1, 1)
            t1 = time.perf_counter()
            if i >= warmup:
                times[j].append(t1 - t0)
    return summarize_histories(histories, times, warmup, measure)


def main() -> int:
    spec = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    import mouse
    from mouse import load_model

    dev = torch.device(spec["device"])
    model = load_model(spec["checkpoint"]).to(dev).eval()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    if dtype != torch.float32:
        model.to(dtype)
    feed = Feed(**spec["feed"])
    version = getattr(mouse, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("mouse-core")
    out: dict = {
        "package": f"mouse-core {version}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "d": {},
        "e": {},
    }
    for batch in spec["batches"]:
        print(f"[reference] d batch {batch}", file=sys.stderr, flush=True)
        out["d"][str(batch)] = lockstep(
            model, feed, batch, spec["warmup"], spec["measure"], spec["temperature"], dev
        )
    print(f"[reference] e histories {spec['histories']}", file=sys.stderr, flush=True)
    out["e"] = history_costs(
        model, feed, spec["histories"], spec["e_warmup"], spec["e_measure"], spec["temperature"], dev
    )
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
