"""Drive sessions from Gymnasium loops: `GymAdapter` for one env, `VectorGymAdapter` (and its
asyncio twin) for a `gymnasium.vector` env in any of the three autoreset modes.

Gymnasium is not imported: the envs are used by duck typing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mouse_client._vector import ModelChoice, VectorAdapter, VectorCore, VectorStep
from mouse_client.errors import ValidationError
from mouse_client.steps import EpisodeRecorder


class GymAdapter:
    """Turns one environment's transitions into step records and actions.

        adapter = GymAdapter(session)
        obs, info = env.reset(seed=0)
        action = adapter.reset(obs)
        while True:
            obs, reward, terminated, truncated, info = env.step(action)
            action = adapter.step(action, obs, reward, terminated, truncated)
            if action is None:                       # the episode ended
                obs, info = env.reset()
                action = adapter.reset(obs)

    The record of an episode's last transition is held back and sent together with the next
    episode's first record (one prefill), so no round trip is spent on an unused action.
    """

    def __init__(
        self,
        session: Any,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        first_action: int = 0,
        time_policy: str = "clip",
    ) -> None:
        self.session = session
        self.recorder = EpisodeRecorder(session.model, first_action=first_action, time_policy=time_policy)
        self.temperature = temperature
        self.num_actions = num_actions
        self._held: list[dict[str, Any]] = []

    def _act(self, records: list[dict[str, Any]]) -> int:
        return self.session.get_action(records, temperature=self.temperature, num_actions=self.num_actions)

    def reset(self, obs: Any) -> int:
        """The first action of an episode."""
        records = [*self._held, self.recorder.reset(obs)]
        action = self._act(records)
        self._held = []
        return action

    def step(self, action: int, obs: Any, reward: float, terminated: bool, truncated: bool) -> int | None:
        """The next action, or None when the episode ended (call `reset` next)."""
        record = self.recorder.step(action, obs, reward, terminated, truncated)
        if terminated or truncated:
            self._held = [record]
            return None
        return self._act([record])


def _autoreset_mode(envs: Any) -> str:
    mode = (getattr(envs, "metadata", None) or {}).get("autoreset_mode", "NextStep")
    name = str(getattr(mode, "value", mode))
    if name not in ("NextStep", "SameStep", "Disabled"):
        raise ValidationError(f"unknown autoreset mode {mode!r}.")
    return name


class _VectorGymCore(VectorCore):
    """Records from a Gymnasium vector env's (obs, reward, terminated, truncated, info)."""

    def __init__(self, envs: Any, *, hold_terminal: bool, **options: Any) -> None:
        self.envs = envs
        self.mode = _autoreset_mode(envs)
        n = int(envs.num_envs)
        # only NextStep has a step whose action the env ignores (the one after an episode's end)
        super().__init__(
            [envs.single_observation_space] * n,
            [envs.single_action_space] * n,
            [f"env{i}" for i in range(n)],
            hold_terminal=hold_terminal and self.mode == "NextStep",
            **options,
        )
        self.times = np.zeros(n, dtype=np.int64)
        self.ended = np.zeros(n, dtype=bool)  # NextStep: the next obs of these is a reset frame
        self._reset_obs: Any = None  # Disabled: observations of the sub-envs reset for this step

    def _reset_record(self, i: int, obs: Any) -> dict[str, Any]:
        return self.builders[i].record(action=self.first_action, reward=0.0, done=0, time=0, obs=obs)

    def plan_reset(self, obs: Any) -> VectorStep:
        records = [[self._reset_record(i, obs[i])] for i in range(self.n)]
        step = self.plan(records, [False] * self.n)
        step.held = [[] for _ in range(self.n)]
        step.state = {"times": np.zeros(self.n, dtype=np.int64), "ended": np.zeros(self.n, dtype=bool)}
        return step

    def plan_step(
        self, obs: Any, reward: Any, terminated: Any, truncated: Any, info: dict[str, Any]
    ) -> VectorStep:
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        reward = np.asarray(reward, np.float64)
        times, ended = self.times.copy(), np.zeros(self.n, dtype=bool)
        final_obs, final_mask = info.get("final_obs"), info.get("_final_obs")
        done_mask = terminated | truncated
        if self.mode == "Disabled" and done_mask.any() and self._reset_obs is None:
            # the env waits for us to reset the finished sub-envs (once: a retry reuses them)
            self._reset_obs = self.envs.reset(options={"reset_mask": done_mask})[0]
        new_obs = self._reset_obs
        records, ends = [], []
        for i in range(self.n):
            if self.mode == "NextStep" and self.ended[i]:  # the reset frame; the action was ignored
                times[i] = 0
                records.append([self._reset_record(i, obs[i])])
                ends.append(False)
                continue
            times[i] += 1
            done = 1 if terminated[i] else 2 if truncated[i] else 0
            last_obs = obs[i]
            if done and self.mode == "SameStep":
                if final_obs is None or (final_mask is not None and not final_mask[i]):
                    raise ValidationError(f"env {i} ended but info has no final_obs for it (SameStep mode).")
                last_obs = final_obs[i]
            record = self.builders[i].record(
                action=self.actions[i], reward=reward[i], done=done, time=times[i], obs=last_obs
            )
            if done and self.mode == "SameStep":
                times[i] = 0
                records.append([record, self._reset_record(i, obs[i])])
            elif done and self.mode == "Disabled":
                times[i] = 0
                records.append([record, self._reset_record(i, new_obs[i])])
            else:
                records.append([record])
                ended[i] = bool(done) and self.mode == "NextStep"
            ends.append(bool(ended[i]))
        step = self.plan(records, ends)
        step.state = {"times": times, "ended": ended, "_reset_obs": None}
        return step


