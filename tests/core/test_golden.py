"""Parity with the reference implementation on its golden cases, through `load_model`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from mouse_core import load_model
from mouse_core.model import Linear, can_pack_weights
from tests.helpers import GoldenCase, golden_cases

CASES = golden_cases()


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> GoldenCase:
    return request.param


def _stream(case: GoldenCase) -> TensorDict:
    return TensorDict(case.inputs, batch_size=[case.meta["batch"], case.meta["steps"]])


def test_golden_cases_are_present() -> None:
    names = {c.name for c in CASES}
    assert {"llama_sum_dqn", "none_discrete_sp"} <= names
    assert len(CASES) >= 5  # the shipped cases plus tests/fixtures/golden_extra


@torch.no_grad()
def test_full_forward_matches(case: GoldenCase) -> None:
    model = load_model(case.checkpoint)
    out, cache = model(_stream(case))
    assert cache is None
    assert sorted(out.keys()) == sorted(case.meta["outputs"])
    for key in case.meta["outputs"]:
        torch.testing.assert_close(out[key], case.expected[f"full.{key}"], **case.tolerance)


@torch.no_grad()
def test_chunked_incremental_forward_matches(case: GoldenCase) -> None:
    model = load_model(case.checkpoint)
    stream = _stream(case)
    cache, outs, start = None, [], 0
    for chunk in case.meta["chunks"]:
        out, cache = model(stream[:, start : start + chunk], cache=cache, use_cache=True)
        outs.append(out)
        start += chunk
    assert start == case.meta["steps"]
    joined = torch.cat(outs, dim=1)
    for key in case.meta["outputs"]:
        torch.testing.assert_close(joined[key], case.expected[f"incremental.{key}"], **case.tolerance)


@torch.no_grad()
def test_greedy_actions_match(case: GoldenCase) -> None:
    model = load_model(case.checkpoint)
    assert model.action_head == case.meta["action_head"]
    stream = _stream(case)
    greedy, trimmed = [], []
    for s in range(case.meta["steps"]):
        out, _ = model(stream[:, : s + 1])
        greedy.append(model.get_action(out, temperature=0.0))
        trimmed.append(model.get_action(out, temperature=0.0, num_actions=case.meta["num_actions"]))
    assert torch.equal(torch.stack(greedy, 1), case.expected["greedy"])
    assert torch.equal(torch.stack(trimmed, 1), case.expected["greedy_trim"])


@torch.no_grad()
def test_packed_weights_match(case: GoldenCase) -> None:
    """The oneDNN-packed serving path computes the same outputs as the plain one."""
    model = load_model(case.checkpoint)
    packed = model.pack_weights()
    assert packed == torch.backends.mkldnn.is_available()
    out, _ = model(_stream(case))
    for key in case.meta["outputs"]:
        torch.testing.assert_close(out[key], case.expected[f"full.{key}"], **case.tolerance)
    model.to(torch.float32)  # moving the model drops the packed copies
    assert all(getattr(m, "packed", None) is None for m in model.modules())


@torch.no_grad()
@pytest.mark.parametrize(
    ("rows", "uses_packed"),
    [(1, True), (3, True), (8, True), (9, False), (150, False), (192, True), (256, True), (264, False)],
)
def test_packed_linear_shapes(rows: int, uses_packed: bool) -> None:
    """Only up to 8 rows and multiples of 8 up to 256 run on the packed weight (a bounded set of
    oneDNN shapes); any layout of the input works."""
    layer = Linear(96, 40)
    if not can_pack_weights(layer.weight.device, layer.weight.dtype):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    # Pack a different weight so the output shows which path ran.
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(2 * layer.weight, 3)
    weight = 2 * layer.weight if uses_packed else layer.weight
    x = torch.randn(rows, 1, 96, generator=torch.Generator().manual_seed(rows))
    for view in (x[:, 0], x.transpose(0, 1)):
        torch.testing.assert_close(layer(view), F.linear(view, weight, layer.bias), rtol=1e-5, atol=1e-5)
