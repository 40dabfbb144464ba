"""The learning curve: regret per window of pulls as a session's context grows, and after a reset.

`learning_curve(actor, ...)` plays one bandit task instance per session: `pulls` pulls from an
empty context, then a context reset (the same task, a new episode) and `pulls_after_reset`
more. The actor is either the served model (`ServedActor`, a `SessionGroup`: one
`BatchGetAction` per pull) or the same checkpoint in this process (`LocalActor`: the batched
KV-cache forward and the server's sampling draws, so both give the same actions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from demo.bandit import HORIZON, NUM_ARMS, OBS_DIM, BernoulliBandit, random_policy_regret

# Windows of pulls (1-based, inclusive) before and after the reset.
WINDOWS: tuple[tuple[int, int], ...] = ((1, 50), (51, 100), (101, 200), (201, 300), (301, 400), (401, 500))
WINDOWS_AFTER_RESET: tuple[tuple[int, int], ...] = ((1, 50), (51, 100))


class Actor(Protocol):
    """Sessions that turn each session's new step records into its next action."""

    def act(self, records: list[list[dict[str, Any]]]) -> np.ndarray: ...

    def reset(self) -> None: ...


def step_record(action: int, reward: float, time: int) -> dict[str, Any]:
    """A step record of the demo model's schema (record 0 of an episode: action 0, reward 0)."""
    obs = np.zeros(OBS_DIM, dtype=np.float32)
    return {
        "action": int(action),
        "reward": float(reward),
        "done": 0,
        "time": int(time),
        "obs_continuous": obs,
    }


class ServedActor:
    """The served model: a `SessionGroup` of the client, one `BatchGetAction` per pull."""

    def __init__(self, group: Any, temperature: float | None = None) -> None:
        self.group = group
        self.temperature = temperature

    def act(self, records: list[list[dict[str, Any]]]) -> np.ndarray:
        return np.asarray(self.group.get_actions(records, temperature=self.temperature))

    def reset(self) -> None:
        for session in self.group.sessions:
            session.reset()


class LocalActor:
    """The checkpoint in this process, run as the server runs it on CPU: pre-packed weights, one
    batched forward per pull over a KV-cache pool of the model's context length, actions drawn
    with `counter_uniform(seed, seq)` (seeds `seed + i`, `seq` counting requests from 1 like a
    fresh session's), so a session gets the actions the server gives it."""

    def __init__(self, model: Any, num_sessions: int, seed: int, temperature: float = 1.0) -> None:
        import torch

        self.torch = torch
        self.model = model
        model.pack_weights()
        self.pool = model.new_cache_pool(num_sessions, model.config.max_steps or HORIZON + 1)
        self.slots = np.array([self.pool.allocate() for _ in range(num_sessions)])
        self.seeds = seed + np.arange(num_sessions)
        self.seq = np.zeros(num_sessions, dtype=np.int64)
        self.temperature = temperature

    def act(self, records: list[list[dict[str, Any]]]) -> np.ndarray:
        from mouse_core import counter_uniform, sample_actions

        torch, model, n = self.torch, self.model, len(self.slots)
        counts = np.array([len(r) for r in records])
        flat = [record for session in records for record in session]
        steps = {
            "action": torch.tensor([r["action"] for r in flat], dtype=torch.int64),
            "reward": torch.tensor([r["reward"] for r in flat], dtype=torch.float32),
            "done": torch.tensor([r["done"] for r in flat], dtype=torch.int64),
            "time": torch.tensor([r["time"] for r in flat], dtype=torch.int64),
            "obs_continuous": torch.from_numpy(np.stack([r["obs_continuous"] for r in flat])),
        }
        self.seq += 1
        uniform = torch.from_numpy(counter_uniform(self.seeds, self.seq))
        temperature = torch.full((n,), self.temperature)
        num_actions = torch.full((n,), model.max_num_actions)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server runs small forwards: faster, and the same kernels
        try:
            scores = model.forward_batch(steps, self.pool, self.slots, counts)
            return sample_actions(scores, temperature, num_actions, uniform).numpy()
        finally:
            torch.set_num_threads(threads)

    def reset(self) -> None:
        for slot in self.slots:
            self.pool.reset(int(slot))


