"""Online weight updates: new weights are read, validated and converted off the serving path,
then copied into the served model's parameters between two forwards (on the runner thread).

A source is a checkpoint folder on the server or a Hub repo id (UpdateModel), or a safetensors
file streamed by the caller (PushWeights, staged in a temporary file). The config must equal
the served one in everything but weights; the weights must have exactly the served model's
keys and shapes and be finite. A refused update changes nothing: the old weights keep serving.
At most one update of a model runs at a time, and at most one extra copy of its weights exists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mouse_core import CheckpointError, ConfigError, ModelConfig, read_checkpoint
from mouse_core.checkpoint import local_path
from mouse_serve.errors import ServiceError, failed_precondition, invalid, not_found
from mouse_serve.memory import release_free_memory
from mouse_serve.metrics import Metrics
from mouse_serve.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateOutcome:
    model: str
    version: int
    tag: str
    seconds: float


def upload_limit(runner: ModelRunner) -> int:
    """Largest PushWeights file accepted: the model's weights in float64 plus 1 MiB of header."""
    numel = sum(t.numel() for t in runner.model.state_dict().values())
    return 8 * numel + 2**20


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def check_config(served: ModelConfig, new: ModelConfig) -> None:
    """FAILED_PRECONDITION naming the differing settings unless `new` equals the served config."""
    if served == new:
        return
    a, b = _flat(served), _flat(new)
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differing[:8])
    raise failed_precondition(
        f"the new checkpoint's config differs from the served model's in {len(differing)} setting(s) "
        f"({shown}); only the weights may change.",
        "CONFIG_MISMATCH",
        field=differing[0] if differing else None,
    )


def prepare(runner: ModelRunner, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check `state` against the served model and convert it to the serving dtype and device
    (tensors are taken out of `state` one by one, so at most one extra copy exists)."""
    own = runner.model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise failed_precondition(
            f"the new weights do not fit the served model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} (of {len(own)} tensors).",
            "WEIGHTS_MISMATCH",
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise failed_precondition(
                f"the new weight {key} has shape {list(value.shape)}; the served model's is "
                f"{list(own[key].shape)}.",
                "WEIGHTS_MISMATCH",
                field=key,
            )
        if not value.is_floating_point():
            raise invalid(f"the new weight {key} has dtype {value.dtype}; expected a float dtype.", field=key)
        if not bool(torch.isfinite(value).all()):
            raise invalid(
                f"the new weight {key} holds NaN or infinite values.", "WEIGHTS_NOT_FINITE", field=key
            )
    return {key: state.pop(key).to(device=own[key].device, dtype=own[key].dtype) for key in list(state)}


class ModelUpdater:
    """Applies weight updates to the served models, one at a time per model."""

    def __init__(self, runners: dict[str, ModelRunner], executor: Executor, metrics: Metrics) -> None:
        self.runners = runners
        self.executor = executor
        self.metrics = metrics
        self._locks = {name: asyncio.Lock() for name in runners}

    async def from_source(self, runner: ModelRunner, source: str, revision: str, tag: str) -> UpdateOutcome:
        """Update from a checkpoint folder on this server or a Hub repo id (at `revision`)."""

        def read() -> dict[str, torch.Tensor]:
            here = local_path(source) is not None
            if not source or (not here and (source.startswith((".", "/", "~")) or source.count("/") != 1)):
                raise not_found(
                    f"source {source!r} is not a checkpoint folder on this server nor a Hub repo id "
                    "(org/name).",
                    "CHECKPOINT_NOT_FOUND",
                    field="source",
                )
            try:
                config, state = read_checkpoint(source, revision=revision or None)
            except (CheckpointError, ConfigError, OSError) as exc:
                raise failed_precondition(
                    f"cannot read checkpoint {source!r}: {exc}", "CHECKPOINT_INVALID", field="source"
                ) from None
            check_config(runner.model.config, config)
            return prepare(runner, state)

        where = source + (f"@{revision}" if revision else "")
        return await self._update(runner, read, tag, where)

    async def from_upload(self, runner: ModelRunner, path: Path, tag: str) -> UpdateOutcome:
        """Update from a safetensors file (a checked PushWeights upload)."""

        def read() -> dict[str, torch.Tensor]:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise invalid(
                    f"the upload is not a valid safetensors file ({exc}).", "UPLOAD_NOT_SAFETENSORS"
                ) from None
            return prepare(runner, state)

        return await self._update(runner, read, tag, "an upload")

    async def _update(self, runner: ModelRunner, read: Any, tag: str, where: str) -> UpdateOutcome:
        name = runner.spec.name
        started = time.perf_counter()
        async with self._locks[name]:
            try:
                weights = await asyncio.to_thread(read)
                loop = asyncio.get_running_loop()
                version = await loop.run_in_executor(self.executor, runner.swap_weights, weights, tag)
            except ServiceError as err:
                self.metrics.model_update(name, "refused", time.perf_counter() - started, runner.version)
                log.warning("update of model %r from %s refused: %s", name, where, err.message)
                raise
            except Exception:
                self.metrics.model_update(name, "failed", time.perf_counter() - started, runner.version)
                log.exception("update of model %r from %s failed; the old weights keep serving", name, where)
                raise
            del weights
        release_free_memory()  # the staged copy is gone: give its pages back
        seconds = time.perf_counter() - started
        self.metrics.model_update(name, "ok", seconds, version)
        log.info(
            "updated model %r to version %d from %s (tag %r) in %.2fs", name, version, where, tag, seconds
        )
        return UpdateOutcome(name, version, tag, seconds)
