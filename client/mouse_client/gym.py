"""Drive a session from a Gymnasium-style loop (observation, reward, terminated, truncated)."""

from __future__ import annotations

from typing import Any

from mouse_client.client import Session, SessionStream
from mouse_client.steps import EpisodeRecorder


class GymAdapter:
    """Turns environment transitions into step records and actions.

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
        session: Session | SessionStream,
        *,
        temperature: float | None = None,
        num_actions: int | None = None,
        first_action: int = 0,
    ) -> None:
        self.session = session
        self.recorder = EpisodeRecorder(session.model, first_action=first_action)
        self.temperature = temperature
        self.num_actions = num_actions
        self._held: list[dict[str, Any]] = []

    def _act(self, records: list[dict[str, Any]]) -> int:
        return self.session.get_action(records, temperature=self.temperature, num_actions=self.num_actions)

    def reset(self, obs: Any) -> int:
        """The first action of an episode."""
        records, self._held = [*self._held, self.recorder.reset(obs)], []
        return self._act(records)

    def step(self, action: int, obs: Any, reward: float, terminated: bool, truncated: bool) -> int | None:
        """The next action, or None when the episode ended (call `reset` next)."""
        record = self.recorder.step(action, obs, reward, terminated, truncated)
        if terminated or truncated:
            self._held = [record]
            return None
        return self._act([record])
