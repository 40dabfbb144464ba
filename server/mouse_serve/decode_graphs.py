"""Fixed-shape decode steps, captured in CUDA graphs.

When every item of a batch adds exactly one step, the forward can run on fixed shapes: rows
`0..R-1` of the KV pool (R a power of two covering the batch's slots), each taking one step,
attending over `L` positions (a power of two times 256 covering the longest sequence). Rows
that are not in the batch write into the pool's scratch slot. On CUDA each (R, L) bucket is
captured once in a CUDA graph and replayed with new inputs copied into its buffers, so a step
costs a handful of copies, one replay and one device-to-host read of the actions. Elsewhere the
same fixed-shape forward runs eagerly (tests use that to check its results on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from mouse_core import KVCachePool, Model, sample_actions

log = logging.getLogger(__name__)
MIN_LENGTH_BUCKET = 256
_FIELD_DTYPES = {"int": torch.int64, "float": torch.float32}


def bucket_rows(count: int, limit: int) -> int:
    """The smallest power of two >= `count`, at most `limit`."""
    return min(1 << (count - 1).bit_length(), limit)


def bucket_length(tokens: int, limit: int) -> int:
    length = MIN_LENGTH_BUCKET
    while length < tokens:
        length *= 2
    return min(length, limit)


def length_buckets(limit: int) -> list[int]:
    """Every value `bucket_length(t, limit)` takes for t in 1..limit, smallest first: the
    doublings of MIN_LENGTH_BUCKET below `limit`, then `limit`."""
    lengths, length = [], MIN_LENGTH_BUCKET
    while length < limit:
        lengths.append(length)
        length *= 2
    return [*lengths, limit]


class DecodeGraph:
    """One (rows, length) bucket: static input buffers, the plan, and (on CUDA) the graph."""

    def __init__(
        self, model: Model, pool: KVCachePool, rows: int, length: int, capture_pool: object | None
    ) -> None:
        self.model, self.pool, self.rows = model, pool, rows
        dev = model.device
        self.plan = pool.decode_plan(rows, length, model.tokens_per_step)
        self.steps = {
            f.name: torch.zeros(
                (rows, *f.per_step_shape),
                dtype=torch.uint8 if f.name == "obs_image" else _FIELD_DTYPES[f.kind],
                device=dev,
            )
            for f in model.step_schema.fields
        }
        self.temperature = torch.zeros(rows, device=dev)
        self.num_actions = torch.full((rows,), model.max_num_actions, device=dev)
        self.uniform = torch.zeros(rows, dtype=torch.float64, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture_pool is not None:
            self._capture(capture_pool)

    @torch.inference_mode()
    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.model.score_steps(self.steps, self.pool, self.plan, None)
        return scores, sample_actions(scores, self.temperature, self.num_actions, self.uniform)

    def _capture(self, pool_handle: object) -> None:
        # Scratch-only rows so warm-up and capture write nothing into live sequences.
        self.plan.token_slot.fill_(self.pool.scratch_slot)
        self.plan.positions.copy_(torch.arange(self.rows * self.plan.max_new) % self.plan.max_new)
        self.plan.query_pos.copy_(torch.arange(self.plan.max_new).repeat(self.rows, 1))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: lazy initialisation must not happen during capture
                self.plan.mask = None
                self._compute()
        side.synchronize()
        self.plan.mask = None
        graph = torch.cuda.CUDAGraph()
        # Captured on the same side stream as the warm-up, into the runner's one memory pool;
        # "thread_local" so another runner thread using the GPU meanwhile does not break it.
        with torch.cuda.graph(graph, pool=pool_handle, stream=side, capture_error_mode="thread_local"):
            self.outputs = self._compute()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = graph

    def run(
        self,
        slots: np.ndarray,
        fields: dict[str, np.ndarray],
        temperature: np.ndarray,
        num_actions: np.ndarray,
        uniform: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for `slots` (fields `[n, ...]`, in slot order); returns (scores, actions) `[rows]`."""
        index = torch.from_numpy(slots)
        inputs = [(buffer, fields[name]) for name, buffer in self.steps.items()]
        inputs += [(self.temperature, temperature), (self.num_actions, num_actions), (self.uniform, uniform)]
        for buffer, values in inputs:
            host = torch.zeros(buffer.shape, dtype=buffer.dtype)
            host[index] = torch.from_numpy(values).to(buffer.dtype)
            buffer.copy_(host, non_blocking=True)
        self.pool.fill_decode_plan(self.plan, slots)
        if self.graph is None:
            return self._compute()
        self.graph.replay()
        return self.outputs


