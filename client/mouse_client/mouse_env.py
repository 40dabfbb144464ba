"""Drive a mouse-env rollout (`mouse_envs.make_env(...)`) from a mouse-serve model.

    env = make_env([EnvConfig(id="CartPole-v1", reset_seed=i, episodes_per_task=5) for i in range(8)])
    with ActionClient(target) as client, RemoteAgent(client, env, model="default") as agent:
        inputs = agent.initial_inputs()
        for _ in range(10_000):
            inputs = agent.act(env.step(inputs))

The env is used by duck typing (`observation_space.spaces[i]`, `action_space.spaces[i]`,
`names`, and the outputs' `time`, `observation`, `reward`, `done`): this module imports neither
mouse-env (GPL-3.0) nor torch; the tensors in the outputs are read with numpy, and the inputs
carry plain ints, which mouse-env accepts.

One session per env instance, in one `SessionGroup`, so each vector step is one
`BatchGetAction`. Each record is built as upstream's rollouts build it: the action sent merged
with the output it produced (on reset frames too, where the env ignored that action).
"""

from __future__ import annotations

from typing import Any

from mouse_client._vector import ModelChoice, VectorAdapter, VectorCore, VectorStep
from mouse_client.errors import ValidationError

TASK_BOUNDARIES = ("reset", "map", "error")


class _AgentCore(VectorCore):
    """Everything but the I/O: records from mouse-env outputs, task boundaries, held records."""

    def __init__(self, env: Any, *, task_boundary: str, **options: Any) -> None:
        if task_boundary not in TASK_BOUNDARIES:
            raise ValidationError(
                f"task_boundary must be one of {list(TASK_BOUNDARIES)}, got {task_boundary!r}."
            )
        spaces = list(env.observation_space.spaces)
        names = list(getattr(env, "names", None) or [f"env{i}" for i in range(len(spaces))])
        super().__init__(spaces, list(env.action_space.spaces), names, **options)
        self.task_boundary = task_boundary
        self.reset_next = [False] * self.n  # the next output starts a new task: fresh context

    def initial_inputs(self) -> list[dict[str, int]]:
        """The inputs of the first `env.step` (the env ignores them: it answers reset frames)."""
        self.actions[:] = self.first_action
        return [{"action": self.first_action} for _ in range(self.n)]

    def plan_outputs(self, outputs: list[dict[str, Any]]) -> VectorStep:
        if len(outputs) != self.n:
            raise ValidationError(f"expected {self.n} outputs (one per env instance), got {len(outputs)}.")
        records, ends, task_ends = [], [], []
        for i, out in enumerate(outputs):
            done = int(out["done"])
            task_end = done in (3, 4)
            if task_end:
                if self.task_boundary == "error":
                    raise ValidationError(
                        f"instance {i} ({self.names[i]}): done {done} ends a task and task_boundary='error'."
                    )
                done -= 2
            record = self.builders[i].record(
                action=self.actions[i],
                reward=out["reward"],
                done=done,
                time=out["time"],
                obs=out.get("observation"),
            )
            records.append([record])
            # a task's end is sent at once in "reset" mode (its context is cleared right after)
            ends.append(done != 0 and not (task_end and self.task_boundary == "reset"))
            task_ends.append(task_end and self.task_boundary == "reset")
        step = self.plan(records, ends, [i for i in range(self.n) if self.reset_next[i]])
        step.state["reset_next"] = task_ends
        return step

    def resets_done(self, step: VectorStep) -> None:
        """The step's context resets went through (a retry must not repeat them)."""
        self.reset_next = [r and i not in step.resets for i, r in enumerate(self.reset_next)]

    def inputs(self, actions: Any) -> list[dict[str, int]]:
        return [{"action": int(a)} for a in actions]


class _RemoteAgentBase(VectorAdapter):
    core: _AgentCore

    def __init__(
        self,
        client: Any,
        env: Any,
        *,
        model: ModelChoice = "default",
        seed: int | None = None,
        temperature: float | None = None,
        task_boundary: str = "reset",
        time_policy: str = "clip",
        hold_terminal: bool = True,
        first_action: int = 0,
    ) -> None:
        core = _AgentCore(
            env,
            task_boundary=task_boundary,
            model=model,
            seed=seed,
            temperature=temperature,
            time_policy=time_policy,
            hold_terminal=hold_terminal,
            first_action=first_action,
        )
        super().__init__(client, core)

    def initial_inputs(self) -> list[dict[str, int]]:
        """The inputs of the first `env.step` (the env ignores them: it answers reset frames)."""
        return self.core.initial_inputs()


class RemoteAgent(_RemoteAgentBase):
    """Acts for every instance of a mouse-env `MouseEnv` through one session group.

    - `model`: a model name, or a callable `(observation_space, action_space) -> name` per
      instance. Each instance's spaces are checked against its model at the start; every
      mismatch is reported with the instance's index and name. `num_actions` is set per session
      from the action space (so a 4-action model never answers 3 to a 2-action env).
    - `task_boundary` for done 3/4 (an episode end that also ends a task): "reset" (default)
      sends it as 1/2 and starts a fresh context for the next task; "map" sends it as 1/2 in
      the same context; "error" raises.
    - `time_policy`: "clip" (default) or "error" for a `time` beyond the model's table.
    - `hold_terminal`: an episode's last record is sent together with the next reset frame
      (one round trip fewer; the env ignores the action of that step, which gets
      `first_action`).
    - On an error nothing of the agent's state changes: calling `act` again with the same
      outputs retries, and every record still reaches its session exactly once.
    - Closes its sessions on exit (`close()`).
    """

    def open(self) -> RemoteAgent:
        """Check the env against the model(s) and open one session per instance."""
        if self.core.group is None:
            self.core.attach(self.client._group(self.client._run(self.core.open_plan(self.client))))
        return self

    def act(self, outputs: list[dict[str, Any]]) -> list[dict[str, int]]:
        """The inputs of the next `env.step` for the outputs of the last one."""
        core = self.open().core
        step = core.plan_outputs(outputs)
        if step.resets:
            core.group.reset(indices=step.resets)
            core.resets_done(step)
        actions = core.group.get_actions(step.records, indices=step.indices, temperature=core.temperature)
        return core.inputs(core.commit(step, actions))

    def close(self) -> None:
        if self.core.group is not None:
            self.core.group.close()

    def __enter__(self) -> RemoteAgent:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRemoteAgent(_RemoteAgentBase):
    """asyncio twin of `RemoteAgent` (with an `AsyncActionClient`)."""

    async def open(self) -> AsyncRemoteAgent:
        """Check the env against the model(s) and open one session per instance."""
        if self.core.group is None:
            self.core.attach(self.client._group(await self.client._run(self.core.open_plan(self.client))))
        return self

    async def act(self, outputs: list[dict[str, Any]]) -> list[dict[str, int]]:
        """The inputs of the next `env.step` for the outputs of the last one."""
        core = (await self.open()).core
        step = core.plan_outputs(outputs)
        if step.resets:
            await core.group.reset(indices=step.resets)
            core.resets_done(step)
        actions = await core.group.get_actions(
            step.records, indices=step.indices, temperature=core.temperature
        )
        return core.inputs(core.commit(step, actions))

    async def close(self) -> None:
        if self.core.group is not None:
            await self.core.group.close()

    async def __aenter__(self) -> AsyncRemoteAgent:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
