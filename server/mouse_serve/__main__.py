"""`mouse-serve` / `python -m mouse_serve`: serve MOUSE actions over gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from mouse_serve.config import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
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
