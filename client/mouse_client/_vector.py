"""The sans-I/O part of the vector adapters (`VectorGymAdapter`, `RemoteAgent`): per-instance
record building, terminal records held back for the next reset frame, context resets, and a
transactional commit (a failed call changes nothing, so calling again with the same env values
is a retry that applies every record exactly once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    """Shared state of a vector adapter over `n` environment instances."""

    def __init__(self, n: int, *, first_action: int, hold_terminal: bool, time_policy: str) -> None:
        self.n = n
        self.first_action = first_action
        self.hold_terminal = hold_terminal
        self.time_policy = time_policy
        self.builders: list[RecordBuilder] = []
        self.held: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.actions = np.full(n, first_action, dtype=np.int64)  # the actions last given to the env
        self.group: Any = None

    # -- set-up -------------------------------------------------------------------------------
    def plan_models(
        self, model: ModelChoice, observation_spaces: Sequence[Any], action_spaces: Sequence[Any]
    ) -> list[str]:
        """The model name of each instance (`model` is a name or a callable of its spaces)."""
        return [
            model if isinstance(model, str) else model(o, a)
            for o, a in zip(observation_spaces, action_spaces, strict=True)
        ]

    def configure(
        self,
        infos: Sequence[pb.ModelInfo],
        observation_spaces: Sequence[Any],
        action_spaces: Sequence[Any],
        names: Sequence[str],
    ) -> list[int]:
        """Check every instance's spaces against its model; returns each one's action count.
        Raises `ValidationError` listing every instance that does not fit."""
        problems, counts = [], []
        self.builders = []
        for i, (info, obs_space, act_space, name) in enumerate(
            zip(infos, observation_spaces, action_spaces, names, strict=True)
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
        if len(group) != self.n:
            raise ValidationError(f"the group has {len(group)} sessions but the env {self.n} instances.")
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
