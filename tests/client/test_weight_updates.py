"""The client's weight-update calls against a real server (runs without torch too): a learner
pushes a checkpoint file or names a folder, gets the new version, and every reply says which
version acted; a worker's own session policy (`on_update`) is sent at OpenSession."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mouse_client import ActionClient, ActionError, AsyncActionClient, ValidationError
from tests.client.conftest import VARIED
from tests.server_process import ServerProcess

ADMIN = "learner-secret"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    admin = tmp_path_factory.mktemp("admin") / "admin.txt"
    admin.write_text(ADMIN + "\n")
    with ServerProcess("--model", str(VARIED.checkpoint), "--admin-token-file", str(admin)) as proc:
        yield proc


def test_push_and_update_return_the_new_version(admin_server: ServerProcess) -> None:
    with (
        ActionClient(admin_server.target) as worker,
        ActionClient(admin_server.target, token=ADMIN) as learner,
    ):
        session = worker.open_session(temperature=0.0, on_update="keep")
        assert session.opened.on_update == 2  # UPDATE_POLICY_KEEP
        first = session.get_reply(VARIED.step_record(0, 0))
        base = first.model_version
        assert learner.push_weights("default", VARIED.checkpoint, tag="pushed") == base + 1
        weights_file = VARIED.checkpoint / "model.safetensors"
        assert learner.push_weights("default", weights_file, tag="file", chunk_bytes=1000) == base + 2
        assert learner.update_model(source=str(VARIED.checkpoint), tag="folder") == base + 3
        reply = session.get_reply(VARIED.step_record(0, 1))
        assert (reply.model_version, reply.model_tag) == (base + 3, "folder")
        assert learner.model_info().model_version == base + 3
        # the same weights again: the greedy actions stay the golden ones
        assert reply.action == VARIED.greedy(0)[1]
        with pytest.raises(ActionError) as info:
            worker.update_model(source=str(VARIED.checkpoint))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_async_push(admin_server: ServerProcess) -> None:
    import asyncio

    async def scenario() -> int:
        async with AsyncActionClient(admin_server.target, token=ADMIN) as learner:
            before = (await learner.model_info()).model_version
            after = await learner.push_weights("default", VARIED.checkpoint, tag="async")
            return after - before

    assert asyncio.run(scenario()) == 1


def test_client_side_refusals(admin_server: ServerProcess, tmp_path: Path) -> None:
    with ActionClient(admin_server.target, token=ADMIN) as learner:
        with pytest.raises(ValidationError, match="no safetensors file"):
            learner.push_weights("default", tmp_path / "missing")
        with pytest.raises(ValidationError, match="on_update must be one of"):
            learner.open_session(on_update="sometimes")
        if importlib.util.find_spec("torch") is None:
            with pytest.raises(ValidationError, match="needs torch and safetensors"):
                learner.push_weights("default", {"w": object()})
