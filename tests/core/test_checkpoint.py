"""Checkpoint loading and saving: folders, the Hub cache (offline), legacy .bin, dtypes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from mouse_core import CheckpointError, ConfigError, Model, load_model, save_model
from tests.helpers import config_with, golden_cases

REPO = Path(__file__).resolve().parents[2]
CASE = next(c for c in golden_cases() if c.name == "llama_sum_dqn")


def _full(model: Model) -> torch.Tensor:
    stream = TensorDict(CASE.inputs, batch_size=[CASE.meta["batch"], CASE.meta["steps"]])
    with torch.no_grad():
        return model(stream)[0]["dqn"]


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Model(config_with())
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == config_with()
    loaded = load_model(tmp_path / "ckpt")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_saved_golden_checkpoint_is_identical(tmp_path: Path) -> None:
    model = load_model(CASE.checkpoint)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (CASE.checkpoint / "config.json").read_text()
    )
    reloaded = load_model(tmp_path)
    # The weights are data: exactly the same on every machine. The outputs are computed here and
    # the golden ones on another CPU: equal within the golden tolerance.
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    torch.testing.assert_close(_full(reloaded), CASE.expected["full.dqn"], **CASE.tolerance)


def test_loads_in_a_process_without_transformers(tmp_path: Path) -> None:
    """A saved model loads and runs with `transformers` made unimportable."""
    save_model(load_model(CASE.checkpoint), tmp_path)
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, mouse_core\n"
        f"m = mouse_core.load_model({str(tmp_path)!r})\n"
        "assert 'transformers' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(m.action_head)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "dqn"


def test_legacy_pytorch_model_bin(tmp_path: Path) -> None:
    shutil.copy(CASE.checkpoint / "config.json", tmp_path)
    state = load_model(CASE.checkpoint).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(_full(load_model(tmp_path)), CASE.expected["full.dqn"], **CASE.tolerance)


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out a huggingface_hub cache holding `repo_id` at a fake commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hub_repo_id_offline_from_cache(tmp_path: Path, weights: str) -> None:
    """A Hub repo id resolves through huggingface_hub's own cache with HF_HUB_OFFLINE=1."""
    src = CASE.checkpoint
    if weights == "pytorch_model.bin":
        torch.save(load_model(src).state_dict(), tmp_path / weights)
        files = {"config.json": src / "config.json", weights: tmp_path / weights}
    else:
        files = {"config.json": src / "config.json", weights: src / weights}
    _hub_cache(tmp_path / "hub", "mouse-org/llama-sum-dqn", files)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path),
    }
    code = (
        "import torch, mouse_core\n"
        "from safetensors.torch import load_file\n"
        "from tensordict import TensorDict\n"
        f"inputs = load_file({str(CASE.path / 'inputs.safetensors')!r})\n"
        f"expected = load_file({str(CASE.path / 'expected.safetensors')!r})\n"
        "m = mouse_core.load_model('mouse-org/llama-sum-dqn')\n"
        "out, _ = m(TensorDict(inputs, batch_size=[2, 6]))\n"
        "torch.testing.assert_close(out['dqn'], expected['full.dqn'], rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_hub_miss_offline_is_a_clear_error(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: local_files_only is the same
    # cache-only lookup for a process that has imported it already (no network wait)
    with pytest.raises(CheckpointError, match="'nobody/nothing' is not a local folder"):
        load_model("nobody/nothing", cache_dir=str(tmp_path), local_files_only=True)


def test_unknown_users_home_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'~no-such-user-0/ckpt' is not a local folder"):
        load_model("~no-such-user-0/ckpt", cache_dir=str(tmp_path), local_files_only=True)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_model(tmp_path)
    shutil.copy(CASE.checkpoint / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"has neither model\.safetensors nor pytorch_model\.bin"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    cfg = json.loads((CASE.checkpoint / "config.json").read_text())
    cfg["backbone_kwargs"]["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(CASE.checkpoint / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match=r"missing \['backbone\.layers\.2\."):
        load_model(tmp_path)
    cfg["backbone_kwargs"]["num_layers"] = 2
    cfg["hidden_dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \[1, 64\], config\.json implies \[1, 128\]"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16])
def test_reduced_precision_backbone(dtype: str | torch.dtype) -> None:
    model = load_model(CASE.checkpoint, dtype=dtype)
    assert model.backbone is not None
    assert model.backbone_dtype in (torch.bfloat16, torch.float16)
    assert model.embedder.type_embedder.embed.weight.dtype == torch.float32  # stays float32
    assert model.backbone.inv_freq.dtype == torch.float32
    out = _full(model)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, CASE.expected["full.dqn"], rtol=0.05, atol=0.05)


def test_bad_dtype_and_device() -> None:
    with pytest.raises(ValueError, match="dtype 'float64' is not supported"):
        load_model(CASE.checkpoint, dtype="float64")
    model = load_model(CASE.checkpoint, device="cpu", map_location="cpu")
    assert model.device.type == "cpu"
