"""Model configuration: the `config.json` of a checkpoint, parsed and validated.

A checkpoint's `config.json` holds the reference implementation's constructor kwargs
(`hidden_dim`, `backbone_kwargs`, `embedding_kwargs`, one `*_head_kwargs` per head and
`action_head`). `ModelConfig.from_dict` turns that into typed, validated sections and keeps
the original dict so `save_model` writes back exactly what was loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

BackboneKind = Literal["llama", "qwen3", "none"]
HEAD_NAMES: tuple[str, ...] = ("sp", "dqn", "vec_dqn", "sv")
# Order in which modalities are embedded (sum mode) and laid out (concat mode).
MODALITIES: tuple[str, ...] = (
    "time",
    "action",
    "obs_continuous",
    "obs_discrete",
    "obs_image",
    "reward",
    "done",
)
# Token-type ids of the type embedding table (8 rows; 0 is padding).
TOKEN_TYPE: dict[str, int] = {
    "action": 1,
    "reward": 2,
    "done": 3,
    "obs_image": 4,
    "obs_continuous": 5,
    "time": 6,
    "obs_discrete": 7,
}
NUM_DONE_VALUES = 3


class ConfigError(ValueError):
    """A checkpoint or constructor config is invalid; the message names the key."""


def _build(cls: type, section: str, kwargs: dict[str, Any], **extra: Any) -> Any:
    """Instantiate dataclass `cls` from `kwargs`, rejecting unknown keys with a clear message."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{section} must be a JSON object, got {type(kwargs).__name__}.")
    known = {f.name for f in dataclasses.fields(cls) if f.init} - set(extra)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; expected a subset of {sorted(known)}.")
    try:
        return cls(**kwargs, **extra)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{section}: {exc}") from None


def _positive(section: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}.")
    return value


@dataclass(frozen=True)
class EmbeddingConfig:
    """`embedding_kwargs`: which step fields the model reads and how they become tokens."""

    max_num_actions: int
    token_data_len: int
    max_num_obs_continuous: int = 0
    max_num_obs_discrete: int = 0
    max_num_obs_image: int = 0
    max_num_time_steps: int = 0
    include_action_token: bool = False
    include_reward_token: bool = False
    include_done_token: bool = False
    include_time_token: bool = False
    include_obs_continuous: bool = False
    include_obs_discrete: bool = False
    include_obs_image: bool = False
    include_type_token: bool = False
    num_compute_tokens: int = 0
    concat_modalities: bool = False
    fourier_in_min: float = -1.0
    fourier_in_max: float = 1.0
    std: float = 0.02
    obs_continuous_encoder: Any = None  # written by some reference versions; ignored

    def __post_init__(self) -> None:
        s = "embedding_kwargs"
        _positive(s, "max_num_actions", self.max_num_actions)
        _positive(s, "token_data_len", self.token_data_len)
        _positive(s, "num_compute_tokens", self.num_compute_tokens, minimum=0)
        for flag, size in (
            ("include_action_token", "max_num_actions"),
            ("include_time_token", "max_num_time_steps"),
            ("include_obs_continuous", "max_num_obs_continuous"),
            ("include_obs_discrete", "max_num_obs_discrete"),
            ("include_obs_image", "max_num_obs_image"),
        ):
            value = getattr(self, size)
            if getattr(self, flag) and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{s}: {flag} is true but {size} is {value!r}; expected > 0.")
        if not self.modalities:
            raise ConfigError(f"{s}: no modality is included; enable at least one include_* flag.")
        if self.include_reward_token or self.include_obs_continuous:
            lo, hi = self.fourier_in_min, self.fourier_in_max
            if not (0 < lo < hi and math.isfinite(hi)):
                raise ConfigError(
                    f"{s}: fourier_in_min/fourier_in_max are {lo!r}/{hi!r}; "
                    "expected 0 < fourier_in_min < fourier_in_max (needed by reward/obs_continuous)."
                )

    @property
    def modalities(self) -> tuple[str, ...]:
        """Included modalities in embedding order."""
        flags = {
            "time": self.include_time_token,
            "action": self.include_action_token,
            "obs_continuous": self.include_obs_continuous,
            "obs_discrete": self.include_obs_discrete,
            "obs_image": self.include_obs_image,
            "reward": self.include_reward_token,
            "done": self.include_done_token,
        }
        return tuple(m for m in MODALITIES if flags[m])

    @property
    def tokens_per_step(self) -> int:
        blocks = len(self.modalities) if self.concat_modalities else 1
        return blocks * self.token_data_len + self.num_compute_tokens


