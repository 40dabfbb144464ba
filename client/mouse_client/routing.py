"""Routing keys and client-side sharding with consistent hashing.

A session's routing key is its id up to the first "." (sessions of a `SessionGroup` share one:
`<group>.<index>`), so a gRPC-aware proxy hashing the `mouse-session-id` header, or this client's
`HashRing`, sends every call of a session, and every batch of a group, to the same replica.
"""

from __future__ import annotations

import bisect
import hashlib
import secrets
from collections.abc import Sequence

SESSION_HEADER = "mouse-session-id"


def routing_key(session_id: str) -> str:
    return session_id.split(".", 1)[0]


def new_session_id() -> str:
    """An unguessable id (128 random bits, URL-safe, no ".")."""
    return secrets.token_urlsafe(16).replace(".", "_")


class HashRing:
    """Consistent hashing of routing keys onto targets (virtual nodes smooth the spread)."""

    def __init__(self, targets: Sequence[str], replicas: int = 128) -> None:
        if not targets:
            raise ValueError("HashRing needs at least one target.")
        self.targets = list(targets)
        points = sorted((self._hash(f"{t}#{i}"), t) for t in self.targets for i in range(replicas))
        self._keys = [p for p, _ in points]
        self._owners = [t for _, t in points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def target(self, key: str) -> str:
        i = bisect.bisect(self._keys, self._hash(key)) % len(self._keys)
        return self._owners[i]
