"""`mouse-serve` / `python -m mouse_serve`: serve MOUSE actions over gRPC."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from mouse_serve.config import parse_args
from mouse_serve.memory import limit_malloc_arenas


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    limit_malloc_arenas()
    # oneDNN, and ideep (PyTorch's wrapper around it for the pre-packed linears), keep a primitive
    # with its buffers per input shape, 1,024 of them by default. The model packs only a bounded
    # set of shapes (see mouse_core.model.PACKED_MAX_ROWS); the caps make sure resident memory
    # cannot creep up by hundreds of MiB anyway. Read when torch loads oneDNN: before the import.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "256")
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("mouse_serve")
    try:
        from mouse_serve.server import prepare, serve  # imports torch; after argument errors

        runners = prepare(config)
        asyncio.run(serve(config, runners))
    except (ValueError, OSError, RuntimeError) as exc:  # bad device, unreadable model, busy port
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading (a compile can take minutes); later it drains
        log.error("interrupted before serving")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
