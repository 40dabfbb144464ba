"""Loading and saving checkpoints in the reference layout: `config.json` + `model.safetensors`.

A checkpoint is a local folder or a Hugging Face Hub repo id; Hub files go through
`huggingface_hub`, which honours `HF_HUB_OFFLINE`, `HF_HOME`/`HF_HUB_CACHE` and its cache.
Older checkpoints carrying `pytorch_model.bin` instead of safetensors load too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mouse_core.config import ConfigError, ModelConfig
from mouse_core.model import Model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be found or does not match its config."""


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {list(DTYPES)}.")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {list(DTYPES)}.")
    return DTYPES[dtype]


def local_path(repo_id_or_path: str) -> Path | None:
    """The local file or folder `repo_id_or_path` names (`~` expanded), or None when nothing
    is there: also for names the file system refuses (an unknown `~user`, a NUL byte, a name
    too long), which are then no local path, not an error."""
    try:
        local = Path(repo_id_or_path).expanduser()
    except (RuntimeError, ValueError):  # `~user` of an unknown user, a NUL byte: a name as written
        local = Path(repo_id_or_path)
    try:
        return local if local.exists() else None
    except (OSError, ValueError):  # a name too long or with a NUL byte
        return None


def _fetch(
    repo_id_or_path: str, force_download: bool, local_dir: str | Path | None, hub_kwargs: dict[str, Any]
) -> tuple[Path, Path]:
    """Return local paths of (config.json, weights) for a folder or a Hub repo."""
    local = local_path(repo_id_or_path)
    if local is not None:
        if not local.is_dir():
            raise CheckpointError(f"{repo_id_or_path!r} is a file; expected a checkpoint folder.")
        config = local / CONFIG_FILE
        if not config.is_file():
            raise CheckpointError(f"{local} has no {CONFIG_FILE}; expected a MOUSE checkpoint folder.")
        for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
            if (local / name).is_file():
                return config, local / name
        raise CheckpointError(f"{local} has neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}.")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    kwargs: dict[str, Any] = {"force_download": force_download, **hub_kwargs}
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir)
    try:
        config = Path(hf_hub_download(repo_id_or_path, CONFIG_FILE, **kwargs))
        try:
            weights = Path(hf_hub_download(repo_id_or_path, WEIGHTS_FILE, **kwargs))
        except EntryNotFoundError:
            weights = Path(hf_hub_download(repo_id_or_path, LEGACY_WEIGHTS_FILE, **kwargs))
    except Exception as exc:  # validation, offline cache miss, network, auth, missing repo
        raise CheckpointError(
            f"{repo_id_or_path!r} is not a local folder and could not be loaded from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc})."
        ) from exc
    return config, weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt files: safetensors, pickle and zip errors
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}).") from exc


def read_checkpoint(
    repo_id_or_path: str | Path, *, revision: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the weights (CPU tensors as stored) of a checkpoint folder or Hub repo id,
    without building a model (e.g. to update a served model's weights in place)."""
    hub_kwargs = {"revision": revision} if revision else {}
    config_path, weights_path = _fetch(str(repo_id_or_path), False, None, hub_kwargs)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
    return ModelConfig.from_dict(raw), _read_state_dict(weights_path)


def load_model(
    repo_id_or_path: str | Path,
    force_download: bool = False,
    local_dir: str | Path | None = None,
    *,
    map_location: str | torch.device | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = True,
    **hub_kwargs: Any,
) -> Model:
    """Load a MOUSE checkpoint from a local folder or a Hugging Face Hub repo id.

    `device` (or its alias `map_location`) places the model; `dtype` (float32, bfloat16,
    float16) applies to the decoder stack, the embedder and heads stay float32. Extra keyword
    arguments (`revision`, `token`, `cache_dir`, ...) go to `huggingface_hub.hf_hub_download`.
    Raises `CheckpointError` for a missing or mismatched checkpoint and `ConfigError` for an
    invalid `config.json`.
    """
    config_path, weights_path = _fetch(str(repo_id_or_path), force_download, local_dir, hub_kwargs)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
    model = Model(ModelConfig.from_dict(raw))
    state = _read_state_dict(weights_path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{weights_path.name} does not match config.json: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}."
        )
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path.name}: {key} has shape {list(value.shape)}, config.json implies "
                f"{list(expected[key].shape)}."
            )
    model.load_state_dict(state, strict=strict)
    target = device if device is not None else map_location
    if target is not None:
        model.to(target)
    return model.to_backbone_dtype(_resolve_dtype(dtype)).eval()


def save_model(model: Model, path: str | Path) -> None:
    """Write `config.json` and `model.safetensors` into `path` (created if absent)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), sort_keys=True, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only
