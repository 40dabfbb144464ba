"""Fixtures: real mouse-serve processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mouse_client import ActionClient
from tests.helpers import golden_cases
from tests.server_process import ServerProcess

CASES = golden_cases()


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
