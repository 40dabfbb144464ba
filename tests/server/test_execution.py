"""Execution paths and the start-up measurement, on a real model runner in-process.

Every path the measurement can choose (packed or plain linears, each thread count, the compiled
dense blocks, the fixed-shape decode) returns the reference's greedy actions on the golden cases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mouse_serve import autotune
from mouse_serve.autotune import ExecutionChoice, ExecutionPath, ExecutionTable
from mouse_serve.config import ModelSpec
from mouse_serve.decode_graphs import bucket_length, length_buckets
from mouse_serve.runner import ModelRunner, WorkItem
from tests.helpers import GoldenCase, golden_cases

CASES = [c for c in golden_cases() if c.name != "none_discrete_sp"]  # the backbone models
GQA = next(c for c in CASES if c.name == "llama_gqa_long")


def load(case: GoldenCase, **kw: object) -> ModelRunner:
    spec = ModelSpec(case.name, str(case.checkpoint))
    args: dict[str, object] = {"max_sessions": 6, "max_context_steps": 32, "prefill_chunk_steps": 4}
    return ModelRunner.load(spec, device="cpu", dtype="float32", **{"autotune": "off", **args, **kw})  # type: ignore[arg-type]


def greedy_rows(
    runner: ModelRunner, case: GoldenCase, rows: list[int], gaps: bool = False
) -> dict[int, list[int]]:
    """Step the given golden rows one step at a time, batched together; greedy actions per row.
    With `gaps`, an unused slot lies between any two rows' slots."""
    slots, spare = {}, []
    for b in rows:
        slots[b] = runner.pool.allocate()
        if gaps:
            spare.append(runner.pool.allocate())
    got: dict[int, list[int]] = {b: [] for b in rows}
    try:
        for s in range(case.steps):
            items = [
                WorkItem(
                    slots[b],
                    {k: v[b, s : s + 1].copy() for k, v in case.input_arrays.items()},
                    1,
                    s == 0,
                    0.0,
                    runner.model.max_num_actions,
                    0,
                    s + 1,
                    False,
                )
                for b in rows
            ]
            for b, result in zip(rows, runner.run(items), strict=True):
                got[b].append(result.action)
    finally:
        for slot in [*slots.values(), *spare]:
            runner.pool.free(slot)
    return got


def check_golden(runner: ModelRunner, case: GoldenCase) -> None:
    rows = list(range(case.batch))
    # Consecutive slots (attention's grid in token order), then slots with gaps (queries
    # scattered into the grid) in reverse order.
    for gaps in (False, True):
        for b, actions in greedy_rows(runner, case, rows[:: -1 if gaps else 1], gaps).items():
            assert actions == case.greedy(b), f"row {b} on {runner.table.default} (gaps: {gaps})"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_cpu_path_matches_the_golden_actions(case: GoldenCase) -> None:
    runner = load(case, threads=2)
    paths = runner.candidates()
    assert {str(p) for p in paths} >= {"plain,threads=1", "plain,threads=2"}
    if torch.backends.mkldnn.is_available():
        assert {str(p) for p in paths} >= {"packed,threads=1", "packed,threads=2"}
    for path in paths:
        runner.pin(path)
        check_golden(runner, case)
        assert torch.get_num_threads() == path.threads


def test_fixed_shape_decode_matches_the_golden_actions() -> None:
    runner = load(GQA, decode_graphs="on")
    assert runner.graphs is not None
    check_golden(runner, GQA)
    assert runner.graphs._graphs  # the fixed-shape buckets really ran


def test_compiled_dense_blocks_match_the_golden_actions(tmp_path: Path) -> None:
    """The compiled path (torch.compile of the dense blocks, attention eager), with inductor's
    on-disk cache in a folder of our own."""
    runner = load(
        GQA, compile="on", compile_cache=tmp_path / "inductor", execution="plain,threads=1,compiled"
    )
    assert runner.table.default == ExecutionPath(threads=1, compiled=True)
    check_golden(runner, GQA)
    assert any((tmp_path / "inductor").rglob("*"))  # compiled artifacts cached on disk


