"""Model runner: one loaded model, its KV-cache pool, and the batched forward + sampling.

`ModelRunner.run` executes on the runner's own thread (the scheduler calls it through an
executor) so the event loop keeps accepting requests while the model computes. Everything it
receives is already validated; it only packs arrays, runs the model and samples.

How a forward runs (packed or plain linears, torch threads, compiled dense blocks; on CUDA the
captured decode graphs or eager) is chosen per batch shape from a table measured when the model
loads (`mouse_serve.autotune`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mouse_core import DTYPES, KVCachePool, Model, counter_uniform, load_model, sample_actions
from mouse_serve import autotune
from mouse_serve.autotune import ExecutionChoice, ExecutionPath, ExecutionTable
from mouse_serve.config import ModelSpec
from mouse_serve.decode_graphs import DecodeGraphs

log = logging.getLogger(__name__)

# Context limit of models without a backbone (their output depends on the last step only).
NO_BACKBONE_CONTEXT_STEPS = 1024
# Share of the free device memory the KV pool may take on CUDA (graphs and activations need the rest).
CUDA_POOL_MEMORY_SHARE = 0.9


@dataclass
class WorkItem:
    """Steps to append to one session's sequence, and how to pick its action."""

    slot: int
    steps: dict[str, np.ndarray]  # per field [n, ...], validated
    num_steps: int
    reset: bool  # empty the slot first (context truncation or resync)
    temperature: float
    num_actions: int
    seed: int  # the sampling draw is a function of (seed, seq) only
    seq: int
    want_scores: bool
    version: int = 0  # the weights it was planned for (its session's cache is theirs); 0: any


class StalePlan(Exception):
    """A work item planned for weights that were replaced before it ran: it was not applied
    (leading chunks of a prefill may have been written to its slot), and its session plans
    it again for the new weights."""


@dataclass
class WorkResult:
    action: int
    scores: np.ndarray | None
    model_version: int = 1  # of the weights that ran this forward (chose the action)
    model_tag: str = ""
    oldest_version: int = 0  # of a prefill's first chunk, when its chunks ran under several versions