class _VectorGymAdapterBase(VectorAdapter):
    core: _VectorGymCore

    def __init__(
        self,
        client: Any,
        envs: Any,
        *,
        model: ModelChoice = "default",
        seed: int | None = None,
        temperature: float | None = None,
        time_policy: str = "clip",
        hold_terminal: bool = True,
        first_action: int = 0,
    ) -> None:
        core = _VectorGymCore(
            envs,
            model=model,
            seed=seed,
            temperature=temperature,
            time_policy=time_policy,
            hold_terminal=hold_terminal,
            first_action=first_action,
        )
        super().__init__(client, core)


class VectorGymAdapter(_VectorGymAdapterBase):
    """Acts for a `gymnasium.vector` env (Gymnasium 1.x) through one session group.

        adapter = VectorGymAdapter(client, envs, model="default", seed=0)
        obs, info = envs.reset(seed=0)
        actions = adapter.reset(obs)
        for _ in range(1000):
            obs, reward, terminated, truncated, info = envs.step(actions)
            actions = adapter.step(obs, reward, terminated, truncated, info)

    Works in every autoreset mode (`envs.metadata["autoreset_mode"]`): NextStep (the default;
    an episode's last record is held back and sent with the next reset frame), SameStep (the
    last record is built from `info["final_obs"]`), Disabled (the adapter resets the finished
    sub-envs itself with `envs.reset(options={"reset_mask": ...})`). Records are those of
    `EpisodeRecorder`. The spaces are checked against the model at the start; `num_actions` is
    the action space's size. A failed call changes nothing: calling `step` again with the same
    values retries. Closes its sessions on exit.
    """

    def open(self) -> VectorGymAdapter:
        """Check the env against the model(s) and open one session per sub-env."""
        if self.core.group is None:
            self.core.attach(self.client._group(self.client._run(self.core.open_plan(self.client))))
        return self

    def _send(self, step: VectorStep) -> np.ndarray:
        core = self.core
        actions = core.group.get_actions(step.records, indices=step.indices, temperature=core.temperature)
        return core.commit(step, actions)

    def reset(self, obs: Any) -> np.ndarray:
        """The first actions, for the observations of `envs.reset()`."""
        return self._send(self.open().core.plan_reset(obs))

    def step(
        self, obs: Any, reward: Any, terminated: Any, truncated: Any, info: dict[str, Any]
    ) -> np.ndarray:
        """The next actions (int64 `[num_envs]`), for the values of `envs.step(actions)`."""
        return self._send(self.core.plan_step(obs, reward, terminated, truncated, info))

    def close(self) -> None:
        if self.core.group is not None:
            self.core.group.close()

    def __enter__(self) -> VectorGymAdapter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVectorGymAdapter(_VectorGymAdapterBase):
    """asyncio twin of `VectorGymAdapter` (with an `AsyncActionClient`)."""

    async def open(self) -> AsyncVectorGymAdapter:
        """Check the env against the model(s) and open one session per sub-env."""
        if self.core.group is None:
            self.core.attach(self.client._group(await self.client._run(self.core.open_plan(self.client))))
        return self

    async def _send(self, step: VectorStep) -> np.ndarray:
        core = self.core
        actions = await core.group.get_actions(
            step.records, indices=step.indices, temperature=core.temperature
        )
        return core.commit(step, actions)

    async def reset(self, obs: Any) -> np.ndarray:
        """The first actions, for the observations of `envs.reset()`."""
        return await self._send((await self.open()).core.plan_reset(obs))

    async def step(
        self, obs: Any, reward: Any, terminated: Any, truncated: Any, info: dict[str, Any]
    ) -> np.ndarray:
        """The next actions (int64 `[num_envs]`), for the values of `envs.step(actions)`."""
        return await self._send(self.core.plan_step(obs, reward, terminated, truncated, info))

    async def close(self) -> None:
        if self.core.group is not None:
            await self.core.group.close()

    async def __aenter__(self) -> AsyncVectorGymAdapter:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
