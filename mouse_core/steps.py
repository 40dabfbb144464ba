"""The step record a model reads: which fields, their shapes, dtypes and valid ranges.

`StepSchema` is derived from the embedding config and is the single definition of a valid
step. `validate_steps` checks tensors against it (used by `Model.forward`); the server checks
numpy arrays against the same schema before a request reaches a session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from mouse_core.config import NUM_DONE_VALUES, EmbeddingConfig


class StepValidationError(ValueError):
    """A step field is missing, mis-shaped, mistyped or out of range.

    `index` is the flat position of the first offending value in the checked values, when one
    value is at fault (divide by the field's width for the step).
    """

    def __init__(self, field: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message
        self.index = index


@dataclass(frozen=True)
class FieldSpec:
    """One step field. `width == 0` means one scalar per step, else a vector of `width`."""

    name: str
    kind: Literal["int", "float"]
    width: int = 0
    high: int | None = None  # exclusive upper bound for int fields (lower bound is 0)

    @property
    def per_step_shape(self) -> tuple[int, ...]:
        return (self.width,) if self.width else ()

    def describe(self) -> str:
        shape = f"[{self.width}]" if self.width else "scalar"
        if self.kind == "float":
            return f"{shape} finite float"
        return f"{shape} int in [0, {self.high})"


@dataclass(frozen=True)
class StepSchema:
    """The fields a model needs per step, in embedding order."""

    fields: tuple[FieldSpec, ...]

    @classmethod
    def from_embedding(cls, cfg: EmbeddingConfig) -> StepSchema:
        specs = {
            "time": FieldSpec("time", "int", 0, cfg.max_num_time_steps),
            "action": FieldSpec("action", "int", 0, cfg.max_num_actions),
            "obs_continuous": FieldSpec("obs_continuous", "float", cfg.max_num_obs_continuous),
            "obs_discrete": FieldSpec("obs_discrete", "int", 0, cfg.max_num_obs_discrete),
            "obs_image": FieldSpec("obs_image", "int", cfg.max_num_obs_image, 256),
            "reward": FieldSpec("reward", "float"),
            "done": FieldSpec("done", "int", 0, NUM_DONE_VALUES),
        }
        return cls(tuple(specs[m] for m in cfg.modalities))

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def __getitem__(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def check_values(spec: FieldSpec, values: np.ndarray | torch.Tensor | Sequence[float]) -> None:
    """Raise `StepValidationError` unless every value is in range (ints) or finite (floats).

    The error's `index` is the flat position of the first bad value. A flat sequence of Python
    numbers (a few values, as protobuf hands them over) is checked without numpy, whose per-call
    cost would dominate for a single step.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.float() if spec.kind == "float" else values.long()).numpy()
    if spec.kind == "float":
        if isinstance(values, np.ndarray):
            flat = values.reshape(-1)
            bad = None if np.isfinite(flat).all() else int(np.flatnonzero(~np.isfinite(flat))[0])
        else:
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            value = flat[bad] if isinstance(values, np.ndarray) else values[bad]
            raise StepValidationError(spec.name, f"got {value}; expected finite floats.", bad)
        return
    assert spec.high is not None
    high = spec.high
    if isinstance(values, np.ndarray):
        flat = values.reshape(-1)
        if flat.size == 0 or (int(flat.min()) >= 0 and int(flat.max()) < high):
            return
        bad = int(np.flatnonzero((flat < 0) | (flat >= high))[0])
        value = int(flat[bad])
    else:
        if len(values) == 0 or (min(values) >= 0 and max(values) < high):
            return
        bad = next(i for i, v in enumerate(values) if not 0 <= v < high)
        value = int(values[bad])
    raise StepValidationError(spec.name, f"got {value}; expected an integer in [0, {high}).", bad)


def validate_steps(
    schema: StepSchema, steps: Mapping[str, torch.Tensor], batch_shape: tuple[int, ...]
) -> None:
    """Check that `steps` has every field of `schema` with leading shape `batch_shape`.

    Extra keys are ignored (a training TensorDict may carry more than the model reads).
    """
    for spec in schema.fields:
        if spec.name not in steps:
            raise StepValidationError(spec.name, f"missing; the model needs {list(schema.names)}.")
        value = steps[spec.name]
        if not isinstance(value, torch.Tensor):
            raise StepValidationError(spec.name, f"expected a torch.Tensor, got {type(value).__name__}.")
        expected = tuple(batch_shape) + spec.per_step_shape
        if tuple(value.shape) != expected:
            raise StepValidationError(
                spec.name, f"shape {list(value.shape)}; expected {list(expected)} ({spec.describe()})."
            )
        if spec.kind == "int" and (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        ):
            raise StepValidationError(spec.name, f"dtype {value.dtype}; expected an integer dtype.")
        if spec.kind == "float" and not value.is_floating_point():
            raise StepValidationError(spec.name, f"dtype {value.dtype}; expected a floating dtype.")
        check_values(spec, value)
