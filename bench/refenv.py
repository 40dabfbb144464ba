"""The bench-only virtual environment of the reference, PyPI `mouse-core` 0.3.0 (import `mouse`).

Created on demand at `bench/.venv-reference` and never a dependency of the project. The recipe:
torch pinned first (an unpinned torch would pull a multi-GB CUDA build), then the reference's
own requirements, then the `mouse-core` wheel without its requirements (it declares
Python >= 3.12 but runs on 3.11; letting pip resolve it would ask for a numpy that needs 3.12).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH / ".venv-reference"
REFERENCE = "mouse-core==0.3.0"
TORCH = "torch==2.13.0"
REQUIREMENTS = [
    "transformers",
    "tensordict",
    "datasets",
    "huggingface_hub",
    "pillow",
    "safetensors",
    "numpy<2.5",
]
MARKER = ".bench-ready"
CHECK = "import mouse, torch, tensordict; print(torch.__version__)"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path) -> bool:
    py = venv_python(venv)
    if not (venv / MARKER).is_file() or not py.exists():
        return False
    return subprocess.run([str(py), "-c", CHECK], capture_output=True).returncode == 0


def _run(cmd: list[str], log) -> None:
    print("  $", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def ensure(venv: Path = DEFAULT_VENV, log=sys.stderr, base_python: str | None = None) -> Path:
    """Return the reference venv's python, building the venv first when needed."""
    if is_ready(venv):
        return venv_python(venv)
    print(f"[bench] building the reference venv at {venv} (one time, a few minutes)", file=log, flush=True)
    if not venv_python(venv).exists():  # a half-built venv is completed, not rebuilt
        base = base_python or getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", str(venv)], log)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    # 1. torch, pinned (a CPU wheel is found through the machine's pip configuration).
    _run([*pip, TORCH], log)
    # 2. the reference's requirements, with torch held at the pinned version.
    _run([*pip, TORCH, *REQUIREMENTS], log)
    # 3. the reference itself, without resolving its requirements.
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                str(venv_python(venv)),
                *("-m", "pip", "download", "--quiet", "--no-deps", "--ignore-requires-python"),
                *("-d", tmp, REFERENCE),
            ],
            log,
        )
        wheels = sorted(Path(tmp).glob("mouse_core-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {REFERENCE} gave no wheel in {tmp}")
        _run([*pip, "--no-deps", "--ignore-requires-python", str(wheels[0])], log)
    if subprocess.run([str(venv_python(venv)), "-c", CHECK], capture_output=True).returncode != 0:
        raise RuntimeError(f"the reference venv at {venv} was built but `{CHECK}` fails")
    (venv / MARKER).write_text(f"{TORCH} {REFERENCE}\n")
    return venv_python(venv)


def main() -> int:
    p = argparse.ArgumentParser(description="Build (if needed) the reference venv; print its python.")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    if args.rebuild and args.venv.exists():
        shutil.rmtree(args.venv)
    print(ensure(args.venv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
