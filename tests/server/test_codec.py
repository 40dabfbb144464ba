"""decode_many (a batch's entries read together) against decode_steps (one message at a time):
the same arrays and the same errors, on random valid and invalid messages of every golden schema."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mouse_client.v1 import action_service_pb2 as pb
from mouse_core import load_model
from mouse_serve.codec import SMALL_COLUMN, decode_many, decode_steps
from mouse_serve.errors import ServiceError
from tests.helpers import golden_cases

SCHEMAS = {c.name: load_model(str(c.checkpoint)).step_schema for c in golden_cases()}
MAX_STEPS = 6


@st.composite
def messages(draw: st.DrawFn, schema: Any) -> pb.Steps:
    """Mostly valid steps; sometimes a bad value, a wrong length or a field the model lacks."""
    n = draw(st.integers(0, 8))
    fault = draw(st.sampled_from(["none"] * 6 + ["value", "length", "unused", "missing"]))
    msg = pb.Steps()
    names = [f.name for f in schema.fields]
    broken = draw(st.sampled_from(names))
    for spec in schema.fields:
        size = n * max(spec.width, 1)
        if spec.name == broken and fault == "missing":
            continue
        if spec.name == broken and fault == "length":
            size = max(size + draw(st.sampled_from([-1, 1])), 0)
        if spec.kind == "float":
            values = draw(st.lists(st.floats(-3, 3, width=32), min_size=size, max_size=size))
            if spec.name == broken and fault == "value" and size:
                values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([math.nan, math.inf]))
        else:
            assert spec.high is not None
            values = draw(st.lists(st.integers(0, spec.high - 1), min_size=size, max_size=size))
            if spec.name == broken and fault == "value" and size and spec.name != "obs_image":
                values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([-1, spec.high]))
        if spec.name == "obs_image":
            msg.obs_image = bytes(values)
        else:
            getattr(msg, spec.name).extend(values)
    if fault == "unused":
        unused = [name for name in ("obs_discrete", "obs_continuous", "done") if name not in names]
        if unused:
            getattr(msg, unused[0]).append(0)
    return msg


def outcome(decode: Any) -> Any:
    try:
        result = decode()
    except ServiceError as err:
        return err
    return result


def same(a: Any, b: Any) -> None:
    if isinstance(a, ServiceError) or isinstance(b, ServiceError):
        assert isinstance(a, ServiceError) and isinstance(b, ServiceError), (a, b)
        assert (a.code, a.message, a.reason, a.metadata) == (b.code, b.message, b.reason, b.metadata)
        return
    (cols_a, n_a), (cols_b, n_b) = a, b
    assert n_a == n_b and cols_a.keys() == cols_b.keys()
    for name in cols_a:
        x, y = cols_a[name], cols_b[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape) and np.array_equal(x, y), name
        assert x.flags.writeable


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decode_many_matches_decode_steps(name: str, data: st.DataObject) -> None:
    schema = SCHEMAS[name]
    batch = data.draw(st.lists(messages(schema), min_size=1, max_size=12))
    together = decode_many(batch, schema, name, MAX_STEPS)
    for msg, got in zip(batch, together, strict=True):
        same(got, outcome(lambda m=msg: decode_steps(m, schema, name, MAX_STEPS)))


def test_a_batch_of_single_steps_is_read_in_one_pass() -> None:
    """The case a group of environments sends: each entry gets its own rows of the shared
    columns, and a bad value in one entry is that entry's error only."""
    schema = SCHEMAS["llama_sum_dqn"]
    batch = [
        pb.Steps(time=[i], action=[i % 4], obs_continuous=[i, -i, 0.5], reward=[0.1 * i], done=[0])
        for i in range(SMALL_COLUMN)
    ]
    decoded = decode_many(batch, schema, "m", MAX_STEPS)
    for i, (cols, n) in enumerate(decoded):
        assert n == 1 and cols["obs_continuous"].tolist() == [[i, -i, 0.5]] and cols["time"].tolist() == [i]
    batch[3].reward[0] = math.nan
    decoded = decode_many(batch, schema, "m", MAX_STEPS)
    assert isinstance(decoded[3], ServiceError) and "steps.reward: got nan" in decoded[3].message
    assert all(not isinstance(d, ServiceError) for i, d in enumerate(decoded) if i != 3)
