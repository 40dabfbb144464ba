"""Step records -> the `Steps` message, and the builders that turn environment values into a
model's step records.

A step record is a mapping of field name to value: Python scalars, lists, numpy arrays (or
anything `numpy.asarray` takes, such as CPU tensors), e.g.
`{"action": 2, "reward": 0.5, "done": 0, "time": 7, "obs_continuous": [0.1, -0.3, 0.2]}`.
A list of records is a prefill. Columns are built with numpy, one array per field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from mouse_client.errors import ValidationError
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
OBS_FIELDS = ("obs_continuous", "obs_discrete", "obs_image")
TIME_POLICIES = ("clip", "error")


def as_record_list(records: StepRecords) -> list[StepRecord]:
    """One record or a sequence of them, as a list (at least one)."""
    if isinstance(records, Mapping):
        return [records]
    out = list(records) if isinstance(records, Sequence) and not isinstance(records, (str, bytes)) else []
    if not out or not all(isinstance(r, Mapping) for r in out):
        raise ValidationError("expected a step mapping or a non-empty sequence of step mappings.")
    return out


def encode(records: StepRecords) -> tuple[pb.Steps, int]:
    """Encode step records as a column-wise `Steps` message; returns it and the step count."""
    if isinstance(records, Mapping):
        msg = _encode_plain(records)
        if msg is not None:
            return msg, 1
    recs = as_record_list(records)
    names = set(recs[0])
    for i, r in enumerate(recs[1:], start=1):
        if set(r) != names:
            raise ValidationError(
                f"step {i} has fields {sorted(r)} but step 0 has {sorted(names)}; all steps need the same fields."
            )
    unknown = sorted(names - set(FIELDS))
    if unknown:
        raise ValidationError(f"unknown step field(s) {unknown}; expected a subset of {list(FIELDS)}.")
    msg = pb.Steps()
    for name in sorted(names):
        values = recs[0][name] if len(recs) == 1 else [r[name] for r in recs]
        column = _column(name, values)
        if name == "obs_image":
            msg.obs_image = column.tobytes()
        else:
            getattr(msg, name).extend(column)
    return msg, len(recs)


def encode_steps(records: StepRecords) -> pb.Steps:
    """Encode one or more step records as a column-wise `Steps` message."""
    return encode(records)[0]


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64 = (-(2**63), 2**63 - 1)


def _encode_plain(record: StepRecord) -> pb.Steps | None:
    """One record of the usual types (Python ints and floats, numpy arrays of the wire dtype, as
    `RecordBuilder` makes them) straight into `Steps`, with the same values and checks as the
    numpy path; None for anything else (the numpy path reads it, or names what is wrong). An
    environment worker sends one record per step: numpy's per-call cost would be most of it."""
    columns: dict[str, Any] = {}
    for name, value in record.items():
        wire, kind = FIELDS.get(name), type(value)
        if kind is np.ndarray and value.dtype == wire:
            columns[name] = value.tobytes() if name == "obs_image" else value.reshape(-1).tolist()
        elif wire is np.float32 and kind is float and not _FLOAT32_MAX < abs(value) < math.inf:
            columns[name] = [value]  # (a finite value beyond float32 becomes inf in numpy)
        elif wire is np.int64 and kind is int and _INT64[0] <= value <= _INT64[1]:
            columns[name] = [value]
        else:
            return None
    return pb.Steps(**columns) if columns else None


