"""The shipped demo model (demo/checkpoint) through a real server: it learns bandits in context
and the server gives the actions the checkpoint gives in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from demo import train as train_script
from demo.bandit import HORIZON
from demo.learning import LocalActor, ServedActor, learning_curve
from mouse_client import ActionClient
from mouse_core import ModelConfig, load_model
from tests.server_process import REPO, ServerProcess

CHECKPOINT = REPO / "demo" / "checkpoint"
TASK_SEED = 20_000  # held back: training samples its own tasks, the model card evaluates 10_000 + i


def test_shipped_checkpoint_is_the_training_scripts_and_fits_a_session() -> None:
    """The shipped weights come from `demo/train.py` with its defaults, meet the issue's bar on
    200 held-back tasks, and a whole episode fits the server's default context and the time table."""
    config = ModelConfig.from_dict(json.loads((CHECKPOINT / "config.json").read_text()))
    assert config.to_dict() == train_script.CONFIG
    assert config.max_steps is not None and config.max_steps >= HORIZON + 1  # the default context limit
    assert config.embedding.max_num_time_steps > HORIZON
    metrics = json.loads((CHECKPOINT / "metrics.json").read_text())
    assert metrics["command"] == ".venv/bin/python -m demo.train"
    ev = metrics["evaluation"]
    assert ev["sessions"] >= 200
    assert ev["windows"]["401-500"] <= 0.3 * ev["random"]
    assert ev["windows"]["401-500"] <= 0.5 * ev["windows"]["1-50"]
    assert (CHECKPOINT / "README.md").read_text().count("| 401-500 |") == 1


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--model", str(CHECKPOINT), "--max-sessions", "40") as process:
        yield process


def test_served_model_learns_in_context_and_beats_a_random_policy(server: ServerProcess) -> None:
    sessions = 32
    tasks = [TASK_SEED + i for i in range(sessions)]
    with ActionClient(server.target) as client, client.open_sessions(sessions, seed=100) as group:
        curve = learning_curve(ServedActor(group), tasks, pulls=200, pulls_after_reset=50)
    random, early, late = curve.random_regret, curve.window(1, 50), curve.window(151, 200)
    after_reset = curve.window(1, 50, after_reset=True)
    assert late <= 0.35 * random, (late, random)
    assert late <= 0.5 * early, (late, early)
    assert after_reset >= 2 * late, (after_reset, late)  # a context reset starts the learning over


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_served_actions_equal_in_process_actions(server: ServerProcess, temperature: float) -> None:
    """Sessions played through the server and by the checkpoint in this process pull the same
    arms at every step (the same regret sequence: arm means are distinct)."""
    sessions, pulls, after = 12, 80, 20
    tasks = [TASK_SEED + 100 + i for i in range(sessions)]
    with ActionClient(server.target) as client, client.open_sessions(sessions, seed=7) as group:
        served = learning_curve(ServedActor(group, temperature), tasks, pulls, after)
    local_actor = LocalActor(load_model(CHECKPOINT), sessions, seed=7, temperature=temperature)
    local = learning_curve(local_actor, tasks, pulls, after)
    assert np.array_equal(served.regret, local.regret)
    assert np.array_equal(served.regret_after_reset, local.regret_after_reset)
    assert served.window(41, 80) < served.random_regret  # not a degenerate policy
