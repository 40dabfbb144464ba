"""Client tests run in a venv without torch too: only mouse_client, grpc, numpy and pytest here.

The server under test is a real process started with `MOUSE_SERVE_PYTHON` (the interpreter
that has the server installed), or this interpreter when it has it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import golden_cases
from tests.server_process import ServerProcess

CASES = {c.name: c for c in golden_cases()}
VARIED = CASES["llama_gqa_long"]
IMAGE = CASES["llama_sum_sv_image"]
DISCRETE = CASES["none_discrete_sp"]


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    args = ["--max-sessions", "16"]
    for case in (VARIED, IMAGE, DISCRETE):
        args += ["--model", f"{case.name}={case.checkpoint}"]
    args += ["--model", f"default={VARIED.checkpoint}"]
    with ServerProcess(*args) as proc:
        yield proc
