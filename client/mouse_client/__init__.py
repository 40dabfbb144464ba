"""mouse_client: a thin Python SDK for mouse.action.v1.ActionService (no torch needed).

from mouse_client import ActionClient
with ActionClient("127.0.0.1:50051") as client:
    session = client.open_session("default", seed=0)
    action = session.get_action({"action": 2, "reward": 0.5, "done": 0, "time": 7,
                                 "obs_continuous": [0.1, -0.3, 0.2]}, temperature=0.0)
"""

from mouse_client._core import RetryPolicy
from mouse_client.aio import AsyncActionClient, AsyncSession
from mouse_client.client import ActionClient, Session, SessionGroup, SessionStream
from mouse_client.errors import ActionError
from mouse_client.gym import GymAdapter
from mouse_client.routing import SESSION_HEADER, HashRing, routing_key
from mouse_client.steps import EpisodeRecorder, encode_steps

__all__ = [
    "SESSION_HEADER",
    "ActionClient",
    "ActionError",
    "AsyncActionClient",
    "AsyncSession",
    "EpisodeRecorder",
    "GymAdapter",
    "HashRing",
    "RetryPolicy",
    "Session",
    "SessionGroup",
    "SessionStream",
    "encode_steps",
    "routing_key",
]
