"""Fixtures: real mouse-serve processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mouse_client import ActionClient
from mouse_core import Model, save_model
from tests.helpers import config_with, golden_cases
from tests.server_process import ServerProcess

CASES = golden_cases()
LONG = 1300  # steps of a prefill that keeps the runner busy with the slow model for about a second


def golden_model_args() -> list[str]:
    """`--model NAME=CHECKPOINT` for every golden case (model name = case name)."""
    args: list[str] = []
    for case in CASES:
        args += ["--model", f"{case.name}={case.checkpoint}"]
    return args


@pytest.fixture(scope="session")
def golden_server() -> Iterator[ServerProcess]:
    with ServerProcess(*golden_model_args(), "--max-sessions", "24", "--autotune", "on") as server:
        yield server


@pytest.fixture(scope="session")
def fixed_shape_server() -> Iterator[ServerProcess]:
    """The CUDA-graph decode layout (fixed shapes, scratch rows), run eagerly on CPU."""
    with ServerProcess(*golden_model_args(), "--max-sessions", "24", "--decode-graphs", "on") as server:
        yield server


@pytest.fixture(params=["ragged", "fixed-shape"])
def any_server(request: pytest.FixtureRequest) -> ServerProcess:
    """Each decode path: the ragged forward, and the fixed-shape one CUDA graphs capture."""
    name = "golden_server" if request.param == "ragged" else "fixed_shape_server"
    return request.getfixturevalue(name)


@pytest.fixture
def client(golden_server: ServerProcess) -> Iterator[ActionClient]:
    with ActionClient(golden_server.target) as c:
        yield c


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model big enough that a long prefill keeps the runner busy for a while."""
    torch.manual_seed(0)
    cfg = config_with(
        hidden_dim=256,
        backbone_kwargs={"num_layers": 4, "num_heads": 8, "num_key_value_heads": 4},
        embedding_kwargs={"max_num_time_steps": 64},
    )
    path = tmp_path_factory.mktemp("slow") / "ckpt"
    save_model(Model(cfg), path)
    return path


def slow_steps(n: int) -> list[dict[str, object]]:
    """`n` step records of the slow model."""
    return [
        {"action": 1, "reward": 0.0, "done": 0, "time": t % 64, "obs_continuous": [0.1, 0.2, 0.3]}
        for t in range(n)
    ]
