"""Process memory: keep glibc's heap from ratcheting resident memory up (no-ops elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas (unless MALLOC_ARENA_MAX is set): with the gRPC,
    event-loop and runner threads allocating tensors of ever-changing shapes, the default (8 per
    core) lets resident memory creep up through fragmentation."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc), so ever-changing tensor shapes do not
    ratchet resident memory up; a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