class DecodeGraphs:
    """The buckets of one model runner, built on first use (on CUDA all at start-up: `prepare_all`).

    On CUDA all buckets share one graph memory pool. If a capture fails, the failure is logged
    once and every later batch runs eagerly (`run` returns None), instead of retrying it.
    """

    def __init__(self, model: Model, pool: KVCachePool, capture: bool) -> None:
        self.model, self.pool, self.capture = model, pool, capture
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._memory_pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None  # why capturing stopped

    def buckets(self) -> list[tuple[int, int]]:
        """Every (rows, length) bucket a decode step on this pool can use, smallest first: the
        buckets `run` picks for each highest slot + 1 (the scratch slot is never in a batch) and
        each token count."""
        slots = self.pool.num_slots
        rows = sorted({bucket_rows(n, slots + 1) for n in range(1, slots + 1)})
        return [(r, n) for n in length_buckets(self.pool.max_tokens) for r in rows]

    def prepare_all(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Build (capture) every bucket now, so that serving never stops all sessions for a
        capture when a new row or length bucket is first reached. `progress(done, total)`, from
        (0, total) on."""
        buckets = self.buckets()
        for i, (rows, length) in enumerate(buckets):
            if progress is not None:
                progress(i, len(buckets))
            if self._get(rows, length, quiet=True) is None:
                return
        if progress is not None:
            progress(len(buckets), len(buckets))

    def _get(self, rows: int, length: int, quiet: bool = False) -> DecodeGraph | None:
        """The bucket's graph, built (captured) on first use, with a log line unless `quiet`;
        None once a capture has failed."""
        graph = self._graphs.get((rows, length))
        if graph is not None or self.failed is not None:
            return graph
        if not quiet:
            log.info(
                "fixed-shape decode for %d rows x %d tokens (%s)",
                rows,
                length,
                "CUDA graph" if self.capture else "eager",
            )
        try:
            graph = DecodeGraph(self.model, self.pool, rows, length, self._memory_pool)
        except Exception as exc:
            if not self.capture:
                raise
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("capturing the decode graph failed; decode steps run eagerly from now on")
            torch.cuda.synchronize()
            self._graphs.clear()  # never replayed again: give their memory to the eager path
            torch.cuda.empty_cache()
            return None
        self._graphs[(rows, length)] = graph
        return graph

    def fits(self, slots: np.ndarray, num_steps: np.ndarray) -> bool:
        """Whether a batch is a plain decode step (one step per session) that fits the pool."""
        if self.failed is not None:
            return False
        room = self.pool.lengths[slots] + self.model.tokens_per_step <= self.pool.max_tokens
        return bool((num_steps == 1).all() and room.all())

    def run(
        self,
        slots: np.ndarray,
        fields: dict[str, np.ndarray],
        temperature: np.ndarray,
        num_actions: np.ndarray,
        uniform: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One decode step for `slots` (fields `[n, ...]`); returns (scores, actions) `[n]`, or
        None when the bucket's graph could not be captured (the caller runs eagerly)."""
        pool = self.pool
        order = np.argsort(slots)
        rows = bucket_rows(int(slots.max()) + 1, pool.num_slots + 1)
        tokens = int(pool.lengths[slots].max()) + self.model.tokens_per_step
        length = bucket_length(tokens, pool.max_tokens)
        graph = self._get(rows, length)
        if graph is None:
            return None
        scores, actions = graph.run(
            slots[order],
            {k: v[order] for k, v in fields.items()},
            temperature[order],
            num_actions[order],
            uniform[order],
        )
        pool.commit(graph.plan)
        index = torch.from_numpy(slots).to(scores.device)
        return scores[index], actions[index]
