"""`RemoteAgent` with the real mouse-env 0.5.0 (a test-only install, GPL-3.0: never a dependency
of the package): the five-line loop, task boundaries, mixed models, and every session's context
compared with the records upstream's recipe builds ({**inputs[i], **outputs[i]})."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mouse_client import ActionClient, AsyncActionClient, AsyncRemoteAgent, RemoteAgent, ValidationError
from tests.reference import Reference
from tests.server_process import ServerProcess

mouse_envs = pytest.importorskip("mouse_envs")
EnvConfig, make_env = mouse_envs.EnvConfig, mouse_envs.make_env


class Recipe:
    """Upstream's records, built independently of the adapter: the action sent merged with the
    output it produced, renamed and padded as mouse-core's data path does; a task boundary
    (done 3/4) is sent as 1/2 and, with `fresh_tasks`, the next task starts a new context."""

    def __init__(
        self, n: int, widths: list[tuple[str, int]], time_rows: list[int], fresh_tasks: bool
    ) -> None:
        self.contexts: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.widths, self.time_rows, self.fresh_tasks = widths, time_rows, fresh_tasks
        self.new_task = [False] * n

    def add(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for i, (inp, out) in enumerate(zip(inputs, outputs, strict=True)):
            merged = {**inp, **out}
            if self.new_task[i]:
                self.contexts[i] = []
            done = int(merged["done"])
            self.new_task[i] = self.fresh_tasks and done >= 3
            field, width = self.widths[i]
            obs = np.asarray(merged["observation"])
            record = {
                "action": int(merged["action"]),
                "reward": float(merged["reward"]),
                "done": done - 2 if done >= 3 else done,
                "time": min(int(merged["time"]), self.time_rows[i] - 1),
            }
            if field == "obs_discrete":
                record[field] = int(obs)
            else:
                record[field] = np.pad(obs.astype(np.float32).reshape(-1), (0, width - obs.size))
            self.contexts[i].append(record)


def probe(recipe: Recipe, i: int) -> dict[str, Any]:
    last = dict(recipe.contexts[i][-1])
    return {**last, "done": 0, "reward": 0.0}


def check_contexts(agent: RemoteAgent, recipe: Recipe, refs: list[Reference], counts: list[int]) -> None:
    """Each session's context equals the recipe's records: a probe step's scores match a fresh
    in-process forward over them."""
    for i, session in enumerate(agent.group.sessions):
        held = agent.core.held[i]  # an episode end still waiting for its reset frame
        assert len(held) <= 1
        records = recipe.contexts[i] + [probe(recipe, i)]
        reply = session.get_reply([*held, records[-1]], return_scores=True)
        refs[i].assert_context(reply, records, counts[i])


def test_five_line_loop(adapter_server: ServerProcess, models: dict[str, Path]) -> None:
    """8 CartPoles with task boundaries ("reset"), thousands of steps, contexts as upstream's."""
    env = make_env([EnvConfig(id="CartPole-v1", reset_seed=i, episodes_per_task=3) for i in range(8)])
    recipe = Recipe(8, [("obs_continuous", 4)] * 8, [512] * 8, fresh_tasks=True)
    with (
        ActionClient(adapter_server.target) as client,
        RemoteAgent(client, env, model="cartpole", seed=0) as agent,
    ):
        inputs = agent.initial_inputs()
        for _ in range(600):
            outputs = env.step(inputs)
            recipe.add(inputs, outputs)
            inputs = agent.act(outputs)
        assert all(len(c) < 1000 for c in recipe.contexts)
        check_contexts(agent, recipe, [Reference(models["cartpole"])] * 8, [2] * 8)
        sessions = agent.group.sessions
    assert all(s.closed for s in sessions)
    assert min(len(e) for e in env.tracker.episode_lengths) >= 6  # many episodes, task boundaries


