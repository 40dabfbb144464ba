"""Generate the Python code and type stubs of proto/ into client/mouse_client/v1/.

    python scripts/gen_proto.py          # regenerate
    python scripts/gen_proto.py --check  # exit 1 when the committed files are stale

protoc (from grpcio-tools) writes modules that import `mouse.action.v1...`; they are moved
into the `mouse_client.v1` package and their imports rewritten to match.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["mouse/action/v1/action_service.proto"]
OUT = ROOT / "client" / "mouse_client" / "v1"
BIN = Path(sys.executable).parent


def generate() -> dict[str, str]:
    """Run protoc into a scratch folder; return {file name: rewritten text}."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            *PROTO_FILES,
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        files = {}
        for path in sorted((Path(tmp) / "mouse" / "action" / "v1").iterdir()):
            text = path.read_text().replace("from mouse.action.v1 import", "from mouse_client.v1 import")
            files[path.name] = text
    files["__init__.py"] = (
        '"""Generated gRPC code of mouse.action.v1 (scripts/gen_proto.py; do not edit)."""\n'
    )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when committed files differ")
    args = parser.parse_args()
    files = generate()
    if args.check:
        stale = []
        for name, text in files.items():
            current = (OUT / name).read_text() if (OUT / name).exists() else ""
            if current != text:
                stale.append(name)
                sys.stdout.writelines(
                    list(difflib.unified_diff(current.splitlines(True), text.splitlines(True), name, name))[
                        :40
                    ]
                )
        extra = sorted(p.name for p in OUT.iterdir() if p.is_file() and p.name not in files)
        if stale or extra:
            print(f"generated code is stale: {stale + extra}; run python scripts/gen_proto.py")
            return 1
        print("generated code is up to date")
        return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(files)} files to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
