"""Write the README's settings table from `mouse_serve.config.ServerConfig` (its one source).

python scripts/gen_docs.py          # rewrite the table in README.md
python scripts/gen_docs.py --check  # exit 1 when README.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mouse_serve.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- settings:begin (scripts/gen_docs.py) -->\n", "<!-- settings:end -->\n"


def render(text: str) -> str:
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md lacks the markers {BEGIN.strip()} ... {END.strip()}")
    return head + BEGIN + markdown_table() + END + tail


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when README.md is stale")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's settings table is stale; run python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