def test_mixed_models_map_boundaries_and_padding(
    adapter_server: ServerProcess, models: dict[str, Path]
) -> None:
    """CartPole on a 4-action model with 6 observation slots (padding, num_actions=2) and
    SyntheticEnv (discrete, no time limit: time is clipped) on another, chosen per instance."""
    configs = [EnvConfig(id="CartPole-v1", reset_seed=i, episodes_per_task=2) for i in range(2)]
    synth = {"obs_size": 8, "action_size": 3, "map_seed": 0, "goal_prob": 0.001}
    configs += [
        EnvConfig(id="SyntheticEnv-v1", reset_seed=i, episodes_per_task=2, kwargs=synth) for i in range(2)
    ]
    env = make_env(configs)

    def choose(obs_space: Any, act_space: Any) -> str:
        return "disc" if getattr(obs_space, "n", None) else "cont"

    recipe = Recipe(4, [("obs_continuous", 6)] * 2 + [("obs_discrete", 16)] * 2, [64] * 4, fresh_tasks=False)
    seen_actions: set[int] = set()
    client = ActionClient(adapter_server.target)
    with client, RemoteAgent(client, env, model=choose, task_boundary="map", seed=1) as agent:
        assert [s.model.name for s in agent.group.sessions] == ["cont", "cont", "disc", "disc"]
        inputs = agent.initial_inputs()
        for _ in range(300):
            outputs = env.step(inputs)
            recipe.add(inputs, outputs)
            inputs = agent.act(outputs)
            seen_actions.update(int(x["action"]) for x in inputs[:2])
        assert seen_actions <= {0, 1}  # num_actions=2 from CartPole's action space
        refs = [Reference(models["cont"])] * 2 + [Reference(models["disc"])] * 2
        check_contexts(agent, recipe, refs, [2, 2, 3, 3])
    assert max(max(c["time"] for c in ctx) for ctx in recipe.contexts[2:]) == 63  # clipped
    assert any(c["done"] for ctx in recipe.contexts for c in ctx)


def test_spaces_that_do_not_fit_are_reported_by_instance(adapter_server: ServerProcess) -> None:
    env = make_env([EnvConfig(id="CartPole-v1", reset_seed=0), EnvConfig(id="Acrobot-v1", reset_seed=0)])
    with ActionClient(adapter_server.target) as client, pytest.raises(ValidationError) as info:
        RemoteAgent(client, env, model="cartpole").open()
    message = str(info.value)
    assert (
        "instance 1 (Acrobot-v1)" in message and "6 values but the model's obs_continuous takes 4" in message
    )
    assert "the env has 3 actions but the model at most 2" in message
    assert "instance 0" not in message


def test_error_policies_name_the_instance(adapter_server: ServerProcess) -> None:
    env = make_env([EnvConfig(id="CartPole-v1", reset_seed=i, episodes_per_task=1) for i in range(2)])
    with (
        ActionClient(adapter_server.target) as client,
        RemoteAgent(client, env, model="cartpole", task_boundary="error") as agent,
    ):
        inputs = agent.initial_inputs()
        with pytest.raises(ValidationError, match=r"instance \d \(CartPole-v1\): done [34] ends a task"):
            for _ in range(500):
                inputs = agent.act(env.step(inputs))
    synth = {"obs_size": 8, "action_size": 3, "map_seed": 0, "goal_prob": 0.0}
    env = make_env([EnvConfig(id="SyntheticEnv-v1", reset_seed=0, kwargs=synth)])
    client = ActionClient(adapter_server.target)
    with client, RemoteAgent(client, env, model="disc", time_policy="error") as agent:
        inputs = agent.initial_inputs()
        with pytest.raises(ValidationError, match=r"instance 0 \(SyntheticEnv-v1\): time 64 is beyond"):
            for _ in range(100):
                inputs = agent.act(env.step(inputs))


def test_async_agent(adapter_server: ServerProcess) -> None:
    env = make_env([EnvConfig(id="CartPole-v1", reset_seed=i, episodes_per_task=2) for i in range(4)])

    async def run() -> int:
        client = AsyncActionClient(adapter_server.target)
        async with client, AsyncRemoteAgent(client, env, model="cartpole", seed=0) as agent:
            inputs = agent.initial_inputs()
            for _ in range(200):
                inputs = await agent.act(env.step(inputs))
            return int(agent.group.sessions[0].seq)

    assert asyncio.run(run()) > 150