@dataclass(frozen=True)
class BackboneConfig:
    """`backbone_kwargs` of a Llama or Qwen3 decoder stack."""

    kind: BackboneKind
    num_layers: int
    num_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # Qwen3 only
    max_position_embeddings: int | None = None
    expand: int | None = None
    intermediate_size: int | None = None
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False  # Qwen3 only
    hidden_dim: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        s = "backbone_kwargs"
        qwen3 = self.kind == "qwen3"
        _positive(s, "num_layers", self.num_layers)
        _positive(s, "num_heads", self.num_heads)
        kv_heads = self.num_key_value_heads if self.num_key_value_heads is not None else self.num_heads
        _positive(s, "num_key_value_heads", kv_heads)
        if self.num_heads % kv_heads:
            raise ConfigError(
                f"{s}: num_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({kv_heads})."
            )
        if self.head_dim is None and self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"{s}: hidden_dim ({self.hidden_dim}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is not set."
            )
        head_dim = self.head_dim if self.head_dim is not None else self.hidden_dim // self.num_heads
        _positive(s, "head_dim", head_dim)
        if head_dim % 2:
            raise ConfigError(f"{s}: head_dim must be even for RoPE, got {head_dim}.")
        if self.use_sliding_window:
            raise ConfigError(
                f"{s}: use_sliding_window=true is not supported; only full causal attention is implemented."
            )
        rope = dict(self.rope_parameters or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{s}.rope_parameters: rope_type {rope_type!r} is not supported; expected 'default'."
            )
        theta = rope.pop("rope_theta", 10000.0)
        if rope:
            raise ConfigError(
                f"{s}.rope_parameters: unsupported key(s) {sorted(rope)}; "
                "only rope_type='default' and rope_theta are implemented."
            )
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"{s}.rope_parameters.rope_theta must be > 0, got {theta!r}.")
        expand = self.expand if self.expand is not None else (3 if qwen3 else 4)
        ffn = self.intermediate_size if self.intermediate_size is not None else self.hidden_dim * expand
        _positive(s, "intermediate_size", ffn)
        eps = self.rms_norm_eps if self.rms_norm_eps is not None else (1e-6 if qwen3 else 1e-5)
        max_pos = self.max_position_embeddings or (32768 if qwen3 else 4096)
        # Resolved values, filled in once so the model never re-derives defaults.
        set_ = object.__setattr__
        set_(self, "num_key_value_heads", kv_heads)
        set_(self, "head_dim", head_dim)
        set_(self, "intermediate_size", ffn)
        set_(self, "rms_norm_eps", float(eps))
        set_(self, "max_position_embeddings", int(max_pos))
        set_(self, "rope_parameters", {"rope_type": "default", "rope_theta": float(theta)})

    @property
    def rope_theta(self) -> float:
        assert self.rope_parameters is not None
        return float(self.rope_parameters["rope_theta"])

    @property
    def qk_norm(self) -> bool:
        return self.kind == "qwen3"


