"""The client SDK against a real server: sessions, streams, batches, asyncio, Gymnasium loops."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from mouse_client import (
    ActionClient,
    ActionError,
    AsyncActionClient,
    EpisodeRecorder,
    GymAdapter,
    MouseClientError,
    ValidationError,
    encode_steps,
)
from mouse_client.routing import HashRing, routing_key
from mouse_client.v1 import action_service_pb2 as pb
from tests.client.conftest import DISCRETE, IMAGE, VARIED
from tests.server_process import ServerProcess


def test_client_imports_without_torch() -> None:
    """Neither torch nor GPL code (mouse-env) nor gymnasium comes in with the client and its
    adapters, also where they are installed (this venv has all three)."""
    code = (
        "import sys, mouse_client, mouse_client.mouse_env, mouse_client.gym\n"
        "for name in ('torch', 'mouse_envs', 'gymnasium'):\n"
        "    assert name not in sys.modules, f'mouse_client imported {name}'\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    if os.environ.get("MOUSE_CLIENT_ONLY"):  # the client-only venv really has no torch
        import importlib.util

        assert importlib.util.find_spec("torch") is None


def test_greedy_actions_with_scalars_lists_and_numpy(server: ServerProcess) -> None:
    with ActionClient(server.target) as client, client.open_session(VARIED.name, seed=0) as session:
        got = []
        for s in range(VARIED.steps):
            record: dict[str, Any] = VARIED.step_record(0, s)
            if s % 2:  # numpy scalars and arrays work as well as Python values
                record = {k: np.asarray(v) for k, v in record.items()}
            got.append(session.get_action(record, temperature=0.0))
        assert got == VARIED.greedy(0)
        assert session.seq == VARIED.steps


def test_prefill_list_image_and_discrete_models(server: ServerProcess) -> None:
    with ActionClient(server.target) as client:
        for case in (IMAGE, DISCRETE):
            with client.open_session(case.name, temperature=0.0) as session:
                action = session.get_action([case.step_record(1, s) for s in range(case.steps)])
                assert action == case.greedy(1)[-1]
        info = client.model_info(IMAGE.name)
        assert [f.name for f in info.fields] == ["action", "obs_image", "reward"]


def test_stream_and_group(server: ServerProcess) -> None:
    with ActionClient(server.target) as client:
        with client.open_session(VARIED.name, temperature=0.0) as session, session.stream() as stream:
            assert [
                stream.get_action(VARIED.step_record(1, s)) for s in range(VARIED.steps)
            ] == VARIED.greedy(1)
        with client.open_sessions(2, VARIED.name, temperature=0.0) as group:
            assert len({routing_key(s.id) for s in group.sessions}) == 1
            actions = [
                group.get_actions([VARIED.step_record(b, s) for b in range(2)]) for s in range(VARIED.steps)
            ]
            assert all(a.dtype == np.int64 for a in actions)
            assert [int(a[1]) for a in actions] == VARIED.greedy(1)


def test_async_client(server: ServerProcess) -> None:
    async def run() -> tuple[list[int], list[list[int]]]:
        async with AsyncActionClient(server.target) as client:
            models = await client.list_models()
            assert VARIED.name in {m.name for m in models}
            one = await client.open_session(VARIED.name, temperature=0.0)
            solo = [await one.get_action(VARIED.step_record(0, s)) for s in range(VARIED.steps)]
            await one.close()
            async with await client.open_sessions(2, VARIED.name, temperature=0.0) as pair:
                batched = [
                    (await pair.get_actions([VARIED.step_record(b, s) for b in range(2)])).tolist()
                    for s in range(VARIED.steps)
                ]
            return solo, batched

    solo, batched = asyncio.run(run())
    assert solo == VARIED.greedy(0)
    assert [step[1] for step in batched] == VARIED.greedy(1)


def test_channel_options_compression_and_metadata_pass_through(server: ServerProcess) -> None:
    import grpc

    options = [("grpc.primary_user_agent", "mouse-test"), ("grpc.keepalive_time_ms", 30000)]
    with ActionClient(server.target, channel_options=options, compression=grpc.Compression.Gzip) as client:
        client.wait_ready(timeout=30)
        assert ("grpc.primary_user_agent", "mouse-test") in client.config.options
        with client.open_session(VARIED.name, temperature=0.0) as session:
            assert session.get_action(VARIED.step_record(0, 0)) == VARIED.greedy(0)[0]
    creds = grpc.ssl_channel_credentials()
    assert ActionClient(server.target, credentials=creds).config.credentials is creds


def test_errors_surface_as_action_error(server: ServerProcess) -> None:
    with ActionClient(server.target) as client:
        with pytest.raises(ActionError) as info:
            client.open_session("missing-model")
        assert info.value.code.name == "NOT_FOUND"
        with client.open_session(VARIED.name) as session:
            with pytest.raises(ActionError, match=r"INVALID_ARGUMENT: steps.done: got 5"):
                session.get_action({**VARIED.step_record(0, 0), "done": 5})
            assert session.seq == 0  # nothing was applied
            session.get_action(VARIED.step_record(0, 0))


class ChainEnv:
    """A tiny Gymnasium-style environment: walk along a chain of `n` states."""

    def __init__(self, n: int = 6, horizon: int = 5) -> None:
        self.n, self.horizon = n, horizon

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        self.t, self.pos = 0, 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self.pos / self.n, 1.0 - self.pos / self.n, 0.5], dtype=np.float32)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        self.pos = min(self.pos + 1, self.n - 1) if action % 2 else max(self.pos - 1, 0)
        terminated = self.pos == self.n - 1
        return self._obs(), float(terminated), terminated, self.t >= self.horizon, {}


def test_episode_recorder_records() -> None:
    fields = [("time", 3), ("action", 4), ("obs_discrete", 9), ("reward", 0), ("done", 3)]
    info = pb.ModelInfo(fields=[pb.FieldInfo(name=n, max_value=m) for n, m in fields])
    rec = EpisodeRecorder(info, first_action=1)
    assert rec.reset(4) == {"action": 1, "reward": 0.0, "done": 0, "time": 0, "obs_discrete": 4}
    assert rec.step(2, 5, 1.5, False, False)["time"] == 1
    rec.step(2, 5, 0.0, False, False)
    late = rec.step(3, 6, -1.0, False, True)
    assert late == {"action": 3, "reward": -1.0, "done": 2, "time": 2, "obs_discrete": 6}  # time capped at 2


def test_record_builder_fits_observations_and_time() -> None:
    fields = [("time", 0, 4), ("action", 0, 2), ("obs_continuous", 4, 0), ("reward", 0, 0), ("done", 0, 3)]
    info = pb.ModelInfo(fields=[pb.FieldInfo(name=n, width=w, max_value=m) for n, w, m in fields])
    rec = EpisodeRecorder(info, name="env3").reset([0.5, -0.5])
    assert rec["obs_continuous"].tolist() == [0.5, -0.5, 0.0, 0.0]  # zero-padded to the width
    with pytest.raises(
        ValidationError, match="env3: the observation has 5 values but the model's obs_continuous takes 4"
    ):
        EpisodeRecorder(info, name="env3").reset(np.zeros(5))
    strict = EpisodeRecorder(info, time_policy="error")
    strict.reset(np.zeros(4))
    for _ in range(3):
        strict.step(1, np.zeros(4), 0.0, False, False)
    with pytest.raises(ValidationError, match="time 4 is beyond the model's time table"):
        strict.step(1, np.zeros(4), 0.0, False, False)
    with pytest.raises(ValidationError, match="time_policy must be one of"):
        EpisodeRecorder(info, time_policy="wrap")


def test_gym_adapter_runs_episodes(server: ServerProcess) -> None:
    env = ChainEnv()
    with ActionClient(server.target) as client:
        session = client.open_session(VARIED.name, seed=3)
        adapter = GymAdapter(session)
        obs, _ = env.reset(seed=0)
        action: int | None = adapter.reset(obs)
        episodes, steps = 0, 0
        while episodes < 3:
            assert action is not None and 0 <= action < 4
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            action = adapter.step(action, obs, reward, terminated, truncated)
            if action is None:
                episodes += 1
                obs, _ = env.reset()
                action = adapter.reset(obs)
        # every transition plus one start record per episode reached the server, in order
        assert len(session.history) == steps + episodes + 1
        session.close()


def test_encode_steps_builds_columns() -> None:
    msg = encode_steps(
        [{"action": 1, "obs_continuous": [0.5, 1.5]}, {"action": np.int32(3), "obs_continuous": np.ones(2)}]
    )
    assert list(msg.action) == [1, 3] and list(msg.obs_continuous) == [0.5, 1.5, 1.0, 1.0]
    assert encode_steps({"obs_image": np.array([[0, 255]])}).obs_image == b"\x00\xff"


def test_one_plain_record_encodes_as_the_numpy_path_does() -> None:
    """A single record of plain types takes a path without numpy; it must give the same bytes,
    or leave the record to the numpy path, for every kind of value."""
    floats = [0.1, -2.5, 0.0, -0.0, 3.4e38, 3.5e38, -1e39, float("inf"), float("-inf"), float("nan")]
    ints = [0, 7, -1, 2**63 - 1, -(2**63), 2**63, True, np.int64(3), np.int32(2), np.uint8(4)]
    arrays = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
        np.ones(3),  # float64
        np.array([1, 2], dtype=np.int64),
        np.array([1, 2], dtype=np.int32),
        np.array([[0, 255], [3, 4]], dtype=np.uint8),
        [0.5, 1.5],
    ]
    cases: list[dict[str, Any]] = [{}, {"actions": 1}]
    cases += [{"reward": v} for v in floats + ints] + [{"action": v} for v in ints + floats]
    cases += [{"obs_continuous": a} for a in arrays] + [{"obs_discrete": a} for a in arrays]
    cases += [{"obs_image": a} for a in arrays]
    cases.append({"action": 2, "reward": 0.5, "done": 0, "time": 9, "obs_continuous": arrays[0]})

    def outcome(records: Any) -> bytes | str:
        try:
            return encode_steps(records).SerializeToString()
        except ValidationError as err:
            return str(err)

    for record in cases:
        assert outcome(record) == outcome([record]), record


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"actions": 1}, r"unknown step field\(s\) \['actions'\]"),
        ([{"action": 1}, {"reward": 0.0}], "step 1 has fields"),
        ({"action": 1.5}, "action must hold integers"),
        ({"obs_image": [300]}, r"obs_image pixels must be in 0..255"),
        ({"reward": "high"}, "reward must hold numbers"),
        ([], "non-empty sequence"),
    ],
)
def test_encode_steps_refuses_bad_records(records: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        encode_steps(records)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MouseClientError)


def test_hash_ring_is_stable_and_spreads() -> None:
    ring = HashRing(["a:1", "b:2", "c:3"])
    keys = [f"session-{i}" for i in range(3000)]
    owners = [ring.target(k) for k in keys]
    counts = {t: owners.count(t) for t in ring.targets}
    assert min(counts.values()) > 700
    smaller = HashRing(["a:1", "b:2"])
    moved = sum(1 for k, o in zip(keys, owners, strict=True) if o != "c:3" and smaller.target(k) != o)
    assert moved == 0  # removing a target only moves the keys it owned
    assert routing_key("group.7") == "group" and routing_key("solo") == "solo"
