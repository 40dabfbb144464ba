"""Every Python block of README.md runs against a real server on the demo checkpoint, unless the
line before it marks it `<!-- illustrative: reason -->`."""

from __future__ import annotations

import re

import pytest

from tests.server_process import REPO, ServerProcess

FENCE = re.compile(
    r"(?:^<!-- illustrative: (?P<reason>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```", re.M | re.S
)
README_TARGET = "127.0.0.1:50051"


def blocks() -> list[tuple[int, str | None, str]]:
    text = (REPO / "README.md").read_text()
    return [(text[: m.start("code")].count("\n") + 1, m["reason"], m["code"]) for m in FENCE.finditer(text)]


def test_readme_has_python_blocks() -> None:
    assert len(blocks()) >= 4
    assert all(reason is None or reason.strip() for _, reason, _ in blocks())


@pytest.mark.parametrize(("line", "reason", "code"), blocks(), ids=[f"line{b[0]}" for b in blocks()])
def test_readme_block_runs(line: int, reason: str | None, code: str, adapter_server: ServerProcess) -> None:
    if reason is not None:
        pytest.skip(f"illustrative: {reason}")
    assert README_TARGET in code, "a runnable block talks to the server at the README's address"
    exec(compile(code.replace(README_TARGET, adapter_server.target), f"README.md:{line}", "exec"), {})