@dataclass(frozen=True)
class HeadConfig:
    """`*_head_kwargs`: a SwiGLU MLP head; enabled when `num_layers > 0`."""

    num_layers: int = 0
    hidden_dim: int | None = None
    scale: float = 1.0
    use_norm: bool = True
    vec_dim: int | None = None  # vec_dqn only
    bias_scale: float | None = None  # vec_dqn only
    name: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        s = f"{self.name}_head_kwargs"
        _positive(s, "num_layers", self.num_layers, minimum=0)
        if not self.enabled:
            return
        if self.num_layers > 1:
            _positive(s, "hidden_dim", self.hidden_dim)
        if self.name == "vec_dqn":
            _positive(s, "vec_dim", self.vec_dim)
        elif self.vec_dim is not None or self.bias_scale is not None:
            raise ConfigError(f"{s}: vec_dim/bias_scale only apply to vec_dqn_head_kwargs.")

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0


@dataclass(frozen=True)
class ModelConfig:
    """A whole MOUSE model config, as stored in a checkpoint's `config.json`."""

    hidden_dim: int
    embedding: EmbeddingConfig
    backbone: BackboneConfig | None
    heads: dict[str, HeadConfig]
    action_head: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        """Validate a `config.json` dict; raises `ConfigError` naming the offending key."""
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a JSON object, got {type(config).__name__}.")
        top = {"hidden_dim", "backbone_kwargs", "embedding_kwargs", "action_head"}
        top |= {f"{h}_head_kwargs" for h in HEAD_NAMES}
        unknown = sorted(set(config) - top)
        if unknown:
            raise ConfigError(f"config: unknown key(s) {unknown}; expected a subset of {sorted(top)}.")
        for key in ("hidden_dim", "embedding_kwargs"):
            if key not in config:
                raise ConfigError(f"config: missing required key {key!r}.")
        hidden_dim = _positive("config", "hidden_dim", config["hidden_dim"])
        embedding = _build(EmbeddingConfig, "embedding_kwargs", config["embedding_kwargs"])

        backbone_kwargs = config.get("backbone_kwargs") or {}
        backbone = None
        if backbone_kwargs:
            kind = "qwen3" if "head_dim" in backbone_kwargs else "llama"
            if kind == "llama" and "use_sliding_window" in backbone_kwargs:
                raise ConfigError(
                    "backbone_kwargs: use_sliding_window is a Qwen3 option "
                    "(Qwen3 is selected by the presence of head_dim)."
                )
            backbone = _build(
                BackboneConfig, "backbone_kwargs", backbone_kwargs, kind=kind, hidden_dim=hidden_dim
            )

        heads = {
            h: _build(HeadConfig, f"{h}_head_kwargs", config.get(f"{h}_head_kwargs") or {}, name=h)
            for h in HEAD_NAMES
        }
        action_head = config.get("action_head")
        if action_head is None:
            enabled = [h for h in ("vec_dqn", "dqn", "sp", "sv") if heads[h].enabled]
            if not enabled:
                raise ConfigError("config: no output head is enabled; set num_layers > 0 on one.")
            action_head = enabled[0]
        elif action_head not in HEAD_NAMES:
            raise ConfigError(f"config.action_head must be one of {list(HEAD_NAMES)}, got {action_head!r}.")
        elif not heads[action_head].enabled:
            raise ConfigError(
                f"config.action_head is {action_head!r} but {action_head}_head_kwargs.num_layers is 0."
            )
        return cls(hidden_dim, embedding, backbone, heads, action_head, copy.deepcopy(config))

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict this config was built from."""
        return copy.deepcopy(self.raw)

    @property
    def max_num_actions(self) -> int:
        return self.embedding.max_num_actions

    @property
    def tokens_per_step(self) -> int:
        return self.embedding.tokens_per_step

    @property
    def max_steps(self) -> int | None:
        """Steps that fit in the backbone's `max_position_embeddings`; None without a backbone."""
        if self.backbone is None:
            return None
        assert self.backbone.max_position_embeddings is not None
        return self.backbone.max_position_embeddings // self.tokens_per_step