class RunnerExecutor(ThreadPoolExecutor):
    """The runner thread: one thread for the forwards (and weight swaps) of every model, which
    counts the work in flight so that the event loop may run a small forward itself while nothing
    else is on it (`idle`), saving the two thread hand-offs of an idle server's round trip."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="runner")
        self._in_flight = 0
        self._count = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._count:
            self._in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: object) -> None:
        with self._count:
            self._in_flight -= 1

    @property
    def idle(self) -> bool:
        return self._in_flight == 0


@dataclass
class RunTiming:
    """Where the last `ModelRunner.run` spent its time (`time.perf_counter` stamps, seconds)."""

    started: float = 0.0
    ended: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # pack, forward, sample, unpack


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; `cuda`/`cuda:N` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine.")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present.")
        return torch.device("cuda", index)
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA GPUs that support it (else float16) and float32 on CPU."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ModelRunner:
    """A model on its device with a preallocated KV pool of `max_sessions` slots."""

    def __init__(
        self,
        spec: ModelSpec,
        model: Model,
        max_sessions: int,
        max_context_steps: int,
        prefill_chunk_steps: int,
        threads: int = 0,
        decode_graphs: str = "auto",
        compile: str = "off",
    ) -> None:
        self.spec = spec
        self.model = model
        self.device = model.device
        limit = model.config.max_steps or NO_BACKBONE_CONTEXT_STEPS
        self.max_context_steps = min(max_context_steps, limit) if max_context_steps else limit
        self._check_pool_fits(max_sessions)
        self.pool: KVCachePool = model.new_cache_pool(max_sessions, self.max_context_steps)
        self.prefill_chunk_steps = prefill_chunk_steps
        self.load_seconds = 0.0
        self.version = 1  # of the weights now served: 1 at load, +1 per swap_weights
        self.tag = ""
        self.max_threads = threads or torch.get_num_threads()
        self.cuda = self.device.type == "cuda"
        use_graphs = decode_graphs == "on" or (decode_graphs == "auto" and self.cuda)
        self.graphs = (
            DecodeGraphs(model, self.pool, capture=self.cuda)
            if use_graphs and model.backbone is not None
            else None
        )
        # On CUDA `decode_graphs=auto` lets the measurement pick graphs or eager per shape; `on`
        # forces graphs. On CPU `on` runs the same fixed shapes eagerly (tests use it).
        self._force_graphs = self.graphs is not None and (decode_graphs == "on" or not self.cuda)
        self.compile = compile == "on" and not self.cuda and model.backbone is not None
        self.table = ExecutionTable([], self.default_path())
        self._applied: ExecutionPath | None = None
        self.timing = RunTiming()
        self._on_device = threading.local()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        device: str,
        dtype: str,
        max_sessions: int,
        max_context_steps: int,
        prefill_chunk_steps: int,
        threads: int = 0,
        decode_graphs: str = "auto",
        compile: str = "off",
        compile_cache: Path | None = None,
        autotune: str = "on",
        autotune_cache: Path | None = None,
        execution: str | None = None,
    ) -> ModelRunner:
        """Load `spec`, allocate its pool and choose its execution paths.

        `autotune` "on" measures the candidate paths now (or reads them from `autotune_cache`),
        "off" uses `default_path()`; `execution` pins one path for every shape (no measurement).
        `compile` "on" adds the compiled dense blocks to the CPU candidates; `compile_cache` is
        inductor's on-disk cache folder (so a restart loads the compiled code instead of
        compiling again).
        """
        if compile_cache is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
        dev = resolve_device(device)
        started = time.perf_counter()
        model = load_model(spec.source, device=dev, dtype=resolve_dtype(dtype, dev))
        runner = cls(
            spec, model, max_sessions, max_context_steps, prefill_chunk_steps, threads, decode_graphs, compile
        )
        runner.load_seconds = time.perf_counter() - started
        log.info(
            "loaded model %r from %s in %.1fs: %s backbone, %s on %s, %d parameters, "
            "%d sessions x %d steps (%.1f MiB KV pool)",
            spec.name,
            spec.source,
            runner.load_seconds,
            runner.backbone,
            runner.dtype_name,
            dev,
            runner.num_parameters,
            max_sessions,
            runner.max_context_steps,
            runner.pool.nbytes / 2**20,
        )
        if execution:
            runner.pin(ExecutionPath.parse(execution, cuda=runner.cuda))
        elif autotune == "on":
            runner.tune(autotune_cache)
        runner.warm_up()
        return runner

    # -- facts ------------------------------------------------------------------------------
    @property
    def backbone(self) -> str:
        bb = self.model.config.backbone
        return bb.kind if bb is not None else "none"

    @property
    def dtype_name(self) -> str:
        return str(self.model.backbone_dtype).removeprefix("torch.")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def execution_choices(self) -> list[ExecutionChoice]:
        """The start-up measurement: the path chosen per shape (empty when it did not run)."""
        return self.table.choices

    def _check_pool_fits(self, max_sessions: int) -> None:
        """On CUDA, refuse a KV pool that would not leave room for the forward itself."""
        if self.device.type != "cuda" or self.model.config.backbone is None:
            return
        bb = self.model.config.backbone
        assert bb.head_dim is not None and bb.num_key_value_heads is not None
        tokens = self.max_context_steps * self.model.tokens_per_step
        need = 2 * bb.num_layers * (max_sessions + 1) * bb.num_key_value_heads * tokens * bb.head_dim
        need *= self.model.backbone_dtype.itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > CUDA_POOL_MEMORY_SHARE * free:
            raise ValueError(
                f"the KV pool for {max_sessions} sessions x {self.max_context_steps} steps needs "
                f"{need / 2**30:.1f} GiB but {self.device} has {free / 2**30:.1f} GiB free; "
                "lower --max-sessions or --max-context-steps."
            )

    # -- execution paths --------------------------------------------------------------------
    def default_path(self) -> ExecutionPath:
        """The path without a measurement: all threads, packed linears where they apply; on
        CUDA the captured graphs when enabled."""
        if self.cuda:
            return ExecutionPath(graphs=self.graphs is not None, cuda=True)
        return ExecutionPath(packed=self.model.can_pack_linears(), threads=self.max_threads)

    def candidates(self) -> list[ExecutionPath]:
        """Every path the measurement compares on this runner."""
        if self.cuda:
            if self.graphs is None or self._force_graphs:
                return [self.default_path()]
            return [ExecutionPath(graphs=True, cuda=True), ExecutionPath(cuda=True)]
        packs = [True, False] if self.model.can_pack_linears() else [False]
        paths = [
            ExecutionPath(packed=p, threads=t)
            for p in packs
            for t in autotune.thread_counts(self.max_threads)
        ]
        if self.compile:
            paths += [
                ExecutionPath(threads=t, compiled=True) for t in autotune.thread_counts(self.max_threads)
            ]
        return paths

    def pin(self, path: ExecutionPath) -> None:
        """Use `path` for every shape."""
        if path.compiled and self.model.backbone is None:
            raise ValueError(f"execution path {path}: this model has no backbone to compile.")
        if path.threads > self.max_threads and not self.cuda:
            raise ValueError(
                f"execution path {path}: more threads than --threads allows ({self.max_threads})."
            )
        self.table = ExecutionTable([], path)
        log.info("model %r: execution path %s for every shape (pinned)", self.spec.name, path)

    def shapes(self) -> list[tuple[int, int]]:
        """The (rows, context steps) shapes the measurement times."""
        rows = autotune.row_buckets(self.pool.num_slots)
        contexts = autotune.context_buckets(self.max_context_steps)
        return [
            (r, c) for c in contexts for r in rows if c == contexts[0] or r * c <= autotune.MAX_SHAPE_STEPS
        ]

    def tune(self, cache: Path | None = None) -> None:
        """Measure the candidate paths on this machine (or read them from `cache`)."""
        candidates = self.candidates()
        if len(candidates) == 1:
            self.pin(candidates[0])
            return
        shapes = self.shapes()
        if self.compile:  # compile before timing, with a progress log (minutes on a first start)
            self.warm_up([ExecutionPath(threads=self.max_threads, compiled=True)])
        key = autotune.cache_key(
            model=self.model.config.to_dict(),
            dtype=self.dtype_name,
            device=str(self.device),
            threads=self.max_threads,
            shapes=shapes,
            candidates=[str(c) for c in candidates],
        )
        choices = autotune.load_cached(cache, key) if cache is not None else None
        if choices is not None and (
            {(c.rows, c.context_steps) for c in choices} != set(shapes)
            or any(c.path not in candidates for c in choices)
        ):
            log.warning(
                "model %r: the execution cache %s does not fit these shapes and paths", self.spec.name, cache
            )
            choices = None
        source = f"from {cache}"
        if choices is None:
            started = time.perf_counter()
            log.info(
                "model %r: measuring %d execution paths on %d batch shapes ...",
                self.spec.name,
                len(candidates),
                len(shapes),
            )
            choices = autotune.measure(shapes, candidates, self._probe)
            source = f"measured in {time.perf_counter() - started:.1f}s"
            if cache is not None:
                autotune.store_cached(cache, key, choices, {"model": self.spec.source})
        self.table = ExecutionTable(choices, self.default_path())
        for choice in choices:
            log.info("model %r: execution %s", self.spec.name, choice.describe())
        log.info("model %r: execution paths %s", self.spec.name, source)

    def warm_up(self, paths: list[ExecutionPath] | None = None) -> None:
        """Run one step on every chosen path before serving (compiles, captures), with progress."""
        paths = sorted(self.table.paths) if paths is None else paths
        for i, path in enumerate(paths):
            slow = path.compiled or path.graphs
            if slow:
                log.info("model %r: warming up %s (%d/%d) ...", self.spec.name, path, i + 1, len(paths))
            started = time.perf_counter()
            step, done = self._probe(1, min(8, self.max_context_steps))
            try:
                step(path)
            finally:
                done()
            if slow:
                log.info("model %r: %s ready in %.1fs", self.spec.name, path, time.perf_counter() - started)
        if self.cuda and self.graphs is not None and (self._force_graphs or any(p.graphs for p in paths)):
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Capture every decode bucket before serving: a capture while serving (30-60 ms on an
        H200) would stop every session of the model when a new row or length bucket is first reached."""
        assert self.graphs is not None
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            name = self.spec.name
            if done == 0:
                log.info("model %r: capturing %d decode graphs (rows x context buckets) ...", name, total)
            elif done == total:
                log.info(
                    "model %r: %d decode graphs captured in %.1fs", name, total, time.perf_counter() - started
                )
            elif done % max(total // 4, 1) == 0:
                log.info("model %r: %d/%d decode graphs captured", name, done, total)

        self.graphs.prepare_all(progress)

    def _apply(self, path: ExecutionPath) -> None:
        if not self.cuda and torch.get_num_threads() != path.threads:
            torch.set_num_threads(path.threads)  # per runner thread (OpenMP's setting is per thread)
        if path == self._applied:
            return
        if not self.cuda:
            self.model.use_packed_linears(path.packed)
            if self.model.backbone is not None:
                self.model.backbone.compile_dense(path.compiled)
        self._applied = path

    def _probe(
        self, rows: int, context_steps: int
    ) -> tuple[Callable[[ExecutionPath], None], Callable[[], None]]:
        """A decode step of `rows` sessions at `context_steps` of history, on scratch slots."""
        pool, model = self.pool, self.model
        tps = model.tokens_per_step
        slots = np.array([pool.allocate() for _ in range(rows)])
        fields = {
            f.name: np.zeros(
                (rows, *f.per_step_shape), dtype=np.uint8 if f.name == "obs_image" else _NUMPY[f.kind]
            )
            for f in model.step_schema.fields
        }
        ones = np.ones(rows, dtype=np.int64)
        temperature = np.ones(rows, dtype=np.float32)
        num_actions = np.full(rows, model.max_num_actions, dtype=np.int64)
        uniform = counter_uniform(slots, ones)

        def step(path: ExecutionPath) -> None:
            pool.lengths[slots] = (context_steps - 1) * tps
            self._apply(path)
            with torch.inference_mode():
                _, actions = self._forward(slots, fields, ones, temperature, num_actions, uniform, path)
            actions.cpu()  # waits for the device

        def done() -> None:
            for slot in slots:
                pool.free(int(slot))

        return step, done

    # -- compute (runner thread) ------------------------------------------------------------
    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.to(self.device, non_blocking=True) if self.cuda else tensor

    def _forward(
        self,
        slots: np.ndarray,
        fields: dict[str, np.ndarray],
        counts: np.ndarray,
        temperature: np.ndarray,
        num_actions: np.ndarray,
        uniform: np.ndarray,
        path: ExecutionPath,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and actions of one batched forward (inside inference mode)."""
        graphs = self.graphs
        if graphs is not None and (path.graphs or self._force_graphs) and graphs.fits(slots, counts):
            result = graphs.run(slots, fields, temperature, num_actions, uniform)
            if result is not None:
                return result
        steps = {k: self._tensor(v) for k, v in fields.items()}
        scores = self.model.forward_batch(steps, self.pool, slots, counts)
        self._forward_done = time.perf_counter()
        draws = (self._tensor(a) for a in (temperature, num_actions, uniform))
        return scores, sample_actions(scores, *draws)

    def swap_weights(self, weights: dict[str, torch.Tensor], tag: str) -> int:
        """Copy new weights (already validated and converted to the serving dtype and device)
        into the model's parameters in place; runs on the runner thread, between two forwards.
        Returns the new version."""
        self.model.copy_weights_(weights)
        self.version += 1
        self.tag = tag
        return self.version

    def run(self, items: list[WorkItem]) -> list[WorkResult | None]:
        """Apply every item's steps in one batched forward and sample all actions at once. An
        item planned for other weights than the served ones is not run: its result is None."""
        current = [j for j, item in enumerate(items) if item.version in (0, self.version)]
        if len(current) == len(items):
            return self._run(items)  # type: ignore[return-value]
        results: list[WorkResult | None] = [None] * len(items)
        if current:
            for j, result in zip(current, self._run([items[j] for j in current]), strict=True):
                results[j] = result
        return results

    def _run(self, items: list[WorkItem]) -> list[WorkResult]:
        started = time.perf_counter()
        version, tag = self.version, self.tag
        pool, model, chunk = self.pool, self.model, self.prefill_chunk_steps
        if self.cuda and getattr(self._on_device, "index", None) != self.device.index:
            torch.cuda.set_device(self.device)  # this thread's streams and graphs on our GPU
            self._on_device.index = self.device.index
        tps = model.tokens_per_step
        # Slot order: a batch of consecutive slots is then attention's grid as it is (no scatter).
        order = sorted(range(len(items)), key=lambda j: items[j].slot)
        items = [items[j] for j in order]
        for item in items:
            if item.reset:
                pool.reset(item.slot)
            # Long prefills run their leading chunks alone; the last chunk joins the batch.
            for start in range(0, item.num_steps - chunk, chunk):
                part = {k: self._tensor(v[start : start + chunk]) for k, v in item.steps.items()}
                self._apply(self.table.lookup(chunk, (int(pool.lengths[item.slot]) // tps) + chunk))
                model.forward_batch(part, pool, np.array([item.slot]), np.array([chunk]))
        tails = [(item.num_steps - 1) // chunk * chunk for item in items]
        packed = {
            name: np.concatenate([item.steps[name][tail:] for item, tail in zip(items, tails, strict=True)])
            for name in model.step_schema.names
        }
        slots = np.array([item.slot for item in items])
        counts = np.array([item.num_steps - tail for item, tail in zip(items, tails, strict=True)])
        temperature = np.array([i.temperature for i in items], dtype=np.float32)
        num_actions = np.array([i.num_actions for i in items], dtype=np.int64)
        uniform = counter_uniform([i.seed for i in items], [i.seq for i in items])
        context = int((pool.lengths[slots] // tps + counts).max())
        path = self.table.lookup(int(counts.sum()), context)
        self._apply(path)
        packed_at = self._forward_done = time.perf_counter()
        with torch.inference_mode():
            scores, actions = self._forward(slots, packed, counts, temperature, num_actions, uniform, path)
        actions_host = actions.cpu().numpy()
        scores_host = scores.cpu().numpy() if any(i.want_scores for i in items) else None
        sampled_at = time.perf_counter()
        results: list[WorkResult | None] = [None] * len(items)
        for j, item in enumerate(items):
            scores_j = (
                scores_host[j, : item.num_actions].copy()
                if scores_host is not None and item.want_scores
                else None
            )
            results[order[j]] = WorkResult(int(actions_host[j]), scores_j, version, tag)
        ended = time.perf_counter()
        forwarded = max(self._forward_done, packed_at)  # graphs: forward and sampling in one replay
        self.timing = RunTiming(
            started,
            ended,
            {
                "pack": packed_at - started,
                "forward": forwarded - packed_at,
                "sample": sampled_at - forwarded,
                "unpack": ended - sampled_at,
            },
        )
        return results  # type: ignore[return-value]


_NUMPY = {"int": np.int64, "float": np.float32}