def _column(name: str, values: Any) -> np.ndarray:
    """One field's values as a flat array of its wire dtype; never wraps or rounds silently."""
    try:
        column = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"{name}: cannot read {values!r} as numbers ({exc}).") from None
    if FIELDS[name] is np.float32:
        if column.dtype.kind not in "fiub":
            raise ValidationError(f"{name} must hold numbers, got {values!r}.")
        return column.astype(np.float32).reshape(-1)
    if column.dtype.kind == "f":
        if not (np.all(np.isfinite(column)) and np.all(column == np.round(column))):
            raise ValidationError(f"{name} must hold integers, got {values!r}.")
    elif column.dtype.kind not in "iub":
        raise ValidationError(f"{name} must hold integers, got {values!r}.")
    column = column.astype(np.int64).reshape(-1)
    if name == "obs_image":
        if column.size and (column.min() < 0 or column.max() > 255):
            raise ValidationError(
                f"obs_image pixels must be in 0..255, got {int(column.min())}..{int(column.max())}."
            )
        return column.astype(np.uint8)
    return column


class RecordBuilder:
    """Builds a model's step records from environment values.

    Only the fields the model reads are included (see `ModelInfo.fields`). The observation goes
    to the model's observation field: continuous and image observations are flattened and
    zero-padded to the model's width (wider ones are an error), discrete ones become
    `obs_discrete`. A mapping observation (a Dict space) maps `observation` to
    `obs_continuous`, `observation_discrete` to `obs_discrete` and `observation_image` to
    `obs_image`, as mouse-core's own data path does.

    `time_policy` says what happens to a `time` at or beyond the model's table size
    (`FieldInfo.max_value` of `time`): "clip" (the default) sends the last row, "error" raises.
    """

    def __init__(self, model: pb.ModelInfo, *, time_policy: str = "clip", name: str = "") -> None:
        if time_policy not in TIME_POLICIES:
            raise ValidationError(f"time_policy must be one of {list(TIME_POLICIES)}, got {time_policy!r}.")
        self.fields = {f.name: f for f in model.fields}
        self.time_policy = time_policy
        self.where = f"{name}: " if name else ""

    @property
    def obs_fields(self) -> list[str]:
        return [n for n in OBS_FIELDS if n in self.fields]

    def record(self, *, action: Any, reward: Any, done: Any, time: Any, obs: Any) -> dict[str, Any]:
        values: dict[str, Any] = {"action": int(action), "reward": float(reward), "done": int(done)}
        if "time" in self.fields:
            values["time"] = self.time(int(time))
        values.update(self.observation(obs))
        return {k: v for k, v in values.items() if k in self.fields}

    def time(self, t: int) -> int:
        limit = self.fields["time"].max_value
        if t < limit:
            return t
        if self.time_policy == "clip":
            return limit - 1
        raise ValidationError(
            f"{self.where}time {t} is beyond the model's time table (0..{limit - 1}); "
            "use time_policy='clip' to send the last row instead."
        )

    def observation(self, obs: Any) -> dict[str, Any]:
        """The model's observation field(s) for `obs`."""
        if not self.obs_fields or obs is None:
            return {}
        if isinstance(obs, Mapping):
            keys = {"observation": "obs_continuous", "observation_discrete": "obs_discrete"}
            keys["observation_image"] = "obs_image"
            return {keys[k]: self._fit(keys[k], v) for k, v in obs.items() if keys.get(k) in self.fields}
        return {self._field_for(obs): self._fit(self._field_for(obs), obs)}

    def _field_for(self, obs: Any) -> str:
        names = self.obs_fields
        if len(names) == 1:
            return names[0]
        arr = np.asarray(obs)
        if arr.ndim == 0 and arr.dtype.kind in "iub" and "obs_discrete" in names:
            return "obs_discrete"
        if arr.ndim >= 2 and arr.dtype == np.uint8 and "obs_image" in names:
            return "obs_image"
        return names[0]

    def _fit(self, name: str, obs: Any) -> Any:
        info = self.fields[name]
        if name == "obs_discrete":
            value = np.asarray(obs).reshape(-1)
            if value.size != 1:
                raise ValidationError(
                    f"{self.where}a discrete observation is one integer, got shape {value.shape}."
                )
            state = int(value[0])
            if not 0 <= state < info.max_value:
                raise ValidationError(
                    f"{self.where}discrete observation {state} is outside the model's 0..{info.max_value - 1}."
                )
            return state
        flat = np.asarray(obs, dtype=np.uint8 if name == "obs_image" else np.float32).reshape(-1)
        if flat.size > info.width:
            raise ValidationError(
                f"{self.where}the observation has {flat.size} values but the model's {name} takes {info.width}."
            )
        if flat.size < info.width:
            flat = np.concatenate([flat, np.zeros(info.width - flat.size, flat.dtype)])
        return flat

    def check_spaces(self, observation_space: Any, action_space: Any, max_num_actions: int) -> list[str]:
        """What does not fit between Gymnasium-style spaces and the model (empty: all fits)."""
        problems = []
        n = getattr(action_space, "n", None)
        if n is None or getattr(action_space, "shape", ()) not in ((), None):
            problems.append(
                f"the action space {action_space} is not Discrete; the model chooses one of n actions"
            )
        elif int(getattr(action_space, "start", 0)) != 0:
            problems.append(f"the action space {action_space} does not start at 0")
        elif int(n) > max_num_actions:
            problems.append(f"the env has {int(n)} actions but the model at most {max_num_actions}")
        spaces = getattr(observation_space, "spaces", None)
        items = spaces.items() if isinstance(spaces, Mapping) else [(None, observation_space)]
        for key, space in items:
            problems += self._check_obs_space(key, space)
        return problems

    def _check_obs_space(self, key: str | None, space: Any) -> list[str]:
        if key is not None:
            names = {"observation": "obs_continuous", "observation_discrete": "obs_discrete"}
            names["observation_image"] = "obs_image"
            name = names.get(key)
            if name is None or name not in self.fields:
                return []  # a key the model does not read
        elif not self.obs_fields:
            return []
        else:
            discrete = getattr(space, "n", None) is not None and not getattr(space, "shape", ())
            image = getattr(space, "dtype", None) == np.uint8 and len(getattr(space, "shape", ()) or ()) >= 2
            if discrete and "obs_discrete" in self.fields:
                name = "obs_discrete"
            elif image and "obs_image" in self.fields:
                name = "obs_image"
            else:
                name = self.obs_fields[0]
        info = self.fields[name]
        label = f"observation {key!r}" if key else "the observation"
        if name == "obs_discrete":
            n = getattr(space, "n", None)
            if n is None:
                return [f"{label} ({space}) is not Discrete but the model reads obs_discrete"]
            if int(n) > info.max_value:
                return [f"{label} has {int(n)} states but the model's obs_discrete takes {info.max_value}"]
            return []
        size = int(np.prod(getattr(space, "shape", ()) or (1,)))
        if size > info.width:
            return [f"{label} has {size} values but the model's {name} takes {info.width}"]
        return []


class EpisodeRecorder:
    """Builds step records from a Gymnasium-style loop.

    `reset(obs)` gives the record that starts an episode (previous action `first_action`,
    reward 0, done 0, time 0); `step(action, obs, reward, terminated, truncated)` gives the
    record after taking `action` (done 1 when terminated, 2 when truncated). Observations and
    `time` are fitted to the model as `RecordBuilder` says (`time_policy` "clip" or "error").
    """

    def __init__(
        self, model: pb.ModelInfo, first_action: int = 0, *, time_policy: str = "clip", name: str = ""
    ) -> None:
        self.builder = RecordBuilder(model, time_policy=time_policy, name=name)
        self.first_action = first_action
        self.time = 0

    def reset(self, obs: Any) -> dict[str, Any]:
        self.time = 0
        return self.builder.record(action=self.first_action, reward=0.0, done=0, time=0, obs=obs)

    def step(self, action: int, obs: Any, reward: float, terminated: bool, truncated: bool) -> dict[str, Any]:
        self.time += 1
        done = 1 if terminated else 2 if truncated else 0
        return self.builder.record(action=action, reward=reward, done=done, time=self.time, obs=obs)