class ThompsonActor:
    """Thompson sampling with the exact Beta posterior of each arm, from the same step records
    (a record with `time` 0 starts an episode and carries no pull): the algorithm the demo
    model is trained to imitate, for comparison."""

    def __init__(self, num_sessions: int, seed: int, num_arms: int = NUM_ARMS) -> None:
        self.rng = np.random.default_rng(seed)
        self.successes = np.zeros((num_sessions, num_arms))
        self.failures = np.zeros((num_sessions, num_arms))

    def act(self, records: list[list[dict[str, Any]]]) -> np.ndarray:
        for i, session in enumerate(records):
            for r in session:
                if r["time"] > 0:
                    self.successes[i, r["action"]] += r["reward"]
                    self.failures[i, r["action"]] += 1 - r["reward"]
        return np.argmax(self.rng.beta(1 + self.successes, 1 + self.failures), axis=1)

    def reset(self) -> None:
        self.successes[:] = 0
        self.failures[:] = 0


@dataclass
class Curve:
    """Per-pull regret of every session `[N, pulls]` (before the reset) and `[N, after]`."""

    regret: np.ndarray
    regret_after_reset: np.ndarray
    means: np.ndarray  # [N, K] arm means of the task instances

    def window(self, lo: int, hi: int, after_reset: bool = False) -> float:
        """Mean regret per pull over pulls `lo..hi` (1-based, inclusive) of all sessions."""
        regret = self.regret_after_reset if after_reset else self.regret
        return float(regret[:, lo - 1 : hi].mean())

    @property
    def random_regret(self) -> float:
        """Expected regret per pull of the uniformly random policy on the same tasks."""
        return float(random_policy_regret(self.means).mean())

    def windows(self, after_reset: bool = False) -> list[tuple[int, int]]:
        """The windows of `WINDOWS` (or `WINDOWS_AFTER_RESET`) that these sessions played."""
        pulls = (self.regret_after_reset if after_reset else self.regret).shape[1]
        return [(lo, hi) for lo, hi in (WINDOWS_AFTER_RESET if after_reset else WINDOWS) if hi <= pulls]

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": len(self.means),
            "random": self.random_regret,
            "windows": {f"{lo}-{hi}": self.window(lo, hi) for lo, hi in self.windows()},
            "after_reset": {f"{lo}-{hi}": self.window(lo, hi, True) for lo, hi in self.windows(True)},
        }


def learning_curve(
    actor: Actor, task_seeds: list[int], pulls: int = HORIZON, pulls_after_reset: int = 100
) -> Curve:
    """Play task `BernoulliBandit.reset(seed=task_seeds[i])` in session `i` of `actor`."""
    envs = [BernoulliBandit() for _ in task_seeds]
    means = np.stack([env.reset(seed=s)[1]["means"] for env, s in zip(envs, task_seeds, strict=True)])

    def episode(num_pulls: int) -> np.ndarray:
        regret = np.zeros((len(envs), num_pulls))
        records = [[step_record(0, 0.0, 0)] for _ in envs]
        for t in range(num_pulls):
            actions = actor.act(records)
            for i, env in enumerate(envs):
                _, reward, _, _, info = env.step(int(actions[i]))
                regret[i, t] = info["regret"]
                records[i] = [step_record(int(actions[i]), reward, t + 1)]
        return regret

    before = episode(pulls)
    actor.reset()
    for env in envs:
        env.reset()  # the same task instance, a new episode
    return Curve(before, episode(pulls_after_reset), means)


def format_curves(curves: dict[str, Curve]) -> str:
    """A table: one row per window, one column per curve, plus the random policy."""
    first = next(iter(curves.values()))
    width = max(10, *(len(n) for n in curves))
    lines = [f"  {'pulls':14s} {'random':>8s} " + " ".join(f"{n:>{width}s}" for n in curves)]
    rows = [(f"{lo}-{hi}", lo, hi, False) for lo, hi in first.windows()]
    rows += [(f"{lo}-{hi} (reset)", lo, hi, True) for lo, hi in first.windows(after_reset=True)]
    for label, lo, hi, after in rows:
        cells = " ".join(f"{c.window(lo, hi, after):{width}.3f}" for c in curves.values())
        lines.append(f"  {label:14s} {first.random_regret:8.3f} {cells}")
    return "\n".join(lines)
