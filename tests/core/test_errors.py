"""Bad configs and bad inputs fail with messages that name the field, the value and the rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tensordict import TensorDict

from mouse_core import ConfigError, Model, StepValidationError
from tests.helpers import config_with, random_steps


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bogus": 1}, r"config: unknown key\(s\) \['bogus'\]"),
        (
            {"embedding_kwargs": {"include_actions": True}},
            r"embedding_kwargs: unknown key\(s\) \['include_actions'\]",
        ),
        ({"backbone_kwargs": {"num_layer": 2}}, r"backbone_kwargs: unknown key\(s\) \['num_layer'\]"),
        ({"dqn_head_kwargs": {"depth": 2}}, r"dqn_head_kwargs: unknown key\(s\) \['depth'\]"),
        (
            {"embedding_kwargs": {"max_num_time_steps": 0}},
            "include_time_token is true but max_num_time_steps is 0; expected > 0",
        ),
        (
            {"embedding_kwargs": {"include_obs_image": True}},
            "include_obs_image is true but max_num_obs_image is 0",
        ),
        ({"embedding_kwargs": {"fourier_in_min": -1.0}}, "expected 0 < fourier_in_min < fourier_in_max"),
        (
            {"backbone_kwargs": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}},
            "rope_type 'llama3' is not supported; expected 'default'",
        ),
        (
            {"backbone_kwargs": {"head_dim": 8, "use_sliding_window": True}},
            "use_sliding_window=true is not supported",
        ),
        (
            {"backbone_kwargs": {"num_heads": 6, "num_key_value_heads": 3}},
            r"hidden_dim \(32\) must be divisible by num_heads \(6\)",
        ),
        (
            {"backbone_kwargs": {"num_key_value_heads": 3}},
            r"num_heads \(4\) must be a multiple of num_key_value_heads \(3\)",
        ),
        ({"action_head": "q"}, r"action_head must be one of \['sp', 'dqn', 'vec_dqn', 'sv'\], got 'q'"),
        ({"action_head": "sp"}, "action_head is 'sp' but sp_head_kwargs.num_layers is 0"),
        ({"dqn_head_kwargs": {"num_layers": 0}}, "no output head is enabled"),
        (
            {"dqn_head_kwargs": {"num_layers": 2, "hidden_dim": None}},
            "dqn_head_kwargs.hidden_dim must be an integer >= 1",
        ),
        (
            {"vec_dqn_head_kwargs": {"num_layers": 2, "hidden_dim": 8}},
            "vec_dqn_head_kwargs.vec_dim must be an integer >= 1",
        ),
        ({"hidden_dim": 0}, "config.hidden_dim must be an integer >= 1, got 0"),
        (
            {"embedding_kwargs": {"token_data_len": 0}},
            "embedding_kwargs.token_data_len must be an integer >= 1",
        ),
    ],
)
def test_bad_configs(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Model(config_with(**changes))


def test_missing_required_keys() -> None:
    cfg = config_with()
    del cfg["embedding_kwargs"]["max_num_actions"]
    with pytest.raises(ConfigError, match=r"embedding_kwargs: .*max_num_actions"):
        Model(cfg)
    cfg = config_with()
    del cfg["hidden_dim"]
    with pytest.raises(ConfigError, match="missing required key 'hidden_dim'"):
        Model(cfg)


@pytest.fixture(scope="module")
def model() -> Model:
    torch.manual_seed(0)
    return Model(config_with())


def _stream(model: Model, **overrides: torch.Tensor) -> TensorDict:
    steps = random_steps(model.step_schema, (2, 3))
    steps.update(overrides)
    return TensorDict({k: v for k, v in steps.items() if v is not None}, batch_size=[2, 3])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("action", torch.full((2, 3), 4), r"action: got 4; expected an integer in \[0, 4\)"),
        ("action", torch.full((2, 3), -1), r"action: got -1; expected an integer in \[0, 4\)"),
        ("done", torch.full((2, 3), 3), r"done: got 3; expected an integer in \[0, 3\)"),
        ("time", torch.full((2, 3), 64), r"time: got 64; expected an integer in \[0, 64\)"),
        ("reward", torch.tensor([[0.0, float("nan"), 1.0]] * 2), "reward: got nan; expected finite floats"),
        (
            "obs_continuous",
            torch.full((2, 3, 3), float("inf")),
            "obs_continuous: got inf; expected finite floats",
        ),
        ("obs_continuous", torch.zeros(2, 3, 4), r"obs_continuous: shape \[2, 3, 4\]; expected \[2, 3, 3\]"),
        ("action", torch.zeros(2, 3), "action: dtype torch.float32; expected an integer dtype"),
        (
            "reward",
            torch.zeros(2, 3, dtype=torch.int64),
            "reward: dtype torch.int64; expected a floating dtype",
        ),
    ],
)
def test_bad_step_fields(model: Model, field: str, value: torch.Tensor, message: str) -> None:
    with pytest.raises(StepValidationError, match=message):
        model(_stream(model, **{field: value}))


def test_missing_field(model: Model) -> None:
    steps = random_steps(model.step_schema, (2, 3))
    del steps["done"]
    with pytest.raises(StepValidationError, match=r"done: missing; the model needs \['time', 'action'"):
        model(TensorDict(steps, batch_size=[2, 3]))


def test_pixels_out_of_range() -> None:
    torch.manual_seed(0)
    img = Model(config_with(embedding_kwargs={"include_obs_image": True, "max_num_obs_image": 4}))
    bad = torch.full((2, 3, 4), 256)
    with pytest.raises(StepValidationError, match=r"obs_image: got 256; expected an integer in \[0, 256\)"):
        img(_stream(img, obs_image=bad))


def test_cache_misuse(model: Model) -> None:
    _, cache = model(_stream(model), use_cache=True)
    assert cache is not None and cache.length == 3 * model.tokens_per_step
    one = TensorDict(
        {k: v[:1] for k, v in random_steps(model.step_schema, (2, 3)).items()}, batch_size=[1, 3]
    )
    with pytest.raises(ValueError, match="cache holds 2 sequences but step_stream has B=1"):
        model(one, cache=cache, use_cache=True)
    tps = model.tokens_per_step
    with pytest.raises(ValueError, match=f"cache_position must be the token positions {3 * tps}"):
        model(_stream(model), cache=cache, use_cache=True, cache_position=torch.arange(3 * tps))
    model(_stream(model), cache=cache, use_cache=True, cache_position=torch.arange(3 * tps, 6 * tps))


def test_get_action_arguments(model: Model) -> None:
    out, _ = model(_stream(model))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got -1"):
        model.get_action(out, temperature=-1)
    with pytest.raises(ValueError, match=r"num_actions must be in \[1, 4\], got 5"):
        model.get_action(out, num_actions=5)