def test_measurement_chooses_the_fastest_candidate_per_shape(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "autotune.json"
    with caplog.at_level(logging.INFO, logger="mouse_serve.runner"):
        runner = load(GQA, threads=2, autotune="on", autotune_cache=cache)
    choices = runner.execution_choices
    assert [(c.rows, c.context_steps) for c in choices] == runner.shapes()
    assert [(c.rows, c.context_steps) for c in choices] == [(1, 32), (4, 32)]  # 6 sessions, 32 steps
    assert load(GQA, max_sessions=256, max_context_steps=300).shapes() == [
        *((r, 32) for r in (1, 4, 16, 64, 256)),
        *((r, 256) for r in (1, 4, 16, 64)),  # 256 x 256 is measured at the short context only
    ]
    for choice in choices:
        assert set(choice.candidates) == {str(p) for p in runner.candidates()}
        assert choice.step_ms == min(choice.candidates.values()) == choice.candidates[str(choice.path)]
    lines = [r.getMessage() for r in caplog.records if "execution rows=" in r.getMessage()]
    assert len(lines) == len(choices)  # one log line per choice
    assert "measured in" in caplog.text
    # The same model on the same machine: read back from the cache, not measured again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mouse_serve.runner"):
        again = load(GQA, threads=2, autotune="on", autotune_cache=cache)
    assert f"from {cache}" in caplog.text and "measuring" not in caplog.text
    assert [(c.path, c.step_ms) for c in again.execution_choices] == [(c.path, c.step_ms) for c in choices]
    # Another thread count is another measurement, kept beside the first.
    load(GQA, threads=1, autotune="on", autotune_cache=cache)
    assert len(json.loads(cache.read_text())) == 2
    check_golden(again, GQA)


def test_pinned_path_is_checked() -> None:
    with pytest.raises(ValueError, match="more threads"):
        load(GQA, threads=1, execution="plain,threads=4")
    with pytest.raises(ValueError, match="packed\\|plain"):
        ExecutionPath.parse("fast")
    with pytest.raises(ValueError, match="'graphs' or 'eager'"):
        ExecutionPath.parse("packed,threads=1", cuda=True)
    for text in ("packed,threads=2", "plain,threads=1,compiled"):
        assert str(ExecutionPath.parse(text)) == text
    assert str(ExecutionPath.parse("graphs", cuda=True)) == "graphs"


def test_table_lookup_takes_the_nearest_shape() -> None:
    paths = {r: ExecutionPath(packed=r >= 16, threads=1 if r < 64 else 2) for r in (1, 4, 16, 64)}
    choices = [ExecutionChoice(r, c, paths[r], 1.0) for c in (64, 512) for r in paths]
    table = ExecutionTable(choices, ExecutionPath(threads=9))
    assert table.lookup(1, 10) == paths[1]
    assert table.lookup(2, 10) == paths[1]  # 2 is as near to 1 as to 4 (log scale): the lower
    assert table.lookup(3, 10) == paths[4]
    assert table.lookup(40, 600) == paths[64]
    assert table.lookup(1000, 5000) == paths[64]
    # A shape measured at the short context only: the long context takes the same rows' choice.
    short = ExecutionTable(choices[:5], ExecutionPath(threads=9))
    assert short.lookup(64, 600) == paths[64] and short.lookup(1, 600) == paths[1]
    assert ExecutionTable([], ExecutionPath(threads=9)).lookup(5, 5) == ExecutionPath(threads=9)
    assert autotune.row_buckets(1) == [1]
    assert autotune.row_buckets(72) == [1, 4, 16, 64]
    assert autotune.row_buckets(256) == [1, 4, 16, 64, 256]
    assert autotune.row_buckets(200) == [1, 4, 16, 64, 200]
    assert autotune.context_buckets(16) == [16]
    assert autotune.context_buckets(100) == [32, 100]
    assert autotune.thread_counts(6) == [1, 2, 4, 6]


def test_corrupt_cache_is_measured_again(tmp_path: Path) -> None:
    cache = tmp_path / "autotune.json"
    cache.write_text("{not json")
    runner = load(GQA, autotune="on", autotune_cache=cache)
    assert runner.execution_choices
    assert autotune.load_cached(cache, "other key") is None
    data = json.loads(cache.read_text())
    assert len(data) == 1 and np.isfinite(next(iter(data.values()))["choices"][0]["step_ms"])


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["path"].update(threads="2"),
        lambda c: c["path"].update(threads=64),  # more than this runner may use
        lambda c: c["path"].update(compiled=True),  # not a candidate without compile="on"
        lambda c: c.update(rows=0),
        lambda c: c.update(step_ms="x"),
    ],
    ids=["threads-text", "threads-64", "compiled", "rows-0", "step-text"],
)
def test_a_tampered_cache_entry_is_measured_again(tmp_path: Path, tamper: Any) -> None:
    """A cache entry that this runner could not have written is measured again, never used."""
    cache = tmp_path / "autotune.json"
    first = load(GQA, threads=2, autotune="on", autotune_cache=cache).execution_choices
    data = json.loads(cache.read_text())
    entry = next(iter(data.values()))
    tamper(entry["choices"][0])
    cache.write_text(json.dumps(data))
    again = load(GQA, threads=2, autotune="on", autotune_cache=cache)
    assert [c.rows for c in again.execution_choices] == [c.rows for c in first]
    assert all(c.path.threads <= 2 and not c.path.compiled for c in again.execution_choices)
    assert autotune.load_cached(cache, next(iter(data))) is not None  # rewritten whole


