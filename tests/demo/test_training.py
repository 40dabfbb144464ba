"""The training forward (mouse_core.training) and the demo's training script (demo/train.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from demo import train as train_script
from demo.learning import WINDOWS
from mouse_core import Model, load_model
from mouse_core.training import train_forward
from tests.helpers import GoldenCase, golden_cases

CASES = golden_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_train_forward_matches_the_inference_forward(case: GoldenCase) -> None:
    """Every backbone and embedding layout of the golden cases: the same outputs as the reference."""
    model = load_model(case.checkpoint)
    outputs = train_forward(model, case.inputs)
    assert sorted(outputs) == sorted(case.meta["outputs"])
    for key in case.meta["outputs"]:
        torch.testing.assert_close(outputs[key], case.expected[f"full.{key}"], **case.tolerance)


def test_train_forward_has_gradients_for_every_trained_parameter() -> None:
    torch.manual_seed(0)
    model = Model(train_script.CONFIG)
    steps = {
        "action": torch.randint(0, 5, (2, 6)),
        "reward": torch.rand(2, 6),
        "done": torch.zeros(2, 6, dtype=torch.int64),
        "time": torch.arange(6).expand(2, 6).clone(),
        "obs_continuous": torch.zeros(2, 6, 4),
    }
    out = train_forward(model, steps)["sp"]
    with torch.no_grad():
        expected, _ = model(TensorDict(steps, batch_size=[2, 6]))
    torch.testing.assert_close(out.detach(), expected["sp"], rtol=1e-4, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    unused = {"backbone.embed_tokens.weight", "embedder.type_embedder.embed.weight"}
    for name, param in model.named_parameters():
        if name in unused:
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


TINY = ["--schedule", "20x2x2,40x2x1", "--data-workers", "0", "--warmup", "1"]


def _train(out: Path, *args: str) -> dict:
    threads = torch.get_num_threads()
    try:
        assert train_script.main(["--out", str(out), *TINY, *args]) == 0
    finally:
        torch.set_num_threads(threads)  # the script fixes its own thread count
    return json.loads((out / "metrics.json").read_text())


def test_training_script_is_reproducible_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    first = _train(tmp_path / "a", "--eval-sessions", "3")
    second = _train(tmp_path / "b", "--eval-sessions", "0")  # same weights => same evaluation
    assert [r["loss"] for r in first["training"]["log"]] == [r["loss"] for r in second["training"]["log"]]
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a.config.to_dict() == train_script.CONFIG
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    ev = first["evaluation"]
    assert ev["sessions"] == 3 and list(ev["windows"]) == [f"{lo}-{hi}" for lo, hi in WINDOWS]
    assert "evaluation" not in second and not (tmp_path / "b" / "README.md").exists()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "--schedule 20x2x2,40x2x1" in card and "| 401-500 |" in card


def test_training_batches_do_not_depend_on_the_data_workers() -> None:
    schedule = train_script.parse_schedule("10x2x3,20x1x2")
    inline = list(train_script.batches(3, schedule, workers=0))
    pooled = list(train_script.batches(3, schedule, workers=1))
    assert [b.targets.shape for b in pooled] == [(2, 10, 5)] * 3 + [(1, 20, 5)] * 2
    for a, b in zip(inline, pooled, strict=True):
        assert np.array_equal(a.targets, b.targets)
        assert all(np.array_equal(a.steps[k], b.steps[k]) for k in a.steps)


@pytest.mark.parametrize("text", ["100x32", "0x2x3", "10x2x0", "axbxc", "600x1x1"])
def test_schedule_is_validated(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="STEPS"):
        train_script.parse_schedule(text)
