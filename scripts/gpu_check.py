"""The steps of scripts/gpu_check.sh that need Python: probe, sdpa, agreement, table.

python scripts/gpu_check.py probe --device cuda --out probe.json
python scripts/gpu_check.py sdpa --device cuda --out sdpa.json
python scripts/gpu_check.py agreement --device cuda --dtype bfloat16 --out bf16.json
python scripts/gpu_check.py table --out DIR      # the one table, from DIR's files
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Module -> the distribution to carry as a wheel when it is missing on the GPU machine.
NEEDED = {
    "torch": "torch",
    "numpy": "numpy",
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "google.rpc.status_pb2": "googleapis-common-protos",
    "grpc_health.v1.health": "grpcio-health-checking",
    "grpc_reflection.v1alpha.reflection": "grpcio-reflection",
    "grpc_status.rpc_status": "grpcio-status",
    "safetensors": "safetensors",
    "prometheus_client": "prometheus-client",
    "huggingface_hub": "huggingface-hub",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _version(module: Any) -> str:
    return str(getattr(module, "__version__", "?"))


def probe(args: argparse.Namespace) -> int:
    """Versions of everything the check uses; exit 1 naming what is missing or too old."""
    missing, versions = [], {}
    for name, dist in NEEDED.items():
        try:
            versions[dist] = _version(importlib.import_module(name))
        except Exception as exc:
            missing.append(f"{dist} ({name}: {type(exc).__name__}: {exc})")
    if not missing:
        for name in ("mouse_client.v1.action_service_pb2", "mouse_serve.server"):
            try:  # the generated code checks that protobuf is at least as new as its generator
                importlib.import_module(name)
            except Exception as exc:
                missing.append(f"{name}: {type(exc).__name__}: {exc}")
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "packages": versions,
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            card=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            bf16=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "?"
    else:
        info.update(card="(cpu)", driver="-", cuda="-")
    Path(args.out).write_text(json.dumps(info, indent=1))
    log(", ".join(f"{k} {v}" for k, v in info.items() if k != "packages"))
    if missing:
        log("missing or unusable: " + "; ".join(missing))
        log(
            "carry them as wheels in .whl/ (see bench/README.md, 'GPU check'): python3 -m pip download "
            "--no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl NAME==VERSION"
        )
        return 1
    return 0


def sdpa(args: argparse.Namespace) -> int:
    """The pool's attention on the default SDPA backend against the math backend, on a decode
    batch (64 sessions x 1 step) and a ragged prefill, float32 and bfloat16."""
    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mouse_core import KVCachePool

    dev = torch.device(args.device)
    torch.manual_seed(0)
    results, ok = [], True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for name, new_tokens, history in (
            ("decode 64 x 3 tokens", np.full(64, 3), 816),
            ("prefill 4 ragged", np.array([768, 9, 300, 1]), 0),
        ):
            pool = KVCachePool(1, 4, 32, len(new_tokens), 1024, num_heads=8, dtype=dtype, device=dev)
            slots = np.array([pool.allocate() for _ in new_tokens])
            pool.lengths[:] = history
            pool.kv.normal_()
            n = int(new_tokens.sum())
            q = torch.randn(n, 8 * 32, device=dev, dtype=dtype)
            kv = torch.randn(n, 2, 4, 32, device=dev, dtype=dtype)
            outs, times = {}, {}
            for backend in ("default", "math"):
                plan = pool.plan(slots, new_tokens)
                ctx = sdpa_kernel(SDPBackend.MATH) if backend == "math" else _null()
                with ctx, torch.inference_mode():
                    pool.attend(0, plan, q, kv)  # warm-up
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    outs[backend] = pool.attend(0, plan, q, kv).float()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times[backend] = 1e3 * (time.perf_counter() - t0)
            diff = float((outs["default"] - outs["math"]).abs().max())
            good = diff <= tol and bool(torch.isfinite(outs["default"]).all())
            ok &= good
            row = {
                "shape": name,
                "dtype": str(dtype).removeprefix("torch."),
                "max_abs_diff": diff,
                "tolerance": tol,
                "ok": good,
                "default_ms": times["default"],
                "math_ms": times["math"],
            }
            results.append(row)
            log(f"sdpa {row}")
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def agreement(args: argparse.Namespace) -> int:
    """Greedy actions of a `--dtype` server against the golden (float32 reference) ones."""
    sys.path.insert(0, str(ROOT))
    from mouse_client import ActionClient
    from tests.helpers import golden_cases
    from tests.server_process import ServerProcess

    cases = golden_cases()
    model_args = [a for c in cases for a in ("--model", f"{c.name}={c.checkpoint}")]
    server_args = ["--device", args.device, "--dtype", args.dtype, "--max-sessions", "8", *model_args]
    per_case, same, total = {}, 0, 0
    with ServerProcess(*server_args) as server, ActionClient(server.target) as client:
        for case in cases:
            hits = 0
            for b in range(case.batch):
                with client.open_session(case.name, temperature=0.0) as session:
                    got = [session.get_action(case.step_record(b, s)) for s in range(case.steps)]
                hits += sum(int(x == y) for x, y in zip(got, case.greedy(b), strict=True))
            n = case.batch * case.steps
            per_case[case.name] = hits / n
            same, total = same + hits, total + n
    out = {"dtype": args.dtype, "agreement": same / total, "actions": total, "per_case": per_case}
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"{args.dtype}: {same}/{total} greedy actions agree with the golden ones ({100 * same / total:.1f}%)")
    return 0


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> tuple[int, int] | None:
    """(tests, failed or in error) of a pytest junit XML file; None when it is missing or torn."""
    try:
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        return int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    except (OSError, ET.ParseError, IndexError):
        return None


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return str(x)


def table(args: argparse.Namespace) -> int:
    """One markdown table of the whole check; exit 1 unless the golden and update tests passed
    and the bench ran."""
    out = Path(args.out)
    probe_info = _read(out / "probe.json") or {}
    rows: list[tuple[str, str]] = [
        ("card", f"{probe_info.get('card', '?')} ({probe_info.get('memory_gib', '?')} GiB)"),
        ("driver / CUDA", f"{probe_info.get('driver', '?')} / {probe_info.get('cuda', '?')}"),
        ("torch / Python", f"{probe_info.get('torch', '?')} / {probe_info.get('python', '?')}"),
    ]
    for r in _read(out / "sdpa.json") or []:
        verdict = "ok" if r["ok"] else "MISMATCH"
        rows.append(
            (
                f"SDPA default vs math, {r['shape']}, {r['dtype']}",
                f"max diff {r['max_abs_diff']:.1e} ({verdict}); {r['default_ms']:.2f} vs {r['math_ms']:.2f} ms",
            )
        )
    passed = True
    for xml, name in (
        ("golden_e2e.xml", "golden end-to-end, float32, actions exact"),
        ("updates.xml", "weight updates, float32, scores after the update"),
    ):
        summary = _junit(out / xml)
        passed = passed and summary is not None and summary[0] > 0 and summary[1] == 0
        ran = f"{summary[0] - summary[1]}/{summary[0]} tests passed" if summary else None
        rows.append((name, ran or f"did not run (see {xml.replace('.xml', '.log')})"))
    bf16 = _read(out / "bf16.json")
    rows.append(
        (
            "bfloat16 greedy actions agreeing with the golden ones",
            f"{100 * bf16['agreement']:.1f}% of {bf16['actions']}" if bf16 else "did not run (see bf16.log)",
        )
    )
    bench = _read(out / "bench.json")
    if bench:
        for res in bench["results"]:
            shape = res["shape"]
            a = (res.get("a") or {}).get("unary") or {}
            rows.append(
                (
                    f"{shape}: a unary round trip p50 / p99",
                    f"{_fmt(a.get('median_ms'), 3)} / {_fmt(a.get('p99_ms'), 3)} ms",
                )
            )
            for rpc, runs in (res.get("b") or {}).items():  # a failed b measurement, by name
                for n, r in runs.items():
                    if "skipped" in r:
                        rows.append((f"{shape}: b {rpc}, {n} sessions", r["skipped"]))
            for n, r in sorted(((res.get("b") or {}).get("batched") or {}).items(), key=lambda x: int(x[0])):
                if "skipped" in r:
                    continue
                rows.append(
                    (
                        f"{shape}: b BatchGetAction, {n} sessions",
                        f"{_fmt(r.get('actions_per_s'), 0)} actions/s, p50 {_fmt(r.get('median_ms'), 2)} ms, "
                        f"p99 {_fmt(r.get('p99_ms'), 2)} ms per call",
                    )
                )
            for n, r in sorted((res.get("c") or {}).items(), key=lambda x: int(x[0])):
                rows.append((f"{shape}: c floor, batch {n}", f"{_fmt(r.get('actions_per_s'), 0)} actions/s"))
            mm = (res.get("floor_info") or {}).get("matmul")
            if mm:
                rows.append((f"{shape}: {mm['dtype']} matmul", f"{mm['flops_per_s'] / 1e9:,.1f} GFLOP/s"))
            for r in res.get("ratios") or []:
                rows.append(
                    (f"{shape}: {r['name']}", f"{_fmt(r['value'], 3)} (target {r['target']}: {r['verdict']})")
                )
    else:
        rows.append(("bench", "did not run (see bench.log)"))
    print("| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if passed and bench else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("probe", "sdpa", "agreement"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--out", required=True)
        if name == "agreement":
            p.add_argument("--dtype", default="bfloat16")
    sub.add_parser("table").add_argument("--out", required=True)
    args = parser.parse_args()
    return {"probe": probe, "sdpa": sdpa, "agreement": agreement, "table": table}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
