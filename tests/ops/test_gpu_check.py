"""scripts/gpu_check.sh: fails fast and clearly without a GPU, and runs every step on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import golden_cases

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, time.monotonic() - started


def test_fails_fast_and_clearly_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result, seconds = run(tmp_path, PATH=f"{tmp_path}:/usr/bin:/bin")  # no nvidia-smi on PATH
    assert result.returncode == 2, result.stderr
    assert "FAILED: no NVIDIA GPU here (nvidia-smi not found); this check needs one" in result.stderr
    assert seconds < 30


def test_every_step_runs_on_the_cpu(tmp_path: Path) -> None:
    """The CPU stand-in: probe, SDPA check, a golden end-to-end test, bfloat16 agreement, a tiny
    bench, and the one table."""
    bench = (
        "--quick --shapes mid --skip-reference --sessions 1,2 --batches 1,2 --histories 4,8 "
        "--rpcs batched --workers 1 --warmup 1 --measure 2 --e-warmup 1 --e-measure 2 "
        "--execution plain,threads=1"
    )
    result, _ = run(
        tmp_path,
        MOUSE_GPU_CHECK_DEVICE="cpu",
        # one golden test on the fixed-shape server (the path CUDA graphs capture), which starts
        # without the start-up measurement: the full set runs in the suite itself
        MOUSE_GPU_CHECK_TESTS="test_one_step_at_a_time and fixed-shape and llama_sum_dqn",
        MOUSE_GPU_CHECK_UPDATE_TESTS="keep_extends",
        MOUSE_GPU_CHECK_BENCH_ARGS=bench,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    golden_actions = sum(case.batch * case.steps for case in golden_cases())
    for row in (
        "| card | (cpu)",
        "| SDPA default vs math, decode 64 x 3 tokens, float32 | max diff",
        "| golden end-to-end, float32, actions exact | 1/1 tests passed |",
        "| weight updates, float32, scores after the update | 1/1 tests passed |",
        f"| bfloat16 greedy actions agreeing with the golden ones | 100.0% of {golden_actions} |",
        "| mid: b BatchGetAction, 2 sessions |",
        "| mid: c: floor FLOP/s at 64 / matmul FLOP/s",
    ):
        assert row in table, table
    assert "(ok)" in table and "MISMATCH" not in table
    assert (tmp_path / "table.md").read_text() == table
    # the server's figures for a cover exactly its measured steps (scraped before the first)
    report = json.loads((tmp_path / "bench.json").read_text())
    a = report["results"][0]["a"]
    assert {rpc: r["server_forwards"] for rpc, r in a.items()} == {rpc: r["samples"] for rpc, r in a.items()}

    # A b measurement that failed (as bench/run.py records one, going on with the rest) is named
    # with its reason in both tables, and the other figures stay.
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench_run

    error = RuntimeError("batched worker failed:\nTraceback ...\nActionError: CANCELLED: CANCELLED")
    reason = bench_run.failure(error)
    assert reason == "ActionError: CANCELLED: CANCELLED"
    report["results"][0]["b"]["batched"]["2"] = {"skipped": f"failed: {reason}", "error": str(error)}
    md = bench_run.table(report)
    assert (
        "| b | BatchGetAction, ? procs | 2 | - | - | - | - | failed: ActionError: CANCELLED: CANCELLED |"
        in md
    )
    assert "| b | BatchGetAction, 1 procs × 1 envs (per call) | 1 |" in md
    (tmp_path / "bench.json").write_text(json.dumps(report))
    rerun = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "table", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "| mid: b batched, 2 sessions | failed: ActionError: CANCELLED: CANCELLED |" in rerun.stdout
    assert "| mid: b BatchGetAction, 1 sessions |" in rerun.stdout
    assert rerun.returncode == 0, rerun.stderr

    # Update tests that did not run fail the check.
    (tmp_path / "updates.xml").unlink()
    rerun = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "table", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 1
    assert (
        "| weight updates, float32, scores after the update | did not run (see updates.log) |" in rerun.stdout
    )