def test_an_unwritable_cache_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The measured choices serve even when the cache file cannot be written."""
    with caplog.at_level(logging.WARNING):
        runner = load(GQA, autotune="on", autotune_cache=Path("/proc/self/autotune.json"))
    assert runner.execution_choices
    assert any("cannot write the execution cache" in r.getMessage() for r in caplog.records)


def test_length_buckets_are_the_lengths_a_step_can_pick() -> None:
    """The start-up capture lists the length buckets without trying every token count."""
    for limit in [*range(1, 1100), 4095, 4096, 4097, 98_304, 98_305]:
        assert length_buckets(limit) == sorted({bucket_length(t, limit) for t in range(1, limit + 1)})


def test_prepared_decode_buckets_cover_every_decode_step() -> None:
    """`prepare_all` (what a CUDA runner captures before serving) builds every bucket a decode
    step can reach: sessions on every slot, stepped to the end of the pool, build no other."""
    runner = load(GQA, decode_graphs="on", max_sessions=5, max_context_steps=200)
    graphs = runner.graphs
    assert graphs is not None
    tokens = runner.pool.max_tokens
    assert runner.pool.num_slots == 5 and tokens == 200 * runner.model.tokens_per_step > 256
    # rows: powers of two up to the slot count plus the scratch slot; lengths: 256 up to the pool
    assert graphs.buckets() == [(r, n) for n in (256, tokens) for r in (1, 2, 4, 6)]
    seen: list[tuple[int, int]] = []
    graphs.prepare_all(lambda done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(9)]
    built = set(graphs._graphs)
    assert built == set(graphs.buckets())

    slots = [runner.pool.allocate() for _ in range(5)]
    lengths = dict.fromkeys(slots, 0)
    step = {k: v[0, 0:1].copy() for k, v in GQA.input_arrays.items()}
    for s in range(200):  # slot i steps every (i+1)-th round: every row bucket, every length bucket
        batch = [slot for i, slot in enumerate(slots) if s % (i + 1) == 0]
        items = [
            WorkItem(
                slot,
                step,
                1,
                lengths[slot] == 0,
                0.0,
                runner.model.max_num_actions,
                0,
                lengths[slot] + 1,
                False,
            )
            for slot in batch
        ]
        runner.run(items)
        for slot in batch:
            lengths[slot] += 1
    assert lengths[slots[0]] == 200  # the first session filled its pool slot
    assert set(graphs._graphs) == built
    # with a power of two of sessions no batch needs more rows than sessions (the scratch slot
    # is never in one), so no larger bucket is built
    pow2 = load(GQA, decode_graphs="on", max_sessions=4, max_context_steps=8).graphs
    assert pow2 is not None and pow2.buckets() == [(1, 16), (2, 16), (4, 16)]
