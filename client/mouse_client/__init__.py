"""mouse_client: the Python SDK for mouse.action.v1.ActionService (no torch needed).

    from mouse_client import ActionClient
    with ActionClient("127.0.0.1:50051") as client:
        info = client.model_info("default")                  # the step schema: info.fields
        session = client.open_session("default", seed=0)
        action = session.get_action({"action": 0, "reward": 0.0, "done": 0, "time": 0,
                                     "obs_continuous": [0.1, -0.3, 0.2, 0.0]})

Internals (routing keys, the hash ring, the sans-I/O core) stay importable from their modules.
"""

from mouse_client._core import RetryPolicy
from mouse_client.aio import AsyncActionClient, AsyncSession, AsyncSessionGroup, AsyncSessionStream
from mouse_client.client import ActionClient, Session, SessionGroup, SessionStream
from mouse_client.errors import (
    ActionError,
    EntryOutcome,
    GroupError,
    MouseClientError,
    SessionClosedError,
    ValidationError,
)
from mouse_client.gym import AsyncVectorGymAdapter, GymAdapter, VectorGymAdapter
from mouse_client.mouse_env import AsyncRemoteAgent, RemoteAgent
from mouse_client.steps import EpisodeRecorder, RecordBuilder, encode_steps

__all__ = [
    "ActionClient",
    "ActionError",
    "AsyncActionClient",
    "AsyncRemoteAgent",
    "AsyncSession",
    "AsyncSessionGroup",
    "AsyncSessionStream",
    "AsyncVectorGymAdapter",
    "EntryOutcome",
    "EpisodeRecorder",
    "GroupError",
    "GymAdapter",
    "MouseClientError",
    "RecordBuilder",
    "RemoteAgent",
    "RetryPolicy",
    "Session",
    "SessionClosedError",
    "SessionGroup",
    "SessionStream",
    "ValidationError",
    "VectorGymAdapter",
    "encode_steps",
]
