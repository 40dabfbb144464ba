"""The `mouse-serve` command line: flags, environment variables, start-up errors, shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mouse_client import ActionClient, ActionError
from tests.helpers import golden_cases
from tests.server_process import REPO, ServerProcess, run_cli

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "at least one --model is required"),
        (["--model", "a=x", "--model", "a=y"], "model names must be unique"),
        (["--model", "bad name=x"], "model name 'bad name' must match"),
        (["--model", "x", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--model", "x", "--dtype", "float64"], "--dtype must be auto, float32, bfloat16 or float16"),
        (["--model", "x", "--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--model", "x", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--model", "x", "--context-policy", "drop"], "invalid choice: 'drop'"),
        (["--model", "x", "--max-batch-wait-ms", "-1"], "--max-batch-wait-ms must be >= 0"),
        (["--model", "x", "--threads", "-2"], "--threads must be >= 0"),
    ],
)
def test_argument_errors(args: list[str], message: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2
    assert message in result.stderr


SCRIPT = Path(sys.executable).parent / "mouse-serve"


def test_help_lists_environment_variables() -> None:
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for text in ("--model", "MOUSE_SERVE_MAX_SESSIONS", "MOUSE_SERVE_IDLE_TIMEOUT", "--max-context-steps"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "no/such-repo"],
            "'no/such-repo' is not a local folder and could not be loaded from the Hugging Face Hub",
        ),
        (["--model", str(CASE.checkpoint), "--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_start_up_errors_exit_1(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert message in result.stderr


def test_settings_from_environment_variables() -> None:
    env = {"MOUSE_SERVE_MODEL": f"m1={CASE.checkpoint},m2={CASE.checkpoint}", "MOUSE_SERVE_MAX_SESSIONS": "1"}
    with ServerProcess(env=env) as server, ActionClient(server.target) as client:
        assert sorted(m.name for m in client.list_models()) == ["m1", "m2"]
        session = client.open_session("m1")
        with pytest.raises(ActionError, match="RESOURCE_EXHAUSTED: all 1 sessions of model 'm1'"):
            client.open_session("m1")
        client.open_session("m2").close()
        session.close()
    assert "listening on 127.0.0.1:" in server.log


def test_flags_win_over_environment() -> None:
    env = {"MOUSE_SERVE_MAX_SESSIONS": "1", "MOUSE_SERVE_MAX_CONTEXT_STEPS": "5"}
    server = ServerProcess("--model", str(CASE.checkpoint), "--max-sessions", "2", env=env)
    with server, ActionClient(server.target) as client:
        a, b = client.open_session(), client.open_session()
        assert a.opened.max_context_steps == 5
        a.close()
        b.close()


def test_hub_repo_id_served_offline(tmp_path: Path) -> None:
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--gqa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(CASE.checkpoint, repo / "snapshots" / commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    with ServerProcess("--model", "org/gqa", env=env) as server, ActionClient(server.target) as client:
        assert client.model_info().source == "org/gqa"
        with client.open_session(temperature=0.0) as s:
            assert [s.get_action(CASE.step_record(0, t)) for t in range(CASE.steps)] == CASE.greedy(0)


def test_sigterm_drains_and_exits_0() -> None:
    server = ServerProcess("--model", str(CASE.checkpoint), "--grace-period", "5").start()
    with ActionClient(server.target) as client:
        client.open_session().get_action(CASE.step_record(0, 0))
    assert server.stop(signal.SIGTERM) == 0
    assert "shutting down (grace period 5.0s)" in server.log
    assert "stopped" in server.log


def test_console_script_and_module_are_the_same_program() -> None:
    assert "mouse_serve.__main__" in SCRIPT.read_text()
    result = subprocess.run(
        [str(SCRIPT), "--model", "x", "--dtype", "bad"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
    )
    assert result.returncode == 2
