"""Model runner: one loaded model, its KV-cache pool, and the batched forward + sampling.

`ModelRunner.run` executes on the runner's own thread (the scheduler calls it through an
executor) so the event loop keeps accepting requests while the model computes. Everything it
receives is already validated; it only packs arrays, runs the model and samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from mouse_core import DTYPES, KVCachePool, Model, counter_uniform, load_model, sample_actions
from mouse_serve.config import ModelSpec
from mouse_serve.decode_graphs import DecodeGraphs

log = logging.getLogger(__name__)

# Context limit of models without a backbone (their output depends on the last step only).
NO_BACKBONE_CONTEXT_STEPS = 1024
# On CPU a forward below this many FLOPs runs on one thread: its ops are too small for OpenMP's
# fork/join to pay off (mid model, 2 cores: batch 1 takes 4.0 ms on one thread, 6.5 ms on two;
# the two break even at about 32 sessions, 96 tokens, ~0.9 GFLOP).
PARALLEL_MIN_FLOPS = 1e9


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


@dataclass
class WorkResult:
    action: int
    scores: np.ndarray | None
    model_version: int = 1  # of the weights that ran this forward (chose the action)
    model_tag: str = ""
    oldest_version: int = 0  # of a prefill's first chunk, when its chunks ran under several versions


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
    ) -> None:
        self.spec = spec
        self.model = model
        limit = model.config.max_steps or NO_BACKBONE_CONTEXT_STEPS
        self.max_context_steps = min(max_context_steps, limit) if max_context_steps else limit
        self.pool: KVCachePool = model.new_cache_pool(max_sessions, self.max_context_steps)
        self.prefill_chunk_steps = prefill_chunk_steps
        self.device = model.device
        self.packed = model.pack_weights()
        self.load_seconds = 0.0
        self.version = 1  # of the weights now served: 1 at load, +1 per swap_weights
        self.tag = ""
        self.max_threads = threads or torch.get_num_threads()
        self._flops_per_token = 2 * self.num_parameters
        cuda = self.device.type == "cuda"
        use_graphs = decode_graphs == "on" or (decode_graphs == "auto" and cuda)
        self.graphs = (
            DecodeGraphs(model, self.pool, capture=cuda)
            if use_graphs and model.backbone is not None
            else None
        )

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
    ) -> ModelRunner:
        dev = resolve_device(device)
        started = time.perf_counter()
        model = load_model(spec.source, device=dev, dtype=resolve_dtype(dtype, dev))
        runner = cls(
            spec, model, max_sessions, max_context_steps, prefill_chunk_steps, threads, decode_graphs
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

    # -- compute (runner thread) ------------------------------------------------------------
    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _use_threads(self, tokens: int) -> None:
        if self.device.type == "cpu":
            wanted = self.max_threads if tokens * self._flops_per_token >= PARALLEL_MIN_FLOPS else 1
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)

    def swap_weights(self, weights: dict[str, torch.Tensor], tag: str) -> int:
        """Copy new weights (already validated and converted to the serving dtype and device)
        into the model's parameters in place; runs on the runner thread, between two forwards.
        Returns the new version."""
        self.model.copy_weights_(weights)
        self.version += 1
        self.tag = tag
        return self.version

    def run(self, items: list[WorkItem]) -> list[WorkResult]:
        """Apply every item's steps in one batched forward and sample all actions at once."""
        version, tag = self.version, self.tag
        pool, model, chunk = self.pool, self.model, self.prefill_chunk_steps
        self._use_threads(sum(min(i.num_steps, chunk) for i in items) * model.tokens_per_step)
        for item in items:
            if item.reset:
                pool.reset(item.slot)
            # Long prefills run their leading chunks alone; the last chunk joins the batch.
            for start in range(0, item.num_steps - chunk, chunk):
                part = {k: v[start : start + chunk] for k, v in item.steps.items()}
                part = {k: self._tensor(v) for k, v in part.items()}
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
        with torch.inference_mode():
            if self.graphs is not None and self.graphs.fits(slots, counts):
                scores, actions = self.graphs.run(slots, packed, temperature, num_actions, uniform)
            else:
                steps = {k: self._tensor(v) for k, v in packed.items()}
                scores = model.forward_batch(steps, pool, slots, counts)
                draws = (self._tensor(a) for a in (temperature, num_actions, uniform))
                actions = sample_actions(scores, *draws)
        actions_host = actions.cpu().numpy()
        scores_host = scores.cpu().numpy() if any(i.want_scores for i in items) else None
        return [
            WorkResult(
                int(actions_host[j]),
                scores_host[j, : item.num_actions].copy()
                if scores_host is not None and item.want_scores
                else None,
                version,
                tag,
            )
            for j, item in enumerate(items)
        ]
