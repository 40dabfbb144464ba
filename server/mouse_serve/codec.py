"""Protobuf <-> numpy: decode and validate `Steps`, describe models, encode replies.

Each used column becomes a numpy array in one call and is checked against the model's
`StepSchema` before the request reaches a session (long columns with numpy; the few values of a
single step in plain Python, where numpy's per-call cost would dominate).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mouse_client.v1 import action_service_pb2 as pb
from mouse_core import StepSchema, StepValidationError
from mouse_core.steps import FieldSpec, check_values
from mouse_serve.errors import ServiceError, exhausted, invalid
from mouse_serve.runner import ModelRunner
from mouse_serve.sessions import ActionResult, Session

STEP_FIELDS: dict[str, np.dtype] = {
    "action": np.dtype(np.int64),
    "reward": np.dtype(np.float32),
    "done": np.dtype(np.int64),
    "time": np.dtype(np.int64),
    "obs_continuous": np.dtype(np.float32),
    "obs_discrete": np.dtype(np.int64),
    "obs_image": np.dtype(np.uint8),
}


# Columns up to this many values are read with np.fromiter and checked as the Python numbers
# protobuf gives: for one step, numpy's per-call cost would dominate.
SMALL_COLUMN = 16


@dataclass(frozen=True)
class _Column:
    """How one field of a model's schema is read from `Steps` (precomputed per schema)."""

    spec: FieldSpec
    field: str  # "steps.<name>", for errors
    per_step: int  # values per step
    dtype: np.dtype | None  # None: obs_image's bytes
    floats: bool
    high: int  # exclusive bound of an int field (0 for floats)


_PLANS: dict[int, tuple[StepSchema, tuple[tuple[str, ...], tuple[_Column, ...]]]] = {}


def _plan(schema: StepSchema) -> tuple[tuple[str, ...], tuple[_Column, ...]]:
    """The `Steps` fields `schema` does not use, and how to read each one it does; kept per
    schema object (hashing a schema, as functools.cache would, costs more than the lookup)."""
    cached = _PLANS.get(id(schema))
    if cached is None or cached[0] is not schema:  # the schema is kept, so its id is not reused
        cached = _PLANS[id(schema)] = (schema, _make_plan(schema))
    return cached[1]


def _make_plan(schema: StepSchema) -> tuple[tuple[str, ...], tuple[_Column, ...]]:
    unused = tuple(name for name in STEP_FIELDS if name not in schema.names)
    columns = tuple(
        _Column(
            spec,
            f"steps.{spec.name}",
            max(spec.width, 1),
            None if spec.name == "obs_image" else STEP_FIELDS[spec.name],
            spec.kind == "float",
            spec.high or 0,
        )
        for spec in schema.fields
    )
    return unused, columns


def decode_steps(
    steps: pb.Steps, schema: StepSchema, model: str, max_steps: int
) -> tuple[dict[str, np.ndarray], int]:
    """Validate a `Steps` message against `schema`; returns ({field: [n, ...]}, n).

    Errors name the field (`steps.<name>`) and, for a bad value, the step (0-based) it is in.
    """
    unused, columns = _plan(schema)
    for name in unused:
        if len(getattr(steps, name)):
            raise invalid(
                f"steps.{name} is set but model {model!r} does not use it; it reads {list(schema.names)}.",
                "INVALID_STEPS",
                field=f"steps.{name}",
            )
    # The step count comes from the first field that is present; a missing one is named below.
    first = next((c for c in columns if len(getattr(steps, c.spec.name))), None)
    if first is None:
        raise invalid(
            f"steps is empty: model {model!r} needs at least one step with {list(schema.names)}.",
            "INVALID_STEPS",
            field="steps",
        )
    n = len(getattr(steps, first.spec.name)) // first.per_step
    if n > max_steps:
        raise exhausted(
            f"steps carries {n} steps; at most {max_steps} are accepted per request "
            "(--max-steps-per-request); send a longer history in several requests.",
            "TOO_MANY_STEPS",
            field="steps",
        )
    out: dict[str, np.ndarray] = {}
    for c in columns:
        spec = c.spec
        values = getattr(steps, spec.name)
        size, want = len(values), n * c.per_step
        if size != want or n == 0:
            shape = f"{n} steps x {spec.width}" if spec.width else f"{n} steps"
            if size == 0:
                message = f"{c.field} is missing; model {model!r} needs {spec.describe()} per step ({shape})."
            else:
                message = f"{c.field} has {size} values; expected {want} ({shape})."
            raise invalid(message, "INVALID_STEPS", field=c.field)
        if c.dtype is None:  # obs_image: bytes are 0..255 by construction
            col = np.frombuffer(values, dtype=np.uint8).copy()  # writable, for torch
        elif size <= SMALL_COLUMN:
            # On protobuf's repeated fields np.fromiter takes 1-3 us up to 16 values against 6 us for
            # np.asarray, which has a bulk path that wins from about 48 (8,000 values: 13 us vs 0.7 ms).
            col = np.fromiter(values, c.dtype, count=size)
            ok = all(map(math.isfinite, values)) if c.floats else min(values) >= 0 and max(values) < c.high
            if not ok:
                _check(c, values, n)  # raises, naming the value and its step
        else:
            col = np.asarray(values, c.dtype)
            _check(c, col, n)
        out[spec.name] = col.reshape(n, spec.width) if spec.width else col
    return out, n


