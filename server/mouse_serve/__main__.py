"""`mouse-serve` / `python -m mouse_serve`: serve MOUSE actions over gRPC."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
from collections.abc import Sequence

from mouse_serve.config import parse_args


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


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    limit_malloc_arenas()
    # oneDNN (and ideep, PyTorch's wrapper around it, for the pre-packed linears) keep a primitive
    # with its buffers per input shape they have seen, 1,024 of them by default; ragged batches
    # produce many shapes, so resident memory would creep up by hundreds of MiB over an hour.
    # Bound both caches (read when torch loads oneDNN, so before the import below).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "128")
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from mouse_serve.server import serve  # imports torch; after argument errors are reported

    try:
        asyncio.run(serve(config))
    except (ValueError, OSError, RuntimeError) as exc:  # bad device, unreadable model, busy port
        logging.getLogger("mouse_serve").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
