"""The sans-I/O part of the vector adapters (`VectorGymAdapter`, `RemoteAgent`): per-instance
record building, terminal records held back for the next reset frame, context resets, and a
transactional commit (a failed call changes nothing, so calling again with the same env values
is a retry that applies every record exactly once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mouse_client._core import Plan
from mouse_client.errors import ValidationError
from mouse_client.steps import RecordBuilder
from mouse_client.v1 import action_service_pb2 as pb

ModelChoice = str | Callable[[Any, Any], str]


@dataclass
class VectorStep:
    """What one vector step sends: sessions to reset first, then records per stepped session."""

    resets: list[int]
    indices: list[int]
    records: list[list[dict[str, Any]]]
    held: list[list[dict[str, Any]]]  # the held-back records after this step
    state: dict[str, Any] = field(default_factory=dict)  # adapter state committed on success


class VectorCore:
    """Shared state of a vector adapter over environment instances with the given spaces."""

    def __init__(
        self,
        observation_spaces: Sequence[Any],
        action_spaces: Sequence[Any],
        names: Sequence[str],
        *,
        model: ModelChoice,
        seed: int | None,
        temperature: float | None,
        first_action: int,
        hold_terminal: bool,
        time_policy: str,
    ) -> None:
        self.n = len(observation_spaces)
        self.obs_spaces, self.act_spaces, self.names = (
            list(observation_spaces),
            list(action_spaces),
            list(names),
        )
        # the model name of each instance (`model` is a name or a callable of its spaces)
        self.model_names = [
            model if isinstance(model, str) else model(o, a)
            for o, a in zip(self.obs_spaces, self.act_spaces, strict=True)
        ]
        self.seed = seed
        self.temperature = temperature
        self.first_action = first_action
        self.hold_terminal = hold_terminal
        self.time_policy = time_policy
        self.builders: list[RecordBuilder] = []
        self.held: list[list[dict[str, Any]]] = [[] for _ in range(self.n)]
        self.actions = np.full(self.n, first_action, dtype=np.int64)  # the actions last given to the env
        self.group: Any = None

    # -- set-up -------------------------------------------------------------------------------
    def open_plan(self, client: Any) -> Plan[list[Any]]:
        """Check the spaces against the model(s), then open one session per instance (the
        shell makes the group of what this returns)."""
        infos = {}
        for name in dict.fromkeys(self.model_names):
            infos[name] = yield from client._plan_model_info(name)
        counts = self.configure([infos[m] for m in self.model_names])
        return (
            yield from client._plan_open_group(self.n, self.model_names, self.seed, None, counts, None, None)
        )

    def configure(self, infos: Sequence[pb.ModelInfo]) -> list[int]:
        """Check every instance's spaces against its model; returns each one's action count.
        Raises `ValidationError` listing every instance that does not fit."""
        problems, counts = [], []
        self.builders = []
        for i, (info, obs_space, act_space, name) in enumerate(
            zip(infos, self.obs_spaces, self.act_spaces, self.names, strict=True)
        ):
            builder = RecordBuilder(info, time_policy=self.time_policy, name=f"instance {i} ({name})")
            self.builders.append(builder)
            for problem in builder.check_spaces(obs_space, act_space, info.max_num_actions):
                problems.append(f"instance {i} ({name}) for model {info.name!r}: {problem}")
            counts.append(int(getattr(act_space, "n", info.max_num_actions)))
        if problems:
            raise ValidationError("the environment does not fit the model:\n  " + "\n  ".join(problems))
        return counts

    def attach(self, group: Any) -> None:
        self.group = group

    # -- stepping -----------------------------------------------------------------------------
    def plan(
        self, records: Sequence[Sequence[dict[str, Any]]], ends: Sequence[bool], resets: Sequence[int] = ()
    ) -> VectorStep:
        """`records[i]`: instance i's new records; `ends[i]`: its last record ends an episode
        and may be held back (the env ignores the next action); `resets`: sessions whose
        context starts over before their records."""
        held = [list(h) for h in self.held]
        for i in resets:
            held[i] = []
        indices, batches = [], []
        for i in range(self.n):
            pending = held[i] + list(records[i])
            if self.hold_terminal and ends[i]:
                held[i] = pending
                continue
            held[i] = []
            if pending:
                indices.append(i)
                batches.append(pending)
        return VectorStep(list(resets), indices, batches, held)

    def commit(self, step: VectorStep, actions: np.ndarray) -> np.ndarray:
        """Record a vector step that went through; returns the actions for the env."""
        self.held = step.held
        out = np.full(self.n, self.first_action, dtype=np.int64)
        out[step.indices] = actions
        self.actions = out
        for name, value in step.state.items():
            setattr(self, name, value)
        return out.copy()


class VectorAdapter:
    """What the blocking and asyncio adapters share: the client, the core, the group."""

    core: VectorCore

    def __init__(self, client: Any, core: VectorCore) -> None:
        self.client = client
        self.core = core

    @property
    def group(self) -> Any:
        """The session group (instance i is session i), once opened."""
        return self.core.group
