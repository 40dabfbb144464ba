"""`VectorGymAdapter` with real Gymnasium `SyncVectorEnv`s of CartPole in each autoreset mode:
thousands of steps without an error, and every session's context equal to the records of the
`EpisodeRecorder` recipe (checked against an in-process forward)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mouse_client import ActionClient, AsyncActionClient, AsyncVectorGymAdapter, VectorGymAdapter
from tests.reference import Reference
from tests.server_process import ServerProcess

gym = pytest.importorskip("gymnasium")
MODES = ["NextStep", "SameStep", "Disabled"]
N = 3


class RecordingEnvs:
    """The vector env, keeping the observations of its last `reset` (the adapter resets the
    finished sub-envs itself in Disabled mode)."""

    def __init__(self, envs: Any) -> None:
        self.envs = envs
        self.last_reset: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.envs, name)

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.envs.reset(**kwargs)
        self.last_reset = obs
        return obs, info


def make_envs(mode: str) -> RecordingEnvs:
    return RecordingEnvs(
        gym.make_vec(
            "CartPole-v1",
            num_envs=N,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode(mode)},
        )
    )


def record(action: int, obs: Any, reward: float, done: int, time: int) -> dict[str, Any]:
    return {
        "action": int(action),
        "reward": float(reward),
        "done": done,
        "time": time,
        "obs_continuous": np.asarray(obs, np.float32),
    }


class Recipe:
    """Per env: a reset record (action 0, reward 0, done 0, time 0) at each episode start, then
    one record per transition (the action taken, its observation, reward and done code)."""

    def __init__(self) -> None:
        self.contexts: list[list[dict[str, Any]]] = [[] for _ in range(N)]
        self.times = [0] * N
        self.ended = [False] * N

    def reset(self, obs: Any) -> None:
        for i in range(N):
            self.contexts[i].append(record(0, obs[i], 0.0, 0, 0))

    def step(self, mode: str, actions: Any, obs: Any, reward: Any, term: Any, trunc: Any, info: dict) -> None:
        for i in range(N):
            if mode == "NextStep" and self.ended[i]:
                self.ended[i], self.times[i] = False, 0
                self.contexts[i].append(record(0, obs[i], 0.0, 0, 0))
                continue
            self.times[i] += 1
            done = 1 if term[i] else 2 if trunc[i] else 0
            last = info["final_obs"][i] if done and mode == "SameStep" else obs[i]
            self.contexts[i].append(record(actions[i], last, reward[i], done, self.times[i]))
            if done and mode == "SameStep":
                self.times[i] = 0
                self.contexts[i].append(record(0, obs[i], 0.0, 0, 0))
            self.ended[i] = bool(done)


def check_contexts(adapter: VectorGymAdapter, recipe: Recipe, ref: Reference) -> None:
    for i, session in enumerate(adapter.group.sessions):
        held = adapter.core.held[i]
        probe = {**recipe.contexts[i][-1], "done": 0, "reward": 0.0, "time": 0}
        reply = session.get_reply([*held, probe], return_scores=True)
        ref.assert_context(reply, [*recipe.contexts[i], probe], 2)


@pytest.mark.parametrize("mode", MODES)
def test_vector_loop_in_each_autoreset_mode(
    mode: str, adapter_server: ServerProcess, models: dict[str, Path]
) -> None:
    envs = make_envs(mode)
    recipe = Recipe()
    with (
        ActionClient(adapter_server.target) as client,
        VectorGymAdapter(client, envs, model="cartpole", seed=0) as adapter,
    ):
        obs, info = envs.reset(seed=0)
        recipe.reset(obs)
        actions = adapter.reset(obs)
        episodes = 0
        for _ in range(400):
            assert actions.dtype == np.int64 and actions.shape == (N,)
            obs, reward, terminated, truncated, info = envs.step(actions)
            episodes += int((terminated | truncated).sum())
            if mode == "Disabled" and (terminated | truncated).any():
                # the adapter resets finished sub-envs itself; mirror the observations it got
                recipe.step(mode, actions, obs, reward, terminated, truncated, info)
                actions = adapter.step(obs, reward, terminated, truncated, info)
                for i in np.flatnonzero(terminated | truncated):
                    recipe.contexts[i].append(record(0, envs.last_reset[i], 0.0, 0, 0))
                    recipe.times[i], recipe.ended[i] = 0, False
                continue
            recipe.step(mode, actions, obs, reward, terminated, truncated, info)
            actions = adapter.step(obs, reward, terminated, truncated, info)
        assert episodes >= 10
        check_contexts(adapter, recipe, Reference(models["cartpole"]))


def test_async_vector_adapter(adapter_server: ServerProcess) -> None:
    envs = make_envs("NextStep")

    async def run() -> int:
        client = AsyncActionClient(adapter_server.target)
        async with client, AsyncVectorGymAdapter(client, envs, model="cartpole", seed=0) as adapter:
            obs, _ = envs.reset(seed=1)
            actions = await adapter.reset(obs)
            for _ in range(200):
                obs, reward, terminated, truncated, info = envs.step(actions)
                actions = await adapter.step(obs, reward, terminated, truncated, info)
            return int(adapter.group.sessions[0].seq)

    assert asyncio.run(run()) > 150


@pytest.mark.parametrize("hold_terminal", [True, False])
def test_hold_terminal_in_next_step_mode(
    hold_terminal: bool, adapter_server: ServerProcess, models: dict[str, Path]
) -> None:
    """NextStep mode: with `hold_terminal` (the default) an episode's last record is held back
    and sent with the reset frame (the env ignores the action in between, so no call is spent on
    it: that sub-env gets `first_action`); with `hold_terminal=False` it is sent at once, and
    every session is stepped on every call. The contexts hold the same records either way."""
    envs = make_envs("NextStep")
    recipe = Recipe()
    steps = 150
    with (
        ActionClient(adapter_server.target) as client,
        VectorGymAdapter(client, envs, model="cartpole", seed=0, hold_terminal=hold_terminal) as adapter,
    ):
        sessions = adapter.group.sessions
        obs, info = envs.reset(seed=0)
        recipe.reset(obs)
        actions = adapter.reset(obs)
        assert [s.seq for s in sessions] == [1] * N
        ends = np.zeros(N, dtype=np.int64)
        for _ in range(steps):
            obs, reward, terminated, truncated, info = envs.step(actions)
            done = terminated | truncated
            ends += done
            recipe.step("NextStep", actions, obs, reward, terminated, truncated, info)
            before = [s.seq for s in sessions]
            actions = adapter.step(obs, reward, terminated, truncated, info)
            stepped = [s.seq - b for s, b in zip(sessions, before, strict=True)]
            held = [len(h) for h in adapter.core.held]
            if hold_terminal:
                assert stepped == [0 if d else 1 for d in done]
                assert held == [1 if d else 0 for d in done]
                assert (actions[done] == 0).all()  # first_action for a sub-env that resets next
            else:
                assert stepped == [1] * N and held == [0] * N
        assert ends.sum() >= 5
        expected = 1 + steps - ends if hold_terminal else np.full(N, 1 + steps)
        assert [s.seq for s in sessions] == expected.tolist()
        check_contexts(adapter, recipe, Reference(models["cartpole"]))
