"""Model shapes built by the bench: config dicts in the reference `config.json` layout, random
weights from a fixed seed, saved once per shape into a cache folder."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH / ".cache"

OFF = {"num_layers": 0}

# Every include flag and max size is written out: the reference requires max_num_obs_discrete,
# max_num_obs_image, include_obs_discrete and include_obs_image even when they are unused.
EMBEDDING: dict[str, Any] = {
    "max_num_actions": 4,
    "include_action_token": True,
    "include_reward_token": True,
    "include_done_token": True,
    "include_time_token": True,
    "max_num_time_steps": 512,
    "include_obs_continuous": True,
    "max_num_obs_continuous": 8,
    "include_obs_discrete": False,
    "max_num_obs_discrete": 0,
    "include_obs_image": False,
    "max_num_obs_image": 0,
    "include_type_token": True,
    "token_data_len": 2,
    "num_compute_tokens": 1,
    "concat_modalities": False,
    "fourier_in_min": 0.01,
    "fourier_in_max": 10.0,
}


def _config(hidden: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {
        "hidden_dim": hidden,
        "backbone_kwargs": {"num_layers": layers, "num_heads": heads, "num_key_value_heads": kv_heads},
        "embedding_kwargs": copy.deepcopy(EMBEDDING),
        "dqn_head_kwargs": {"num_layers": 2, "hidden_dim": 256},
        "sp_head_kwargs": dict(OFF),
        "sv_head_kwargs": dict(OFF),
        "vec_dqn_head_kwargs": dict(OFF),
        "action_head": None,
    }


SHAPES: dict[str, dict[str, Any]] = {
    # Llama, hidden 256, 4 layers, 8 heads, 4 KV heads, 3 tokens per step: about 4.5 M parameters.
    "mid": _config(256, 4, 8, 4),
    # Llama, hidden 1024, 8 layers, 16 heads, 4 KV heads (GPU only by default).
    "large": _config(1024, 8, 16, 4),
    # Llama, hidden 32, 1 layer: a forward of a few ms even at 64 sessions on CPU, for measuring
    # the server's own work per action (bench/host.py), as on a GPU where the forward is short.
    "tiny": _config(32, 1, 2, 1),
}
SEED = 20240601


def feed_spec(shape: str) -> dict[str, int]:
    """What the bench's step records look like for `shape` (shared with the reference script)."""
    emb = SHAPES[shape]["embedding_kwargs"]
    return {
        "obs_dim": emb["max_num_obs_continuous"],
        "max_time": emb["max_num_time_steps"],
        "num_actions": emb["max_num_actions"],
        "tokens_per_step": emb["token_data_len"] + emb["num_compute_tokens"],
    }


def kv_geometry(shape: str) -> dict[str, int]:
    cfg = SHAPES[shape]
    bb = cfg["backbone_kwargs"]
    return {
        "layers": bb["num_layers"],
        "kv_heads": bb["num_key_value_heads"],
        "head_dim": cfg["hidden_dim"] // bb["num_heads"],
    }


def _fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps({"config": config, "seed": SEED}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint(shape: str, cache: Path = DEFAULT_CACHE) -> tuple[Path, int]:
    """The folder of `shape`'s checkpoint (built on first use) and its parameter count."""
    config = SHAPES[shape]
    folder = cache / shape
    stamp = folder / "bench-fingerprint.json"
    fp = _fingerprint(config)
    if stamp.is_file():
        meta = json.loads(stamp.read_text())
        if meta.get("fingerprint") == fp and (folder / "model.safetensors").is_file():
            return folder, int(meta["num_parameters"])

    import torch

    from mouse_core import Model, ModelConfig, save_model

    torch.manual_seed(SEED)
    model = Model(ModelConfig.from_dict(copy.deepcopy(config)))
    # Re-draw every parameter so that attention is far from uniform and every weight matters
    # (the default init gives near-identical scores; timing does not care, actions do).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5)
            else:
                p.normal_(0.0, 0.02)
        if model.dqn_head is not None:
            model.dqn_head.target.load_state_dict(model.dqn_head.online.state_dict())
    n = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder)
    stamp.write_text(json.dumps({"fingerprint": fp, "num_parameters": n, "seed": SEED}, indent=2))
    return folder, n
