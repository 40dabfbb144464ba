"""A real server with the demo model and two small models written here, for the adapters'
end-to-end tests (real Gymnasium vector envs and the real mouse-env 0.5.0)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mouse_core import Model, save_model
from tests.helpers import config_with
from tests.server_process import REPO, ServerProcess

DEMO = REPO / "demo" / "checkpoint"


def write_models(root: Path) -> dict[str, Path]:
    """`cartpole`: CartPole's shape (2 actions, 4 observations, a 512-row time table); `cont`:
    4 actions, 6 continuous observations, a 64-row time table; `disc`: 4 actions, 16 discrete
    observations. (The demo checkpoint serves the README; these keep the tests independent of
    what it is trained for.)"""
    torch.manual_seed(0)
    paths = {"cartpole": root / "cartpole", "cont": root / "cont", "disc": root / "disc"}
    cartpole = {"max_num_actions": 2, "max_num_obs_continuous": 4, "max_num_time_steps": 512}
    save_model(Model(config_with(embedding_kwargs=cartpole)), paths["cartpole"])
    save_model(Model(config_with(embedding_kwargs={"max_num_obs_continuous": 6})), paths["cont"])
    disc = config_with(
        embedding_kwargs={
            "include_obs_continuous": False,
            "max_num_obs_continuous": 0,
            "include_obs_discrete": True,
            "max_num_obs_discrete": 16,
        }
    )
    save_model(Model(disc), paths["disc"])
    return paths


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"default": DEMO, **write_models(tmp_path_factory.mktemp("models"))}


@pytest.fixture(scope="session")
def adapter_server(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    admin = tmp_path_factory.mktemp("admin") / "admin.txt"
    admin.write_text("readme-admin-token\n")  # the README's learner example pushes the demo weights
    args = ["--max-sessions", "24", "--admin-token-file", str(admin)]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    with ServerProcess(*args) as server:
        yield server
