"""Shared test helpers: golden parity cases and small random models."""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_DIRS = (FIXTURES / "golden", FIXTURES / "golden_extra")


@dataclass(frozen=True)
class GoldenCase:
    """One reference parity case: checkpoint, inputs [B, S, ...] and expected outputs."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "case.json").read_text())

    @property
    def inputs(self) -> dict[str, Any]:
        """Input tensors (torch)."""
        from safetensors.torch import load_file

        return load_file(str(self.path / "inputs.safetensors"))

    @property
    def expected(self) -> dict[str, Any]:
        """Expected tensors (torch)."""
        from safetensors.torch import load_file

        return load_file(str(self.path / "expected.safetensors"))

    @cached_property
    def input_arrays(self) -> dict[str, np.ndarray]:
        return read_safetensors(self.path / "inputs.safetensors")

    @cached_property
    def expected_arrays(self) -> dict[str, np.ndarray]:
        return read_safetensors(self.path / "expected.safetensors")

    @property
    def batch(self) -> int:
        return int(self.meta["batch"])

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def tolerance(self) -> dict[str, float]:
        return self.meta["tolerance"]

    def step_record(self, b: int, s: int) -> dict[str, Any]:
        """Row `b`, step `s` as a plain dict of Python scalars / lists."""
        return {k: v[b, s].tolist() for k, v in self.input_arrays.items()}

    def greedy(self, b: int, trimmed: bool = False) -> list[int]:
        return self.expected_arrays["greedy_trim" if trimmed else "greedy"][b].tolist()


_ST_DTYPES = {
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A numpy-only reader of the safetensors format (the client tests have no torch)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def golden_cases() -> list[GoldenCase]:
    cases = []
    for root in GOLDEN_DIRS:
        if root.is_dir():
            cases += [GoldenCase(p) for p in sorted(root.iterdir()) if (p / "case.json").is_file()]
    return cases


LLAMA_CONFIG: dict[str, Any] = {
    "hidden_dim": 32,
    "backbone_kwargs": {"num_layers": 2, "num_heads": 4, "num_key_value_heads": 2},
    "embedding_kwargs": {
        "max_num_actions": 4,
        "token_data_len": 2,
        "num_compute_tokens": 1,
        "include_action_token": True,
        "include_reward_token": True,
        "include_done_token": True,
        "include_time_token": True,
        "include_obs_continuous": True,
        "include_type_token": True,
        "max_num_time_steps": 64,
        "max_num_obs_continuous": 3,
        "fourier_in_min": 0.01,
        "fourier_in_max": 10.0,
    },
    "dqn_head_kwargs": {"num_layers": 2, "hidden_dim": 16},
    "sp_head_kwargs": {"num_layers": 0},
    "sv_head_kwargs": {"num_layers": 0},
    "vec_dqn_head_kwargs": {"num_layers": 0},
    "action_head": None,
}


def config_with(**changes: Any) -> dict[str, Any]:
    """`LLAMA_CONFIG` with top-level keys replaced or, for dict sections, updated."""
    cfg = copy.deepcopy(LLAMA_CONFIG)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def random_steps(schema: Any, shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Valid random step fields with leading `shape` for a `StepSchema`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in schema.fields:
        full = shape + spec.per_step_shape
        if spec.kind == "float":
            out[spec.name] = torch.randn(full, generator=gen)
        else:
            out[spec.name] = torch.randint(0, spec.high, full, generator=gen)
    return out
