"""Step records -> the `Steps` message, and a recorder that turns Gymnasium-style transitions
into step records.

A step record is a mapping of field name to value: Python scalars, lists or numpy arrays, e.g.
`{"action": 2, "reward": 0.5, "done": 0, "time": 7, "obs_continuous": [0.1, -0.3, 0.2]}`.
A list of records is a prefill. Columns are built with numpy, one array per field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from mouse_client.v1 import action_service_pb2 as pb

StepRecord = Mapping[str, Any]
StepRecords = Union[StepRecord, Sequence[StepRecord]]  # noqa: UP007 (py3.10 runtime alias)

FIELDS: dict[str, type] = {
    "action": np.int64,
    "reward": np.float32,
    "done": np.int64,
    "time": np.int64,
    "obs_continuous": np.float32,
    "obs_discrete": np.int64,
    "obs_image": np.uint8,
}


def as_record_list(records: StepRecords) -> list[StepRecord]:
    """One record or a sequence of them, as a list (at least one)."""
    if isinstance(records, Mapping):
        return [records]
    out = list(records)
    if not out or not all(isinstance(r, Mapping) for r in out):
        raise TypeError("expected a step mapping or a non-empty sequence of step mappings.")
    return out


def encode_steps(records: StepRecords) -> pb.Steps:
    """Encode one or more step records as a column-wise `Steps` message."""
    recs = as_record_list(records)
    names = set(recs[0])
    for i, r in enumerate(recs[1:], start=1):
        if set(r) != names:
            raise ValueError(
                f"step {i} has fields {sorted(r)} but step 0 has {sorted(names)}; all steps need the same fields."
            )
    unknown = sorted(names - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown step field(s) {unknown}; expected a subset of {list(FIELDS)}.")
    msg = pb.Steps()
    for name in names:
        values = recs[0][name] if len(recs) == 1 else [r[name] for r in recs]
        column = _column(name, values)
        if name == "obs_image":
            msg.obs_image = column.tobytes()
        else:
            getattr(msg, name).extend(column)
    return msg


def _column(name: str, values: Any) -> np.ndarray:
    """One field's values as a flat array of its wire dtype; never wraps or rounds silently."""
    column = np.asarray(values)
    if FIELDS[name] is np.float32:
        if column.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold numbers, got {values!r}.")
        return column.astype(np.float32).reshape(-1)
    if column.dtype.kind == "f":
        if not (np.all(np.isfinite(column)) and np.all(column == np.round(column))):
            raise ValueError(f"{name} must hold integers, got {values!r}.")
    elif column.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integers, got {values!r}.")
    column = column.astype(np.int64).reshape(-1)
    if name == "obs_image":
        if column.size and (column.min() < 0 or column.max() > 255):
            raise ValueError(
                f"obs_image pixels must be in 0..255, got {int(column.min())}..{int(column.max())}."
            )
        return column.astype(np.uint8)
    return column


class EpisodeRecorder:
    """Builds step records from a Gymnasium-style loop.

    `reset(obs)` gives the record that starts an episode (previous action `first_action`,
    reward 0, done 0, time 0); `step(action, obs, reward, terminated, truncated)` gives the
    record after taking `action` (done 1 when terminated, 2 when truncated). The observation
    goes to the model's observation field (`obs_continuous`, `obs_discrete` or `obs_image`), and
    only the fields the model reads are included. `time` is capped at the model's table size.
    """

    def __init__(self, model: pb.ModelInfo, first_action: int = 0) -> None:
        self.fields = {f.name: f for f in model.fields}
        obs = [n for n in ("obs_continuous", "obs_discrete", "obs_image") if n in self.fields]
        self.obs_field = obs[0] if obs else None
        self.first_action = first_action
        self.time = 0

    def _record(self, action: int, obs: Any, reward: float, done: int) -> dict[str, Any]:
        values: dict[str, Any] = {"action": int(action), "reward": float(reward), "done": done}
        if "time" in self.fields:
            values["time"] = min(self.time, self.fields["time"].max_value - 1)
        if self.obs_field is not None:
            values[self.obs_field] = (
                np.asarray(obs).reshape(-1) if self.obs_field != "obs_discrete" else int(obs)
            )
        return {k: v for k, v in values.items() if k in self.fields}

    def reset(self, obs: Any) -> dict[str, Any]:
        self.time = 0
        return self._record(self.first_action, obs, 0.0, 0)

    def step(self, action: int, obs: Any, reward: float, terminated: bool, truncated: bool) -> dict[str, Any]:
        self.time += 1
        return self._record(action, obs, reward, 1 if terminated else 2 if truncated else 0)
