"""Bearer-token authentication: tokens from a file (one per line), reloaded when it changes.

A session belongs to the token that opened it. Tokens are never kept in session state or logs:
the owner is a short digest of the token.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from mouse_serve.errors import unauthenticated

log = logging.getLogger(__name__)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuth:
    """The tokens of `--token-file`; `owner(metadata)` maps a request to its owner or refuses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._owners: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def _read(self) -> dict[str, str]:
        lines = self.path.read_text().splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        return {_digest(t): _digest(t)[:16] for t in tokens}

    def reload(self) -> None:
        """(Re)read the file; raises OSError when it cannot be read."""
        stat = os.stat(self.path)
        self._owners = self._read()
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if not self._owners:
            log.warning("%s holds no tokens: every ActionService call will be refused", self.path)
        log.info("loaded %d token(s) from %s", len(self._owners), self.path)

    def reload_if_changed(self) -> None:
        """Re-read the file when it changed. A file that is gone or unreadable revokes every
        token (fail closed) until it is back."""
        try:
            stat = os.stat(self.path)
            if (stat.st_mtime_ns, stat.st_size, stat.st_ino) != self._stamp:
                self.reload()
        except OSError as exc:
            if self._stamp is not None or self._owners:
                log.warning(
                    "cannot read token file %s (%s): every token is refused until it is back", self.path, exc
                )
            self._owners, self._stamp = {}, None

    def owner(self, authorization: str | None) -> str:
        """The owner id of an `authorization` header's bearer token; UNAUTHENTICATED otherwise."""
        if authorization is None:
            raise unauthenticated("missing 'authorization: Bearer <token>' metadata.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the authorization metadata must be 'Bearer <token>'.")
        owner = self._owners.get(_digest(token.strip()))
        if owner is None:
            raise unauthenticated("the bearer token is not valid.")
        return owner
