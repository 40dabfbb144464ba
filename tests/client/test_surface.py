"""The SDK's surface: the asyncio classes have every method of the blocking ones, with the same
parameters and defaults; the exports are the API a user needs; one error hierarchy."""

from __future__ import annotations

import inspect

import pytest

import mouse_client
from mouse_client import (
    ActionClient,
    ActionError,
    AsyncActionClient,
    AsyncRemoteAgent,
    AsyncSession,
    AsyncSessionGroup,
    AsyncSessionStream,
    AsyncVectorGymAdapter,
    GroupError,
    MouseClientError,
    RemoteAgent,
    Session,
    SessionClosedError,
    SessionGroup,
    SessionStream,
    ValidationError,
    VectorGymAdapter,
)

TWINS = [
    (ActionClient, AsyncActionClient),
    (Session, AsyncSession),
    (SessionStream, AsyncSessionStream),
    (SessionGroup, AsyncSessionGroup),
    (RemoteAgent, AsyncRemoteAgent),
    (VectorGymAdapter, AsyncVectorGymAdapter),
]


DUNDERS = {
    "__enter__": "__aenter__",
    "__exit__": "__aexit__",
    "__len__": "__len__",
    "__getitem__": "__getitem__",
}


def public(cls: type) -> dict[str, object]:
    keep = set(DUNDERS) | set(DUNDERS.values())
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") or n in keep}


@pytest.mark.parametrize(("sync", "aio"), TWINS, ids=[s.__name__ for s, _ in TWINS])
def test_async_twin_has_the_same_surface(sync: type, aio: type) -> None:
    s, a = public(sync), public(aio)
    assert {DUNDERS.get(n, n) for n in s} == set(a)
    for name, member in s.items():
        if name in ("__enter__", "__exit__") or not callable(member) or isinstance(member, type):
            continue
        twin = a[DUNDERS.get(name, name)]
        assert inspect.signature(member).parameters.keys() == inspect.signature(twin).parameters.keys(), name
        for p, q in zip(
            inspect.signature(member).parameters.values(),
            inspect.signature(twin).parameters.values(),
            strict=True,
        ):
            assert p.default == q.default, f"{sync.__name__}.{name}({p.name}) defaults differ"
        blocking = not inspect.iscoroutinefunction(member)
        assert blocking, f"{sync.__name__}.{name} must block"
    assert (
        inspect.signature(sync.__init__).parameters.keys()
        == inspect.signature(aio.__init__).parameters.keys()
    )


def test_exports_are_the_user_api() -> None:
    assert sorted(mouse_client.__all__) == mouse_client.__all__
    assert not {"HashRing", "routing_key", "SESSION_HEADER"} & set(mouse_client.__all__)
    assert all(hasattr(mouse_client, name) for name in mouse_client.__all__)


def test_one_error_hierarchy() -> None:
    assert issubclass(ActionError, MouseClientError)
    assert issubclass(GroupError, ActionError)
    assert issubclass(SessionClosedError, MouseClientError)
    assert issubclass(ValidationError, MouseClientError) and issubclass(ValidationError, ValueError)
