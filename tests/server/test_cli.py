"""The `mouse-serve` command line: flags, environment variables, start-up errors, shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mouse_client import ActionClient, ActionError
from tests.helpers import golden_cases
from tests.server.conftest import golden_model_args
from tests.server_process import REPO, ServerProcess, run_cli, server_python

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")


MODEL = str(CASE.checkpoint)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "--model is required (or MOUSE_SERVE_MODEL)"),
        (["--model", f"a={MODEL}", "--model", f"a={MODEL}"], {}, "model names must be unique"),
        (["--model", f"bad name={MODEL}"], {}, "model name 'bad name' must match"),
        (["--model", MODEL, "--device", "gpu"], {}, "--device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--model", MODEL, "--dtype", "float64"], {}, "--dtype: 'float64' is not one of auto, float32"),
        (["--model", MODEL, "--max-sessions", "0"], {}, "--max-sessions: 0 is below the minimum 1"),
        (["--model", MODEL, "--max-sessions", "2.5"], {}, "--max-sessions: '2.5' is not an integer"),
        (
            ["--model", MODEL, "--tls-cert", MODEL + "/config.json"],
            {},
            "--tls-cert and --tls-key go together",
        ),
        (["--model", MODEL, "--context-policy", "drop"], {}, "--context-policy: 'drop' is not one of"),
        (
            ["--model", MODEL, "--max-batch-wait-ms", "-1"],
            {},
            "--max-batch-wait-ms: -1 is below the minimum 0",
        ),
        (["--model", MODEL, "--threads", "-2"], {}, "--threads: -2 is below the minimum 0"),
        # type, range, choice and path errors from the environment pass the same checks
        (["--model", MODEL], {"MOUSE_SERVE_PORT": "abc"}, "MOUSE_SERVE_PORT: 'abc' is not an integer"),
        (
            ["--model", MODEL],
            {"MOUSE_SERVE_IDLE_TIMEOUT": "nan"},
            "MOUSE_SERVE_IDLE_TIMEOUT: 'nan' is not a finite",
        ),
        (
            ["--model", MODEL],
            {"MOUSE_SERVE_CONTEXT_POLICY": "bogus"},
            "MOUSE_SERVE_CONTEXT_POLICY: 'bogus' is not one of sliding, reset, reject",
        ),
        (
            ["--model", MODEL],
            {"MOUSE_SERVE_DECODE_GRAPHS": "maybe"},
            "MOUSE_SERVE_DECODE_GRAPHS: 'maybe' is not one of auto, on, off",
        ),
        (["--model", MODEL], {"MOUSE_SERVE_TOKEN_FILE": "/no/such/file"}, "there is no file /no/such/file"),
        (
            [],
            {"MOUSE_SERVE_MODEL": "./no/such/dir"},
            "MOUSE_SERVE_MODEL: './no/such/dir': there is no folder",
        ),
        (["--model", MODEL, "--port", "70000"], {}, "--port: 70000 is above the maximum 65535"),
        (["--model", MODEL, "--max-message-bytes", "3000000000"], {}, "is above the maximum 2147483647"),
        (["--model", "~/no-such-checkpoint"], {}, "there is no folder ~/no-such-checkpoint"),
        (["--model", "~no-such-user-0/ckpt"], {}, "there is no folder ~no-such-user-0/ckpt"),
        (["--model", "a" * 300], {}, "File name too long"),
        (["--model", MODEL, "--token-file", "/tmp/" + "a" * 300 + "/t"], {}, "File name too long"),
        (["--model", MODEL, "--metrics-port", "50051"], {}, "--metrics-port 50051 is the gRPC port too"),
        (["--model", MODEL, "--execution", "packed,threads=1,threads=2"], {}, "--execution: execution path"),
        (["--model", MODEL, "--device", "cpu", "--execution", "graphs"], {}, "is a CUDA path"),
        (
            ["--model", MODEL, "--threads", "1", "--execution", "packed,threads=2"],
            {},
            "more threads than --threads 1",
        ),
        (["--model", MODEL, "--execution", "packed,threads=4096"], {}, "more threads than this machine's"),
        (["--model", MODEL, "--execution", "plain,threads=1,compiled"], {}, "needs --compile on"),
        (
            ["--model", MODEL, "--compile", "on", "--execution", "plain,threads=1"],
            {},
            "--compile on has no effect",
        ),
    ],
)
def test_invalid_settings_are_one_line_errors_before_any_model_loads(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli(args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "loaded model" not in result.stderr


def test_busy_port_is_an_error_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["--model", MODEL, "--port", str(port)])
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "loaded model" not in result.stderr and "Traceback" not in result.stderr


def test_version_and_help() -> None:
    result = run_cli(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("mouse-serve ")
    usage = run_cli(["--help"]).stdout
    assert usage.startswith("usage: mouse-serve --model [NAME=]PATH_OR_REPO")
    assert "default: 16777216 (16 MiB)" in " ".join(usage.split())


def test_readme_settings_table_is_generated_from_the_config() -> None:
    from mouse_serve.config import markdown_table

    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "run: python scripts/gen_docs.py"


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
        (
            ["--model", "default=" + MODEL, "--model", "other=" + MODEL, "--device", "cuda:0"],
            "CUDA is not available",
        ),
        (["--model", str(CASE.checkpoint), "--device", "cuda:0"], "CUDA is not available"),
        (
            ["--model", str(CASE.checkpoint), "--device", "auto", "--execution", "graphs"],
            "--execution graphs is a CUDA path, but --device auto found no CUDA device",
        ),
    ],
)
def test_start_up_errors_exit_1(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "loaded model" not in result.stderr


def test_ctrl_c_while_loading_exits_130_without_a_traceback() -> None:
    """SIGINT during the start-up measurement (as during a long compile) stops the server at once."""
    args = [*golden_model_args(), "--autotune", "on", "--port", "0"]
    proc = subprocess.Popen(
        [server_python(), "-m", "mouse_serve", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "measuring" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    log = "".join(lines) + rest
    assert proc.returncode == 130, log
    assert "interrupted before serving" in log and "Traceback" not in log, log
    assert "listening on" not in log


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