def decode_many(
    messages: Sequence[pb.Steps], schema: StepSchema, model: str, max_steps: int
) -> list[tuple[dict[str, np.ndarray], int] | ServiceError]:
    """`decode_steps` of each message: its columns, or its error (a batch's entries).

    Messages of a few steps each are read together: one numpy call per column for all of them,
    and one check, instead of one per message and column; each message gets views of its rows.
    A message that does not fit (an odd length, a long or bytes column), or a batch with a bad
    value anywhere, goes through `decode_steps` one message at a time, for its exact error.
    """
    unused, columns = _plan(schema)
    out: list[Any] = [None] * len(messages)
    bulk, counts = [], []
    for i, steps in enumerate(messages):
        n = len(getattr(steps, columns[0].spec.name)) // columns[0].per_step
        if (
            0 < n * columns[0].per_step <= SMALL_COLUMN
            and n <= max_steps
            and all(
                c.dtype is not None and len(getattr(steps, c.spec.name)) == n * c.per_step for c in columns
            )
            and not any(len(getattr(steps, name)) for name in unused)
        ):
            bulk.append(i)
            counts.append(n)
        else:
            out[i] = _decode_or_error(steps, schema, model, max_steps)
    if not bulk:
        return out
    total = sum(counts)
    read: dict[str, np.ndarray] = {}
    for c in columns:
        name = c.spec.name
        values = itertools.chain.from_iterable(getattr(messages[i], name) for i in bulk)
        flat = np.fromiter(values, c.dtype, count=total * c.per_step)
        ok = bool(np.isfinite(flat).all()) if c.floats else bool(flat.min() >= 0 and flat.max() < c.high)
        if not ok:  # some message has a bad value: each one alone, for its own outcome
            for i in bulk:
                out[i] = _decode_or_error(messages[i], schema, model, max_steps)
            return out
        read[name] = flat.reshape(total, c.spec.width) if c.spec.width else flat
    start = 0
    for i, n in zip(bulk, counts, strict=True):
        out[i] = ({name: col[start : start + n] for name, col in read.items()}, n)
        start += n
    return out


def _decode_or_error(
    steps: pb.Steps, schema: StepSchema, model: str, max_steps: int
) -> tuple[dict[str, np.ndarray], int] | ServiceError:
    try:
        return decode_steps(steps, schema, model, max_steps)
    except ServiceError as err:
        return err


def _check(c: _Column, values: Sequence[float] | np.ndarray, n: int) -> None:
    """`check_values`, its error as INVALID_ARGUMENT naming the field and the step."""
    try:
        check_values(c.spec, values)
    except StepValidationError as exc:
        step = None if exc.index is None else exc.index // c.per_step
        where = "" if step is None or n == 1 else f" at step {step} of {n}"
        raise invalid(f"{c.field}{where}: {exc.detail}", "INVALID_STEPS", field=c.field, step=step) from None


_KIND = {"int": pb.FIELD_KIND_INT, "float": pb.FIELD_KIND_FLOAT}


def model_info(runner: ModelRunner, max_steps_per_request: int) -> pb.ModelInfo:
    model = runner.model
    fields = [
        pb.FieldInfo(
            name=f.name,
            kind=pb.FIELD_KIND_BYTES if f.name == "obs_image" else _KIND[f.kind],
            width=f.width,
            max_value=f.high or 0,
        )
        for f in model.step_schema.fields
    ]
    return pb.ModelInfo(
        name=runner.spec.name,
        source=runner.spec.source,
        fields=fields,
        max_num_actions=model.max_num_actions,
        tokens_per_step=model.tokens_per_step,
        action_head=model.action_head,
        backbone=runner.backbone,
        max_context_steps=runner.max_context_steps,
        dtype=runner.dtype_name,
        device=str(runner.device),
        num_parameters=runner.num_parameters,
        max_steps_per_request=max_steps_per_request,
        model_version=runner.version,
        model_tag=runner.tag,
        execution=execution_choices(runner),
    )


def execution_choices(runner: ModelRunner) -> list[pb.ExecutionChoice]:
    """The start-up measurement's choice per batch shape; without one (pinned or skipped), the
    single path every shape runs, as rows 0 and context 0."""
    choices = runner.execution_choices
    if not choices:
        return [pb.ExecutionChoice(path=str(runner.table.default))]
    return [
        pb.ExecutionChoice(
            rows=c.rows,
            context_steps=c.context_steps,
            path=str(c.path),
            step_ms=c.step_ms,
            candidates=[
                f"{path}={ms:.3f}ms" for path, ms in sorted(c.candidates.items(), key=lambda x: x[1])
            ],
        )
        for c in choices
    ]


def open_reply(session: Session, info: pb.ModelInfo) -> pb.OpenSessionResponse:
    return pb.OpenSessionResponse(
        session_id=session.id,
        model=info,
        start_seq=session.start_seq,
        seed=session.seed,
        temperature=session.temperature,
        num_actions=session.num_actions,
        context_policy=int(session.policy),
        max_context_steps=session.max_context_steps,
        on_update=int(session.on_update),
    )


def action_reply(result: ActionResult, reply: pb.GetActionResponse | None = None) -> pb.GetActionResponse:
    """The GetActionResponse of `result`, written into `reply` when given (a batch's entry, in
    place: building a message and copying it into the batch's costs 3x more)."""
    if reply is None:
        reply = pb.GetActionResponse()
    reply.session_id = result.session_id
    reply.seq = result.seq
    reply.action = result.action
    reply.context_steps = result.context_steps
    reply.context_truncated = result.context_truncated
    reply.model_version = result.model_version
    reply.model_tag = result.model_tag
    if result.scores is not None:
        reply.scores.extend(result.scores.tolist())
    return reply
