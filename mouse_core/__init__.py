"""mouse_core: a native, checkpoint-compatible MOUSE model in plain PyTorch."""

from mouse_core.cache import AttentionPlan, CacheFullError, KVCachePool
from mouse_core.checkpoint import DTYPES, CheckpointError, load_model, read_checkpoint, save_model
from mouse_core.config import ConfigError, ModelConfig
from mouse_core.model import KVCache, Model
from mouse_core.sampling import counter_uniform, rope_rotate, sample_actions, vec_dqn_scores
from mouse_core.steps import FieldSpec, StepSchema, StepValidationError, validate_steps

__all__ = [
    "DTYPES",
    "AttentionPlan",
    "CacheFullError",
    "CheckpointError",
    "ConfigError",
    "FieldSpec",
    "KVCache",
    "KVCachePool",
    "Model",
    "ModelConfig",
    "StepSchema",
    "StepValidationError",
    "counter_uniform",
    "load_model",
    "read_checkpoint",
    "rope_rotate",
    "sample_actions",
    "save_model",
    "validate_steps",
    "vec_dqn_scores",
]
